#!/usr/bin/env bash
# Prefix-aware routing against least-loaded routing (issue 21): the same
# shared-prefix load through one router over BLOCK_DECODERS block decoders
# that run their prefix cache, first routed by load, then by prefix (a fresh
# stack each time, so both start with empty caches). Every tier a process,
# real Redis (loadtest/run-stack.sh). LAYOUT (default reference) is the
# router's --prompt-layout; ROUTINGS (default "false true") the order of the
# runs, e.g. "false true true false" to see the order's own effect.
#
#   cargo build --release -p blockserve -p blockserve-loadtest && bash bench/prefix-routing.sh
#   # on the device (nvidia-h200-x2), with the CUDA build in .dev/min: one
#   # block decoder and one token decoder on each GPU, 256 prefixes, and a KV
#   # pool per block decoder that holds half of them (see docs/performance.md):
#   BIN=.dev/min DEVICE=cuda PRESET=block_main_b4_85 DTYPE=bf16 BD_DEVICES="cuda:0 cuda:1" TOKEN_DECODERS=2 \
#     TD_DEVICES="cuda:0 cuda:1" KV_MIB=2048 LAYOUT=aligned \
#     LOAD="--setting shared-prefix --prefixes 256 --suffix-spread 4 --concurrency 1024 --requests 8192" bash bench/prefix-routing.sh
set -uo pipefail
if [ -n "${BIN:-}" ]; then
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  bash bench/unxz-bins.sh "$BIN"
  export BS=$PWD/$BIN/blockserve LT=$PWD/$BIN/blockserve-loadtest REDIS_SERVER=$PWD/$BIN/redis-server
fi
export BLOCK_DECODERS=${BLOCK_DECODERS:-2} BD_ARGS="--prefix-cache true ${BD_ARGS:-}"
LOAD=${LOAD:---setting shared-prefix --prefixes 8 --prefix-len 512 --gen-len 32 --concurrency 8 --requests 64}
for routing in ${ROUTINGS:-false true}; do
  echo "== --prefix-routing $routing --prompt-layout ${LAYOUT:-reference}"
  LOGS=/tmp/prefix-routing-$routing ROUTER_ARGS="--prefix-routing $routing --prompt-layout ${LAYOUT:-reference}" bash loadtest/run-stack.sh $LOAD
done
