#!/usr/bin/env bash
# After scripts/device-train.sh (same warm device): held-out perplexity of every
# trained model, then the vanilla model and one Block Transformer through the
# engine (the paper's claim), both settings, several batches; the exported
# models come back split into files under 16 MiB.
#   BLOCK=block_main_b4_5 bash scripts/device-models.sh
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
BS=.dev/train/blockserve
[ -x $BS ] || { python3 -c "import lzma,sys; open(sys.argv[1][:-3],'wb').write(lzma.open(sys.argv[1]).read())" $BS.xz && chmod +x $BS; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
echo "== held-out perplexity (valid.bin, windows of 512, tokens 4.. of each)"
for m in runs/*/model; do echo "-- $m"; $BS perplexity --model $m --tokens .dev/train/valid.bin --window 512 --max-windows 100000 --device cuda --dtype bf16; done
echo "== throughput through the engine, bf16"
V=runs/${VANILLA:-vanilla_s}/model B=runs/${BLOCK:-block_main_b4_5}/model
$BS bench --model $V --setting decode-heavy --batch ${V_DECODE:-256,512,1024} --device cuda --dtype bf16 2>&1 | grep "^| runs"
$BS bench --model $V --setting prefill-heavy --batch ${V_PREFILL:-64,128,256} --device cuda --dtype bf16 2>&1 | grep "^| runs"
$BS bench --model $B --setting decode-heavy --batch ${B_DECODE:-1024,2048,4096} --device cuda --dtype bf16 2>&1 | grep "^| runs"
$BS bench --model $B --setting prefill-heavy --batch ${B_PREFILL:-1024,2048} --device cuda --dtype bf16 2>&1 | grep "^| runs"
if [ -n "${OUT:-}" ]; then
  for name in ${BRING:-block_main_b4_5 vanilla_s}; do
    cp runs/$name/model/config.json $OUT/$name.config.json
    split -b 15M -d runs/$name/model/model.safetensors $OUT/$name.safetensors.part
  done
fi
