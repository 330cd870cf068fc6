#!/usr/bin/env bash
# One device call: the transformers baseline and blockserve's in-process engine on
# the same card. The CUDA build of `blockserve` travels xz-compressed in .dev/bin.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
python3 -c "import lzma; open('.dev/bin/blockserve','wb').write(lzma.open('.dev/bin/blockserve.xz').read())" && chmod +x .dev/bin/blockserve
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
BS=.dev/bin/blockserve
echo "== transformers baseline"
python3 bench/hf_baseline.py --preset vanilla_160 --setting prefill-heavy --batch 64
python3 bench/hf_baseline.py --preset vanilla_160 --setting decode-heavy --batch 256
echo "== blockserve engine (model crate driver, no gRPC)"
$BS bench --preset block_main_b4_85 --setting decode-heavy --batch 64,256 --device cuda --dtype bf16
$BS bench --preset block_main_b4_85 --setting prefill-heavy --batch 64 --device cuda --dtype bf16
$BS bench --preset vanilla_160 --setting decode-heavy --gen-len 256 --batch 64 --device cuda --dtype bf16
