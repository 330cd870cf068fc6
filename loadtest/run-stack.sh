#!/usr/bin/env bash
# Start the whole stack as separate processes on this machine (Redis, one block
# decoder, TOKEN_DECODERS token decoders, one router), run blockserve-loadtest
# against the router with the given arguments, then stop everything.
#
#   loadtest/run-stack.sh --setting decode-heavy --concurrency 256
#
# Environment (defaults in brackets): BS [target/release/blockserve],
# LT [target/release/blockserve-loadtest], REDIS_SERVER [redis-server],
# PRESET [block_main_b4_5], MODEL_DIR [/tmp/blockserve-loadtest-$PRESET, written
# with random weights by `blockserve init` when missing], DEVICE [cpu], DTYPE
# [f32], TOKEN_DECODERS [1], TD_DEVICE [$DEVICE], KV_MIB [1024], MAX_BATCH [1024],
# MAX_SESSIONS [4096], TOKEN_BUDGET [8192], MICRO_BATCHES [2], LOGS
# [/tmp/blockserve-loadtest-logs], MAX_UNREAD [8], UP [unset; set: every tier in one
# `blockserve up` process instead, with the same Redis], PLUMBING_NICE [unset],
# BD_SM_PERCENT / TD_SM_PERCENT [unset; under NVIDIA MPS, the share of the
# GPU's SMs the block decoder / each token decoder may use], LINK_RTT_MS
# [unset; set: token decoders reach the block decoder through
# blockserve-latency-proxy (LP [target/release/blockserve-latency-proxy]),
# which adds this round trip in milliseconds], BD_ARGS / TD_ARGS [extra flags],
# BD_ENV / TD_ENV / ROUTER_ENV [extra VAR=VALUE settings for that tier's
# processes, e.g. TOKIO_WORKER_THREADS=8], ROUTER_ARGS [extra router flags],
# BLOCK_DECODERS [1; more start one block decoder each on the devices of
# BD_DEVICES (a space-separated list, default $DEVICE for each); LINK_RTT_MS
# then applies to the first only], TD_DEVICES [unset; a space-separated list:
# token decoder i runs on its (i mod length)-th device instead of TD_DEVICE], ROUTER_BS
# [$BS; another build for the router alone, for A/B runs of the router], WARMUP
# [0; that many runs of the same load first, their table rows printed as
# "warm-up": a process's first full-size wave pays for allocations and first
# launches, which the in-process bench leaves out by timing its second run].
set -euo pipefail
BS=${BS:-target/release/blockserve}
LT=${LT:-target/release/blockserve-loadtest}
REDIS_SERVER=${REDIS_SERVER:-redis-server}
PRESET=${PRESET:-block_main_b4_5}
default_model=""; [ -z "${MODEL_DIR:-}" ] && default_model=1
MODEL_DIR=${MODEL_DIR:-/tmp/blockserve-loadtest-$PRESET}
DEVICE=${DEVICE:-cpu}
DTYPE=${DTYPE:-f32}
TD_DEVICE=${TD_DEVICE:-$DEVICE}
TOKEN_DECODERS=${TOKEN_DECODERS:-1}
LOGS=${LOGS:-/tmp/blockserve-loadtest-logs}
mkdir -p "$LOGS"
pids=()
names=()
# PLUMBING_NICE=n runs the router and the load generator at that nice value:
# on one host they stand in for machines of their own.
NICE=""; [ -n "${PLUMBING_NICE:-}" ] && NICE="nice -n $PLUMBING_NICE"
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 600); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.2; done
  echo "port $1 never opened; logs in $LOGS" >&2; return 1
}

# Without MODEL_DIR: a random-weight model written by this binary (one an
# older build left there is written again). A given MODEL_DIR is used as it
# is, and written only when it holds no model.
if [ -n "$default_model" ] && ! [ "$MODEL_DIR/config.json" -nt "$BS" ]; then
  rm -rf "$MODEL_DIR"
fi
if ! [ -e "$MODEL_DIR/config.json" ]; then
  "$BS" init --preset "$PRESET" --out "$MODEL_DIR" --dtype "$([ "$DTYPE" = f32 ] && echo f32 || echo bf16)" >/dev/null
fi
rp=$(free_port)
"$REDIS_SERVER" --port "$rp" --save "" --appendonly no >"$LOGS/redis.log" 2>&1 &
pids+=($!); names+=(redis)
wait_port "$rp"
export BLOCKSERVE_REDIS_URL=redis://127.0.0.1:$rp BLOCKSERVE_MODEL=$MODEL_DIR BLOCKSERVE_DTYPE=$DTYPE
if [ -n "${UP:-}" ]; then
  # The same tiers in one process (`blockserve up`, still gRPC over loopback):
  # one CUDA context, so the tiers' kernels share the GPU without time-slicing.
  rtp=$(free_port)
  "$BS" up --device "$DEVICE" --token-decoders "$TOKEN_DECODERS" --kv-cache-mib "${KV_MIB:-1024}" \
    --max-sessions "${MAX_SESSIONS:-4096}" --max-batch "${MAX_BATCH:-1024}" --max-new-tokens 4096 \
    --micro-batches "${MICRO_BATCHES:-2}" --redis-url "$BLOCKSERVE_REDIS_URL" --listen 127.0.0.1:$rtp >"$LOGS/up.log" 2>&1 &
  pids+=($!); names+=(up)
  wait_port "$rtp"
  sleep 1
  echo "stack (one process): router :$rtp, $TOKEN_DECODERS token decoder(s), $DEVICE, redis :$rp, model $MODEL_DIR ($DTYPE)" >&2
