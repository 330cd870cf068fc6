#!/usr/bin/env bash
# Issue 21's GPU measurements in one device call (nvidia-h200-x2), with the
# CUDA build in .dev/min (blockserve, blockserve-loadtest, redis-server, xz):
#  1. the engine on GPU 0: the shared-prefix scenario (16 prefixes of 2048
#     tokens, 64 of each request's own, 128 generated) with the prefix cache
#     off and on, in both prompt layouts; then 256 prefixes used 4 times
#     each, the requests' own parts of every length modulo L;
#  2. prefix routing against least-loaded routing over two block decoders
#     (one per GPU) and two token decoders (one per GPU), aligned layout:
#     the 16-prefix load, then 256 prefixes with a KV pool per block decoder
#     that holds about half of them.
#   bash bench/prefix-gpu.sh 2>&1 | tee bench/logs/prefix-gpu-<date>.log
# PARTS="engine routing" (the default) picks the parts to run.
set -uo pipefail
BIN=${BIN:-.dev/min}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
bash bench/unxz-bins.sh "$BIN"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
PARTS=${PARTS:-engine routing}
if [[ " $PARTS " == *" engine "* ]]; then
echo "== 1. engine, cuda:0"
# The scenario (16 prefixes, own parts of 64), both layouts.
"$BIN/blockserve" bench --preset block_main_b4_85 --device cuda:0 --dtype bf16 --setting shared-prefix --batch 1024,2048 \
  --prompt-layout reference,aligned --prefix-cache off,on
# Few uses per prefix (256 prefixes, 4 requests each) and own parts of every
# length modulo 4: where the layouts differ.
"$BIN/blockserve" bench --preset block_main_b4_85 --device cuda:0 --dtype bf16 --setting shared-prefix --batch 1024 \
  --prefixes 256 --suffix-spread 4 --prompt-layout reference,aligned --prefix-cache off,on
fi
[[ " $PARTS " == *" routing "* ]] || exit 0
echo "== 2. routing"
common="BIN=$BIN DEVICE=cuda PRESET=block_main_b4_85 DTYPE=bf16 BD_DEVICES='cuda:0 cuda:1' TOKEN_DECODERS=2 TD_DEVICES='cuda:0 cuda:1' LAYOUT=aligned"
eval "$common KV_MIB=16384 LOAD='--setting shared-prefix --prefixes 16 --suffix-spread 4 --concurrency 1024 --requests 8192' bash bench/prefix-routing.sh"
eval "$common KV_MIB=${KV_MIB:-2048} LOAD='--setting shared-prefix --prefixes 256 --suffix-spread 4 --concurrency 1024 --requests 8192' bash bench/prefix-routing.sh"
