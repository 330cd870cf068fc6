#!/usr/bin/env bash
# The prefix cache's scenario on the GPU (issue 21): 16 distinct 2048-token
# prefixes, each request one of them plus 64 tokens of its own, 128 generated,
# block_main_b4_85, bf16, random weights; the same requests without and with
# the block decoder's prefix cache, in one process, one after the other.
# On the device, after `bash scripts/pack-cuda.sh` here (carry .dev/bin):
#   BATCHES=256,1024,2048 bash bench/prefix-cache.sh
set -euo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
D=${BIN_DIR:-.dev/bin}; f=$D/blockserve.xz
[ -x $D/blockserve ] || { python3 -c "import lzma,sys; open(sys.argv[1][:-3],'wb').write(lzma.open(sys.argv[1]).read())" "$f"; chmod +x $D/blockserve; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$D/blockserve bench --preset block_main_b4_85 --device cuda --dtype bf16 --setting shared-prefix \
  --prefixes "${PREFIXES:-16}" --prefix-len 2048 --batch "${BATCHES:-256,1024,2048}" --prefix-cache off,on --token-budget "${TOKEN_BUDGET:-32768}"