else
# Every tier serves metrics: the load generator reads each one's CPU time
# (`--metrics`) and prints CPU per generated token.
metrics=()
bd_devices=(${BD_DEVICES:-})
bdp=$(free_port); bdm=$(free_port); metrics+=("block-decoder=127.0.0.1:$bdm")
# With LINK_RTT_MS the block decoder registers the proxy's address, so that is
# what token decoders dial.
advertise=()
if [ -n "${LINK_RTT_MS:-}" ]; then
  proxy=$(free_port)
  "${LP:-target/release/blockserve-latency-proxy}" --listen 127.0.0.1:$proxy --upstream 127.0.0.1:$bdp --rtt-ms "$LINK_RTT_MS" >"$LOGS/proxy.log" 2>&1 &
  pids+=($!); names+=(latency-proxy)
  advertise=(--advertise "http://127.0.0.1:$proxy")
fi
start_bd() { # name, listen port, metrics port, device, then extra flags
  local name=$1 port=$2 mport=$3 dev=$4; shift 4
  env ${BD_ENV:-} ${BD_SM_PERCENT:+CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$BD_SM_PERCENT} "$BS" block-decoder --listen 127.0.0.1:$port "$@" ${BD_ARGS:-} --metrics-listen 127.0.0.1:$mport --device "$dev" --kv-cache-mib "${KV_MIB:-1024}" \
    --max-sessions "${MAX_SESSIONS:-4096}" --token-budget "${TOKEN_BUDGET:-8192}" --micro-batches "${MICRO_BATCHES:-2}" >"$LOGS/$name.log" 2>&1 &
  pids+=($!); names+=($name)
  wait_port "$port"
}
start_bd block-decoder $bdp $bdm "${bd_devices[0]:-$DEVICE}" "${advertise[@]}"
for i in $(seq 2 "${BLOCK_DECODERS:-1}"); do
  p=$(free_port); m=$(free_port); metrics+=("block-decoder-$i=127.0.0.1:$m")
  start_bd block-decoder-$i $p $m "${bd_devices[$((i - 1))]:-$DEVICE}"
done
td_devices=(${TD_DEVICES:-$TD_DEVICE})
for i in $(seq 1 "$TOKEN_DECODERS"); do
  td_device=${td_devices[$(((i - 1) % ${#td_devices[@]}))]}
  tdp=$(free_port); tdm=$(free_port); metrics+=("token-decoder-$i=127.0.0.1:$tdm")
  env ${TD_ENV:-} ${TD_SM_PERCENT:+CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$TD_SM_PERCENT} "$BS" token-decoder --listen 127.0.0.1:$tdp ${TD_ARGS:-} --metrics-listen 127.0.0.1:$tdm --device "$td_device" --max-batch "${MAX_BATCH:-1024}" \
    --max-sessions "${MAX_SESSIONS:-4096}" --max-unread-blocks "${MAX_UNREAD:-8}" >"$LOGS/token-decoder-$i.log" 2>&1 &
  pids+=($!); names+=(token-decoder-$i)
  wait_port "$tdp"
done
rtp=$(free_port); rtm=$(free_port); metrics+=("router=127.0.0.1:$rtm")
$NICE env ${ROUTER_ENV:-} "${ROUTER_BS:-$BS}" router --listen 127.0.0.1:$rtp --metrics-listen 127.0.0.1:$rtm --max-new-tokens 4096 ${ROUTER_ARGS:-} >"$LOGS/router.log" 2>&1 &
pids+=($!); names+=(router)
wait_port "$rtp"
sleep 1
echo "stack: router :$rtp ${ROUTER_ARGS:-}, ${BLOCK_DECODERS:-1} block decoder(s), the first :$bdp (${bd_devices[0]:-$DEVICE}${LINK_RTT_MS:+, +$LINK_RTT_MS ms round trip to it}), $TOKEN_DECODERS token decoder(s) (${TD_DEVICES:-$TD_DEVICE}), redis :$rp, model $MODEL_DIR ($DTYPE)" >&2
export LOADTEST_METRICS=$(IFS=,; echo "${metrics[*]}")
fi
# CPU seconds each process used (the machine's load is part of the result:
# every tier, Redis and the load generator share its cores here).
cpu_of() { awk -v t="$(getconf CLK_TCK)" '{ printf "%.1f", ($14 + $15) / t }' "/proc/$1/stat" 2>/dev/null; }
for i in $(seq 1 "${WARMUP:-0}"); do
  "$LT" --target "http://127.0.0.1:$rtp" "$@" 2>&1 | grep -E "^\| [0-9]" | sed "s/^/warm-up $i: /" || true
done
TIMEFORMAT="load generator: %R s wall, %U s user + %S s system CPU"
time $NICE "$LT" --target "http://127.0.0.1:$rtp" "$@"
# Block decoders' prefix caches and the router's choices, when used.
if [ -n "${LOADTEST_METRICS:-}" ]; then
  python3 - "$LOADTEST_METRICS" <<'PY'
import sys, urllib.request
for item in sys.argv[1].split(","):
    name, addr = item.split("=", 1)
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    rows = [l for l in text.splitlines() if l.startswith(("blockserve_prefix_cache_blocks_total", "blockserve_routing_choices_total"))]
    if rows:
        print(name + ": " + ", ".join(rows))
PY
fi
echo -n "CPU seconds:"
for i in "${!pids[@]}"; do echo -n " ${names[$i]} $(cpu_of "${pids[$i]}")"; done
echo " (of $(nproc) cores)"
