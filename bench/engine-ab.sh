#!/usr/bin/env bash
# On the GPU machine: the CUDA checks of the new build, then its in-process
# engine against a baseline build on the same card in the same call, then a
# per-kernel profile of the new build. New binaries in .dev/bin (from
# scripts/pack-cuda.sh), the baseline's blockserve and step_profile in BASE.
#   BASE=.dev/base bash bench/engine-ab.sh
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export BLOCKSERVE_FIXTURES=$PWD/crates/model/tests/fixtures
# cuBLASLt reports why a call failed (errors only).
export CUBLASLT_LOG_LEVEL=${CUBLASLT_LOG_LEVEL:-1}
BASE=${BASE:-.dev/base}
# Binaries may travel as one tar.xz with a large dictionary (scripts/pack-cuda.sh
# with PACK_WITH): builds that share most of their bytes then cost little more than one.
for t in .dev/pack/*.tar.xz; do [ -e "$t" ] && tar xJf "$t" -C .dev; done
chmod +x .dev/bin/* "${BASE:-.dev/base}"/* 2>/dev/null
unxz() { for f in "$1"/*.xz; do [ -e "$f" ] || continue; xz -dc "$f" > "${f%.xz}" && chmod +x "${f%.xz}" && rm -f "$f"; done; }
unxz .dev/bin; unxz "$BASE"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
date -u
status=0
if [ -z "${NO_CHECKS:-}" ]; then
  echo "== numerical checks (new build, CUDA)"
  for t in golden batching paged_attention cuda_graph; do
    [ -x .dev/bin/$t ] && { BLOCKSERVE_TEST_DEVICE=cuda .dev/bin/$t --test-threads 1 2>&1 | grep -E "^test |test result|panicked|assert" | grep -v " ok$" ; } || echo "$t: missing or failed"
  done
fi
for round in ${ROUNDS:-1}; do
  for which in base new; do
    bs=$([ $which = base ] && echo "$BASE/blockserve" || echo .dev/bin/blockserve)
    echo "== round $round, $which: decode-heavy"
    $bs bench --preset block_main_b4_85 --setting decode-heavy --batch ${DECODE_BATCHES:-2048,4096,4096} --device cuda --dtype bf16 2>&1 | grep -E "^\||tokens/s" || status=1
    echo "== round $round, $which: prefill-heavy"
    $bs bench --preset block_main_b4_85 --setting prefill-heavy --batch ${PREFILL_BATCHES:-3072,3072} --device cuda --dtype bf16 2>&1 | grep -E "^\||tokens/s" || status=1
  done
done
[ -z "${NO_PROFILE:-}" ] && BIN=.dev/bin bash bench/kernel-profile.sh "${OUT:-/tmp}/profile-new" ${PROFILE_BATCH:-2048} 288
exit $status
