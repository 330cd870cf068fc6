#!/usr/bin/env bash
# Train on the device. Carry .dev/train, holding blockserve.xz (a CUDA build)
# and the corpus files of `blockserve corpus` (train.bin or train.bin.xz,
# valid.bin, tokenizer.json). Runs are kept under runs/ on the device (while it stays warm).
#   [RUN=runs/NAME] [DTYPE=bf16] bash scripts/device-train.sh SHAPE STEPS [more blockserve train flags]
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
BS=.dev/train/blockserve
unxz() { python3 -c "import lzma,sys; open(sys.argv[1][:-3],'wb').write(lzma.open(sys.argv[1]).read())" "$1"; }
[ -x $BS ] || { unxz $BS.xz && chmod +x $BS; }
# train.bin may travel xz-compressed (it compresses 4x) to stay under the carry limit.
[ -e .dev/train/train.bin ] || unxz .dev/train/train.bin.xz
shape=$1 steps=$2; shift 2
mkdir -p runs
run=${RUN:-runs/$shape}
$BS train --data .dev/train --run $run --shape "$shape" --steps "$steps" --device cuda --dtype ${DTYPE:-bf16} --export $run/model "$@"
