#!/usr/bin/env bash
# Start the stack on loopback (`blockserve up`, the bundled model, in-process
# store) and run a named scenario through the load generator, as ghz configs.
#
#   loadtest/scenario.sh decode-heavy|prefill-heavy|mixed|bursty
#
# decode-heavy   short prompts, GEN (256) tokens each, C (16) streams at once
# prefill-heavy  ~2,000-token prompts, 16 tokens each, C/2 streams at once
# mixed          both of the above at the same time
# bursty         64-token streams at a rate that climbs 2 -> 26 requests/s in
#                steps of 8 every 3 s, for 12 s
# Env: TOTAL (32), C, GEN, FORMAT (summary|json), UP_ARGS (extra `up` flags,
# e.g. "--device cuda --dtype bf16"), BS / LT (binaries; default target/release).
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=${1:?usage: loadtest/scenario.sh decode-heavy|prefill-heavy|mixed|bursty}
BS=${BS:-target/release/blockserve}
LT=${LT:-target/release/blockserve-loadtest}
TOTAL=${TOTAL:-32} C=${C:-16} GEN=${GEN:-256} FORMAT=${FORMAT:-summary}
port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
dir=$(mktemp -d)
# shellcheck disable=SC2086
"$BS" up --listen 127.0.0.1:$port --max-new-tokens 4096 ${UP_ARGS:-} > "$dir/up.log" 2>&1 &
up=$!
trap 'kill $up 2>/dev/null; wait $up 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 200); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done

# Write a ghz config: config NAME TOTAL CONCURRENCY MAX_NEW_TOKENS PROMPT_TEXT [EXTRA_JSON]
config() {
  python3 - "$dir/$1.json" "$2" "$3" "$4" "$5" "${6:-{\}}" <<'PY'
import json, sys
path, total, conc, gen, text, extra = sys.argv[1:7]
c = {"call": "blockserve.v1.Generation.Generate", "insecure": True, "total": int(total), "concurrency": int(conc),
     "data": {"text": text, "parameters": {"max_new_tokens": int(gen), "ignore_eos": True}}}
c.update(json.loads(extra))
json.dump(c, open(path, "w"), indent=2)
PY
}
# A long prompt: ~8 KB of the project's own Rust source (about 2,000 tokens).
long_prompt=$(head -c 8000 crates/model/src/gpt_neox.rs)
run() { "$LT" --config "$dir/$1.json" --target "127.0.0.1:$port" --format "$FORMAT"; }
case "$scenario" in
  decode-heavy) config decode "$TOTAL" "$C" "$GEN" "def main():" && run decode ;;
  prefill-heavy) config prefill "$TOTAL" $((C / 2 > 0 ? C / 2 : 1)) 16 "$long_prompt" && run prefill ;;
  mixed)
    config decode "$TOTAL" "$C" "$GEN" "def main():"
    config prefill "$TOTAL" $((C / 2 > 0 ? C / 2 : 1)) 16 "$long_prompt"
    run decode > "$dir/decode.out" & d=$!
    run prefill > "$dir/prefill.out" & p=$!
    wait $d && wait $p
    echo "== decode-heavy half"; cat "$dir/decode.out"
    echo "== prefill-heavy half"; cat "$dir/prefill.out" ;;
  bursty)
    config bursty 100000 32 64 "import os" \
      '{"load-schedule": "step", "load-start": 2, "load-step": 8, "load-end": 26, "load-step-duration": "3s", "load-max-duration": "12s"}'
    run bursty ;;
  *) echo "unknown scenario $scenario: decode-heavy, prefill-heavy, mixed or bursty" >&2; exit 2 ;;
esac
