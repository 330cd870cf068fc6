#!/usr/bin/env bash
# On the GPU machine: issue 22's headline tables in one device call, the
# engine and its baselines on the same card one after the other.
#   - CUDA checks of the build (golden f32/bf16, batching, paged attention, graphs);
#   - block_main_b4_85 through the in-process engine, the two tiers one after
#     the other on one stream (--overlap off) and overlapped on two (on);
#   - vanilla_160 through the engine;
#   - the anchor kit (../shared/anchor-kit: the reference implementation and
#     transformers) on the same GPU, after the engine, never concurrently.
# Here:   bash scripts/pack-cuda.sh && bash bench/pack-headline.sh
# Device: carry .dev/pack; STEPS=checks,engine,anchor-ref  (or vanilla,anchor-hf)
#         bash bench/headline.sh "$OUT"
set -uo pipefail
OUT=${1:-/tmp/headline}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export BLOCKSERVE_FIXTURES=$PWD/crates/model/tests/fixtures
export CUBLASLT_LOG_LEVEL=${CUBLASLT_LOG_LEVEL:-1}
STEPS=",${STEPS:-checks,engine,anchor-ref},"
has() { [[ $STEPS == *",$1,"* ]]; }
log() { printf '[%s +%4ds] %s\n' "$(date -u +%H:%M:%S)" "$SECONDS" "$*"; }

# Binaries and the kit travel as tar.xz archives (bench/pack-headline.sh); the
# kit's wheels are packed unzipped (xz shrinks them 2.5x) and zipped again here.
for t in .dev/pack/*.tar.xz; do [ -e "$t" ] && tar xJf "$t" -C .dev; done
chmod +x .dev/bin/* 2>/dev/null
if [ -d .dev/anchor-kit/whl ]; then
  python3 - <<'EOF'
import os, pathlib, zipfile
whl = pathlib.Path(".dev/anchor-kit/whl")
for d in sorted(p for p in whl.iterdir() if p.is_dir() and p.name.endswith(".d")):
    with zipfile.ZipFile(whl / (d.name[:-2] + ".whl"), "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(d.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(d).as_posix())
EOF
  rm -rf .dev/anchor-kit/whl/*.d
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
date -u
status=0
bs=.dev/bin/blockserve

if has checks; then
  log "== CUDA checks (golden in f32 and bf16, batching, paged attention, CUDA graphs, fused layer)"
  for t in golden batching paged_attention cuda_graph fused_layer; do
    if [ -x .dev/bin/$t ]; then
      BLOCKSERVE_TEST_DEVICE=cuda .dev/bin/$t --test-threads 1 2>&1 | grep -E "^test |test result|panicked|assert" | grep -v " ok$" || status=1
    else
      echo "$t: missing"; status=1
    fi
  done
  # Figures of a build that fails its checks are worth nothing: stop here.
  [ $status = 0 ] || { log "CUDA checks failed: stopping"; exit 1; }
fi

if has engine; then
  # ENGINE_SETTINGS / OVERLAPS narrow the runs (e.g. "decode-heavy" / "on").
  for setting in decode-heavy:${DECODE_BATCHES:-4096,4096} prefill-heavy:${PREFILL_BATCHES:-3072,3072}; do
    [[ " ${ENGINE_SETTINGS:-decode-heavy prefill-heavy} " == *" ${setting%%:*} "* ]] || continue
    for overlap in ${OVERLAPS:-off on}; do
      log "== block_main_b4_85 ${setting%%:*}, --overlap $overlap (batches ${setting#*:}; the first warms the process)"
      $bs bench --preset block_main_b4_85 --setting "${setting%%:*}" --batch "${setting#*:}" --device cuda --dtype bf16 \
        --overlap $overlap --ceilings ${ENGINE_ARGS:-} 2>&1 | grep -E "^\||ceilings|passes" || status=1
    done
  done
fi

if has vanilla; then
  for setting in decode-heavy:${VANILLA_DECODE:-256,1024} prefill-heavy:${VANILLA_PREFILL:-64,256}; do
    log "== vanilla_160 ${setting%%:*} (batches ${setting#*:})"
    $bs bench --preset vanilla_160 --setting "${setting%%:*}" --batch "${setting#*:}" --device cuda --dtype bf16 2>&1 | grep -E "^\|" || status=1
  done
fi

# ANCHOR_RUNS: which of the kit's runs, as step:runs pairs.
for run in ${ANCHOR_RUNS:-ref:a,b hf:c1,c2}; do
  has "anchor-${run%%:*}" || continue
  log "== anchor kit: runs ${run#*:} (same GPU, after the engine)"
  ONLY=${run#*:} BUDGET_S=$(( ${ANCHOR_BUDGET_S:-560} - SECONDS )) bash .dev/anchor-kit/run.sh "$OUT/anchor-${run%%:*}" >/dev/null 2>&1 || status=1
  cat "$OUT/anchor-${run%%:*}/anchor.jsonl" 2>/dev/null || { tail -20 "$OUT/anchor-${run%%:*}/anchor.log"; status=1; }
done
log "done (status $status)"
exit $status
