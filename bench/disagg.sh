#!/usr/bin/env bash
# The split across GPUs, in one device call on a 2-GPU machine (nvidia-h200-x2):
# block_main_b4_85, bf16, random weights, every tier a separate process, real
# Redis, blockserve-loadtest with each tier's CPU per generated token.
#
#   bash bench/disagg.sh            # every step below (about 8 minutes)
#   STEPS=baseline,split bash bench/disagg.sh
#
# Steps:
#   baseline   the in-process engine on GPU 0 (the yardstick), decode-heavy at
#              4096 and prefill-heavy at 3072 (BASELINE_BUDGETS: token budgets),
#              each run twice in its process, the second warm
#   split      block decoder on GPU 0, one token decoder on GPU 1 (no MPS),
#              decode-heavy at 4096 and prefill-heavy at 3072 (SPLIT_RUNS:
#              token decoders:block-decoder micro-batches:setting:concurrency)
#   proxy      the same decode-heavy run with 0.5, 1, 2 and 5 ms of added round
#              trip between the token decoder and the block decoder
#   synthetic  the block decoder alone on GPU 0, driven by synthetic token
#              decoders over the real link (blocks/s); SYNTHETIC (links:sessions
#              list), SYNTHETIC_PROMPT (prompt tokens, 128), SYNTHETIC_BLOCKS
#              (blocks a session generates before a new one replaces it, 1024),
#              SYNTHETIC_WARMUP_S / SYNTHETIC_DURATION_S (8 / 15)
#   bundled    the bundled model (models/code-block): the split decode-heavy
#              run and the block decoder alone
# The CUDA builds travel xz-compressed in .dev/bin (scripts/pack-cuda.sh).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
BIN=${BIN:-.dev/bin}
bash bench/unxz-bins.sh "$BIN"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
echo "$(nproc) cores"; date -u
export BS=$PWD/$BIN/blockserve LT=$PWD/$BIN/blockserve-loadtest LP=$PWD/$BIN/blockserve-latency-proxy REDIS_SERVER=$PWD/$BIN/redis-server
export PRESET=block_main_b4_85 DTYPE=bf16 MODEL_DIR=/tmp/b4_85
export KV_MIB=${KV_MIB:-60000} MAX_BATCH=${MAX_BATCH:-4096} MAX_SESSIONS=${MAX_SESSIONS:-8192} TOKEN_BUDGET=${TOKEN_BUDGET:-32768}
STEPS=${STEPS:-baseline,split,proxy,synthetic}
step() { [[ ",$STEPS," == *",$1,"* ]]; }
status=0
# The engines' busy share and round-trip phases from a run's logs.
phases() { grep -h "lifetime\|held_back\|phases\|block-decoder passes\|task lag\|tier's weights\|GPU memory" "$1"/*.log | sed 's/\x1b\[[0-9;]*m//g' | sed 's/^[^ ]* *INFO [^:]*: /  /'; }

if step baseline; then
  # Each batch twice: a process's first full-size run is slower (15-20% for
  # a 1.5 s prefill-heavy run); the second row is the yardstick.
  echo "== in-process engine, GPU 0 (each batch twice: the second row is the warm figure)"
  d=${DECODE_BATCH:-4096} p=${PREFILL_BATCH:-3072}
  $BS bench --preset $PRESET --setting decode-heavy --batch $d,$d --device cuda:0 --dtype bf16 || status=1
  for tb in ${BASELINE_BUDGETS:-$TOKEN_BUDGET}; do
    $BS bench --preset $PRESET --setting prefill-heavy --batch $p,$p --device cuda:0 --dtype bf16 --token-budget $tb || status=1
  done
fi

run() { # name, then run-stack.sh's arguments; environment as set by the caller
  export LOGS=${LOGROOT:-/tmp/disagg}/$1; shift
  echo "-- $(basename "$LOGS")"
  bash loadtest/run-stack.sh "$@" || status=1
  phases "$LOGS"
}

if step split; then
  echo "== block decoder on GPU 0, token decoder(s) on GPU 1"
  # token decoders on GPU 1 : block-decoder micro-batches : setting : concurrency
  # [: worker threads of the token decoder and router [: block-decoder token budget [: the router's own worker threads]]]
  for r in ${SPLIT_RUNS:-1:2:decode-heavy:${DECODE_BATCH:-4096} 1:2:prefill-heavy:${PREFILL_BATCH:-3072}}; do
    IFS=: read -r td mb setting c wt tb rwt <<< "$r"
    env=${wt:+BLOCKSERVE_WORKER_THREADS=$wt}
    renv=${rwt:+BLOCKSERVE_WORKER_THREADS=$rwt}
    DEVICE=cuda:0 TD_DEVICE=cuda:1 TOKEN_DECODERS=$td MICRO_BATCHES=$mb TD_ENV=$env ROUTER_ENV=${renv:-$env} TOKEN_BUDGET=${tb:-$TOKEN_BUDGET} \
      run split-$td-$mb-$setting${wt:+-wt$wt}${tb:+-tb$tb}${rwt:+-rwt$rwt} --setting "$setting" --concurrency "$c"
  done
fi

if step proxy; then
  echo "== the same, with a round trip added between the token decoder and the block decoder"
  for rtt in ${RTTS:-0.5 1 2 5}; do
    DEVICE=cuda:0 TD_DEVICE=cuda:1 TOKEN_DECODERS=1 LINK_RTT_MS=$rtt run proxy-$rtt --setting decode-heavy --concurrency ${DECODE_BATCH:-4096}
  done
fi

# The block decoder alone on GPU 0 with the model in $1, driven by synthetic
# token decoders over the real link.
synthetic() {
  "$REDIS_SERVER" --port 6399 --save "" --appendonly no >/tmp/redis-synthetic.log 2>&1 &
  local redis=$!
  $BS block-decoder --listen 127.0.0.1:7001 --device cuda:0 --dtype bf16 --model "$1" --kv-cache-mib "$KV_MIB" \
    --max-sessions 16384 --token-budget "$TOKEN_BUDGET" --redis-url redis://127.0.0.1:6399 >/tmp/bd-synthetic.log 2>&1 &
  local bd=$!
  for _ in $(seq 1 600); do (echo > /dev/tcp/127.0.0.1/7001) 2>/dev/null && break; sleep 0.2; done
  for links_sessions in ${SYNTHETIC:-1:4096 2:8192}; do
    IFS=: read -r links sessions <<< "$links_sessions"
    $LT --synthetic-block-decoder http://127.0.0.1:7001 --links "$links" --concurrency "$sessions" --prompt-len "${SYNTHETIC_PROMPT:-128}" \
      --session-blocks "${SYNTHETIC_BLOCKS:-1024}" --warmup-s "${SYNTHETIC_WARMUP_S:-8}" --duration-s "${SYNTHETIC_DURATION_S:-15}" ${2:+--td-tokens-per-s $2} || status=1
  done
  kill $bd $redis 2>/dev/null; wait $bd $redis 2>/dev/null
  grep -h "lifetime\|block-decoder passes\|phases" /tmp/bd-synthetic.log | sed 's/\x1b\[[0-9;]*m//g' | sed 's/^[^ ]* *INFO [^:]*: /  /'
}

if step synthetic; then
  echo "== the block decoder alone on GPU 0 (block_main_b4_85), synthetic token decoders over the real link"
  [ -e "$MODEL_DIR/config.json" ] || $BS init --preset $PRESET --out "$MODEL_DIR" --dtype bf16 >/dev/null
  synthetic "$MODEL_DIR" "${TD_TOKENS_PER_S:-}"
fi

if step bundled; then
  echo "== the bundled model (models/code-block): the split, and the block decoder alone"
  DEVICE=cuda:0 TD_DEVICE=cuda:1 TOKEN_DECODERS=1 MODEL_DIR=$PWD/models/code-block run bundled-split --setting decode-heavy --concurrency ${DECODE_BATCH:-4096}
  synthetic "$PWD/models/code-block" "${BUNDLED_TD_TOKENS_PER_S:-}"
fi
exit $status
