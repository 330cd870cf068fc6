#!/usr/bin/env bash
# On a 2-GPU machine (nvidia-h200-x2), one device call: the CUDA checks of
# the build, the vanilla driver's greedy readback (BLOCKSERVE_GREEDY_READBACK
# =async|sync), the in-process engine on GPU 0, then the split (block decoder
# on GPU 0, one token decoder on GPU 1) with the token decoder's rounds
# launched ahead (--launch-ahead) and more block-decoder micro-batches, next
# to the old settings, and through the latency proxy.
#   Here:   TAR=1 bash scripts/pack-cuda.sh
#   Device: carry .dev/pack; bash bench/launch-ahead.sh "$OUT" > "$OUT/launch-ahead.log" 2>&1
# STEPS narrows it (checks, kernels, vanilla, baseline, split, proxy, synthetic);
# CHECKS lists the check binaries (default cuda_graph golden download).
# SPLITS: runs as micro-batches:launch-ahead:max-unread-blocks:setting:concurrency[:token budget[:worker threads[:router worker threads]]].
# PROXY_MB: the block decoder's micro-batches in the proxy runs (a list; default 4), RTTS their round trips.
# BASELINE_BUDGETS: the in-process engine's token budgets for prefill-heavy (default 65536);
# SYNTHETIC_BUDGETS: the block decoder's budgets in the synthetic step (default 65536).
set -uo pipefail
OUT=${1:-/tmp/launch-ahead}
mkdir -p "$OUT" .dev
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export BLOCKSERVE_FIXTURES=$PWD/crates/model/tests/fixtures
tar xJf .dev/pack/bin.tar.xz -C .dev && chmod +x .dev/bin/*
STEPS=",${STEPS:-checks,vanilla,baseline,split,proxy},"
has() { [[ $STEPS == *",$1,"* ]]; }
log() { printf '[%s +%4ds] %s\n' "$(date -u +%H:%M:%S)" "$SECONDS" "$*"; }
status=0

if has checks; then
  log "== CUDA checks: CUDA graphs and rounds launched ahead, golden (f32, bf16), downloads"
  for t in ${CHECKS:-cuda_graph golden download}; do
    BLOCKSERVE_TEST_DEVICE=cuda CUDA_VISIBLE_DEVICES=0 .dev/bin/$t --test-threads 1 > "$OUT/$t.out" 2>&1 || status=1
    grep -E "^test |test result" "$OUT/$t.out"
  done
  [ $status = 0 ] || { log "checks failed: stopping"; grep -B2 -A6 "panicked" "$OUT"/*.out | head -40; exit 1; }
fi

if has kernels; then
  # The prefill pass and one layer's prefill attention (step_profile), the
  # baseline build in .dev/base (when packed with WITH=.dev/base) against this
  # one, whose tensor-core kernel also runs as the compiler sizes it (tc3).
  for b in base:tc bin:tc bin:tc3; do
    IFS=: read -r dir variant <<< "$b"
    [ -x .dev/$dir/step_profile ] || continue
    log "== step_profile, .dev/$dir, BLOCKSERVE_PREFILL_ATTENTION=$variant"
    BLOCKSERVE_PREFILL_ATTENTION=$variant CUDA_VISIBLE_DEVICES=0 .dev/$dir/step_profile cuda bf16 2048 288 2>&1 | grep -E "prefill|step|rror" || status=1
  done
fi

if has vanilla; then
  for mode in ${READBACKS:-async sync}; do
    log "== vanilla_160 decode-heavy 256, BLOCKSERVE_GREEDY_READBACK=$mode"
    BLOCKSERVE_GREEDY_READBACK=$mode CUDA_VISIBLE_DEVICES=0 .dev/bin/blockserve bench --preset vanilla_160 --setting decode-heavy --batch 256,256 \
      --device cuda --dtype bf16 2>&1 | grep -E "^\||rror" || status=1
  done
fi

if has baseline; then
  log "== in-process engine, GPU 0"
  BIN=.dev/bin STEPS=baseline BASELINE_BUDGETS="${BASELINE_BUDGETS:-65536}" bash bench/disagg.sh 2>&1 | grep -E "^\||passes" || status=1
fi

if has split; then
  for r in ${SPLITS:-4:true:8:decode-heavy:4096 2:false:8:decode-heavy:4096 4:true:32:decode-heavy:4096 4:true:8:decode-heavy:4096 \
    4:true:8:decode-heavy:4096::4 4:true:8:prefill-heavy:3072:65536 2:false:8:prefill-heavy:3072:65536}; do
    IFS=: read -r mb ahead unread setting c tb wt rwt <<< "$r"
    log "== split $setting $c: --micro-batches $mb, token decoder --launch-ahead $ahead --max-unread-blocks $unread${tb:+, block-decoder budget $tb}${wt:+, $wt worker threads}${rwt:+, router $rwt worker threads}"
    MAX_UNREAD=$unread TD_ARGS="--launch-ahead $ahead" BIN=.dev/bin STEPS=split SPLIT_RUNS="1:$mb:$setting:$c:$wt:$tb:$rwt" timeout 120 bash bench/disagg.sh 2>&1 |
      grep -E "^\||^warm-up|lifetime|phases|passes|held back|task lag|load generator|CPU seconds" || status=1
  done
fi

if has proxy; then
  for mb in ${PROXY_MB:-4}; do
    log "== the split decode-heavy 4096 (--micro-batches $mb, --launch-ahead true) with a round trip added between the tiers"
    MICRO_BATCHES=$mb BIN=.dev/bin STEPS=proxy RTTS="${RTTS:-0.5 1 2}" timeout 240 bash bench/disagg.sh 2>&1 |
      grep -E "^\||^-- |lifetime|held back|task lag|load generator|CPU seconds" || status=1
  done
fi
if has synthetic; then
  # The block decoder alone with instant token decoders, sessions of a
  # prefill-heavy request (2048-token prompt, 32 blocks of output) replacing
  # each other: what the split's prefill-heavy rate can be at most.
  for tb in ${SYNTHETIC_BUDGETS:-65536}; do
    log "== the block decoder alone, prefill-heavy sessions (prompt 2048, 32 blocks), budget $tb"
    BIN=.dev/bin STEPS=synthetic TOKEN_BUDGET=$tb SYNTHETIC="1:3072" SYNTHETIC_PROMPT=2048 SYNTHETIC_BLOCKS=32 SYNTHETIC_WARMUP_S=3 SYNTHETIC_DURATION_S=10 \
      timeout 120 bash bench/disagg.sh 2>&1 | grep -E "^\| [0-9]|lifetime|passes|phases" || status=1
  done
fi
log "done (status $status)"
exit $status
