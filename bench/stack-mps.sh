#!/usr/bin/env bash
# One device call: the in-process engine, then the full stack (separate
# processes on the one GPU) without and with NVIDIA MPS, which lets the block
# decoder's and the token decoder's kernels run at the same time instead of
# time-slicing the card. MPS runs as this user's daemon for the duration of
# the script only (pipe and log directories under /tmp) and is stopped at the
# end; no GPU setting is changed.
#
#   bash bench/stack-mps.sh            # STACK_RUNS as in bench/device-bench.sh
#   MPS_ONLY=1 bash bench/stack-mps.sh # the in-process figure and the stack with MPS only
# A run is token-decoders:setting:concurrency[:VAR=value,VAR=value] (the
# variables are set for that run's stack only).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
runs=${STACK_RUNS:-1:decode-heavy:2048 1:decode-heavy:1024}
QUICK=1 NO_CHECKS=1 NO_STACK=1 DECODE_BATCHES=${DECODE_BATCHES:-1024,2048} PREFILL_BATCHES=${PREFILL_BATCHES:-2048} bash bench/device-bench.sh
export BS=$PWD/.dev/bin/blockserve LT=$PWD/.dev/bin/blockserve-loadtest REDIS_SERVER=$PWD/.dev/bin/redis-server
export PRESET=block_main_b4_85 DEVICE=cuda DTYPE=bf16 KV_MIB=${KV_MIB:-40000} MAX_BATCH=${MAX_BATCH:-2048} TOKEN_BUDGET=${TOKEN_BUDGET:-32768}
stack() {
  for run in $runs; do
    IFS=: read -r td setting c vars <<< "$run"
    export TOKEN_DECODERS=$td LOGS=${OUT:-/tmp}/stack-$1-$td-$setting-$c-${vars//[^A-Za-z0-9]/_}
    echo "-- $1: $td token decoder(s), $setting, concurrency $c ${vars:-}"
    env ${vars//,/ } bash loadtest/run-stack.sh --setting "$setting" --concurrency "$c" 2>&1 | grep -E "^\|.*[0-9] \||CPU seconds"
    grep -h "busy_percent" "$LOGS"/*.log | sed 's/\x1b\[[0-9;]*m//g' | sed 's/.*engine=/  engine=/'
  done
}
[ -z "${MPS_ONLY:-}" ] && stack "no MPS"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
if nvidia-cuda-mps-control -d; then
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
  stack "MPS"
else
  echo "MPS could not start"
fi
