#!/usr/bin/env bash
# The fixture tests of the CUDA build (f32), then bench/device-bench.sh, in one call.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export BLOCKSERVE_FIXTURES=$PWD/crates/model/tests/fixtures
python3 -c "import lzma; open('.dev/bin/golden','wb').write(lzma.open('.dev/bin/golden.xz').read())" && chmod +x .dev/bin/golden
echo "== golden tests, CUDA f32"
BLOCKSERVE_TEST_DEVICE=cuda .dev/bin/golden --test-threads 1
bash bench/device-bench.sh
