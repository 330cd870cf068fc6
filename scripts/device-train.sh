#!/usr/bin/env bash
# Train on the device. Carry .dev/train, holding blockserve.xz (a CUDA build)
# and the corpus files of `blockserve corpus` (train.bin, valid.bin,
# tokenizer.json). Runs are kept under runs/ on the device (while it stays warm).
#   [RUN=runs/NAME] [DTYPE=bf16] bash scripts/device-train.sh SHAPE STEPS [more blockserve train flags]
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
BS=.dev/train/blockserve
[ -x $BS ] || { python3 -c "import lzma,sys; open(sys.argv[1][:-3],'wb').write(lzma.open(sys.argv[1]).read())" $BS.xz && chmod +x $BS; }
shape=$1 steps=$2; shift 2
mkdir -p runs
run=${RUN:-runs/$shape}
$BS train --data .dev/train --run $run --shape "$shape" --steps "$steps" --device cuda --dtype ${DTYPE:-bf16} --export $run/model "$@"
