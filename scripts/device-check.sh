#!/usr/bin/env bash
# Runs on the lent GPU machine (no Rust there): the CUDA build's fixture tests in
# f32 and the golden report in f32/bf16/f16. Binaries come prebuilt in .dev/bin
# (see docs/performance.md for how they are built and carried).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export BLOCKSERVE_FIXTURES=$PWD/crates/model/tests/fixtures
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# Binaries travel xz-compressed (the CUDA kernels make each ~46 MB).
for f in .dev/bin/*.xz; do python3 -c "import lzma,sys; open(sys.argv[1][:-3],'wb').write(lzma.open(sys.argv[1]).read())" "$f"; chmod +x "${f%.xz}"; done
status=0
for t in golden batching; do
  echo "== $t tests, CUDA f32"
  BLOCKSERVE_TEST_DEVICE=cuda .dev/bin/$t --test-threads 1 || status=1
done
for dt in f32 bf16 f16; do
  echo "== golden report, CUDA $dt"
  BLOCKSERVE_TEST_DEVICE=cuda .dev/bin/golden_report $dt || status=1
done
exit $status
