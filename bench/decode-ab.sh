#!/usr/bin/env bash
# On the GPU machine: A/B runs of settings the build reads from the
# environment, in one device call, alternating in the same process kind.
# A mode is `default` or VAR=VALUE assignments joined by `+`, e.g.
#   BLOCKSERVE_DECODE_PREFETCH=1   per-head decode attention one round of keys
#                                  ahead (the kernel before 2026-12-01; also
#                                  a KV-write launch before it)
#   BLOCKSERVE_DECODE_ATTENTION=per-head|rows   which decode kernel
# Here:   TAR=1 bash scripts/pack-cuda.sh (or bench/pack-headline.sh)
# Device: carry .dev/pack;
#   STEPS=checks,profile,vanilla,engine MODES="default BLOCKSERVE_DECODE_PREFETCH=1" bash bench/decode-ab.sh
# CHECK_MODES and ENGINE_MODES for the checks and the engine (default MODES); PROFILE_ARGS: step_profile's
# batch and keys; ENGINE_RUNS: setting:batches of block_main_b4_85.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export BLOCKSERVE_FIXTURES=$PWD/crates/model/tests/fixtures
STEPS=",${STEPS:-checks,profile,vanilla,engine},"
has() { [[ $STEPS == *",$1,"* ]]; }
log() { printf '[%s +%4ds] %s\n' "$(date -u +%H:%M:%S)" "$SECONDS" "$*"; }
for t in .dev/pack/*.tar.xz; do [ -e "$t" ] && tar xJf "$t" -C .dev; done
chmod +x .dev/bin/* 2>/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
status=0
MODES=${MODES:-default BLOCKSERVE_DECODE_PREFETCH=1 default BLOCKSERVE_DECODE_PREFETCH=1}
mode_env() { [ "$1" = default ] || echo "${1//+/ }"; }

if has checks; then
  # Each mode's kernels against the CPU reference and the golden fixtures
  # (the paged attention tests include decode passes).
  for m in ${CHECK_MODES:-$MODES}; do
    log "== CUDA checks, $m"
    for t in ${CHECKS:-golden batching paged_attention cuda_graph fused_layer}; do
      env $(mode_env "$m") BLOCKSERVE_TEST_DEVICE=cuda .dev/bin/$t --test-threads 1 2>&1 |
        grep -E "^test |test result|panicked|assert" | grep -v " ok$" || status=1
    done
  done
  [ $status = 0 ] || { log "CUDA checks failed: stopping"; exit 1; }
fi

if has profile; then
  for m in $MODES; do
    log "== step_profile ${PROFILE_ARGS:-256 1152}, $m"
    env $(mode_env "$m") .dev/bin/step_profile cuda bf16 ${PROFILE_ARGS:-256 1152} 2>&1 | grep -E "block-decoder step|paged attention, one|rror" || status=1
  done
fi

if has vanilla; then
  for m in $MODES; do
    log "== vanilla_160 decode-heavy ${VANILLA_DECODE:-256,256}, $m"
    env $(mode_env "$m") .dev/bin/blockserve bench --preset vanilla_160 --setting decode-heavy --batch "${VANILLA_DECODE:-256,256}" \
      --device cuda --dtype bf16 2>&1 | grep -E "^\|" || status=1
  done
fi

if has engine; then
  for setting in ${ENGINE_RUNS:-decode-heavy:4096,4096 prefill-heavy:3072,3072}; do
    for m in ${ENGINE_MODES:-$MODES}; do
      log "== block_main_b4_85 ${setting%%:*} ${setting#*:}, overlap on, budget 196608, $m"
      env $(mode_env "$m") .dev/bin/blockserve bench --preset block_main_b4_85 --setting "${setting%%:*}" --batch "${setting#*:}" \
        --device cuda --dtype bf16 --overlap on --token-budget 196608 2>&1 | grep -E "^\|" || status=1
    done
  done
fi
log "done (status $status)"
exit $status
