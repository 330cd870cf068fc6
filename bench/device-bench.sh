#!/usr/bin/env bash
# One device call: the CUDA fixture checks, the transformers baseline and
# blockserve's in-process engine on the same card. The CUDA builds of
# `blockserve` and the test binaries travel xz-compressed in .dev/bin.
#
#   bash bench/device-bench.sh           # everything (about 7 minutes)
#   QUICK=1 bash bench/device-bench.sh   # no transformers baseline, no vanilla runs
# More switches: NO_CHECKS=1 (skip the numerical checks), NO_STACK=1, and the
# batch lists DECODE_BATCHES, PREFILL_BATCHES and STACK_RUNS (see below).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export BLOCKSERVE_FIXTURES=$PWD/crates/model/tests/fixtures
for f in .dev/bin/*.xz; do python3 -c "import lzma,sys; open(sys.argv[1][:-3],'wb').write(lzma.open(sys.argv[1]).read())" "$f"; chmod +x "${f%.xz}"; done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
date -u
BS=.dev/bin/blockserve
status=0
if [ -z "${NO_CHECKS:-}" ]; then
echo "== numerical checks: fixture tests in f32, greedy agreement in bf16/f16 (CUDA)"
for t in golden batching paged_attention cuda_graph download; do
  [ -x .dev/bin/$t ] && { BLOCKSERVE_TEST_DEVICE=cuda .dev/bin/$t --test-threads 1 2>&1 | grep -E "^test |test result" || status=1; }
done
fi
if [ -z "${NO_CHECKS:-}" ] && [ -x .dev/bin/golden_report ]; then
  for dt in f32 bf16; do BLOCKSERVE_TEST_DEVICE=cuda .dev/bin/golden_report $dt || status=1; done
fi
if [ -z "${QUICK:-}" ]; then
  echo "== transformers baseline (GPTNeoXForCausalLM, sdpa, bf16, generate())"
  python3 bench/hf_baseline.py --preset vanilla_160 --setting prefill-heavy --batch 64
  python3 bench/hf_baseline.py --preset vanilla_160 --setting decode-heavy --batch 256
fi
echo "== blockserve engine in process (continuous batching, no gRPC), bf16"
$BS bench --preset block_main_b4_85 --setting decode-heavy --batch ${DECODE_BATCHES:-1024,2048,4096,0} --device cuda --dtype bf16 --ceilings
[ -n "${GRAPHS_OFF_TOO:-}" ] && $BS bench --preset block_main_b4_85 --setting decode-heavy --batch ${DECODE_BATCHES:-1024,2048,4096,0} --device cuda --dtype bf16 --cuda-graphs false
$BS bench --preset block_main_b4_85 --setting prefill-heavy --batch ${PREFILL_BATCHES:-1024,2048,3072} --device cuda --dtype bf16
if [ -z "${QUICK:-}" ]; then
  $BS bench --preset vanilla_160 --setting prefill-heavy --batch 64 --device cuda --dtype bf16
  $BS bench --preset vanilla_160 --setting decode-heavy --batch 256 --device cuda --dtype bf16
fi
if [ -z "${NO_STACK:-}" ]; then
  echo "== full stack over gRPC: router, block decoder and token decoder(s) as separate processes, all on this GPU, bf16"
  export BS=$PWD/.dev/bin/blockserve LT=$PWD/.dev/bin/blockserve-loadtest REDIS_SERVER=$PWD/.dev/bin/redis-server
  # The same token budget as the in-process bench above.
  export PRESET=block_main_b4_85 DEVICE=cuda DTYPE=bf16 KV_MIB=${KV_MIB:-40000} MAX_BATCH=${MAX_BATCH:-2048} TOKEN_BUDGET=${TOKEN_BUDGET:-32768}
  # token decoders:setting:concurrency
  for run in ${STACK_RUNS:-1:decode-heavy:1024 1:decode-heavy:2048 1:prefill-heavy:1024 1:prefill-heavy:2048}; do
    IFS=: read -r td setting c <<< "$run"
    export TOKEN_DECODERS=$td LOGS=${OUT:-/tmp}/stack-$td-$setting-$c
    echo "-- $td token decoder(s), $setting, concurrency $c"
    bash loadtest/run-stack.sh --setting "$setting" --concurrency "$c" || status=1
    grep -h "lifetime\|held_back\|phases" "$LOGS"/*.log | sed 's/\x1b\[[0-9;]*m//g' | sed 's/.*engine=/  engine=/;s/.*held_back=/  held_back=/;s/.* engine phases /  phases: /'
  done
fi
exit $status
