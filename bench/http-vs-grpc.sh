#!/usr/bin/env bash
# The same load through the router's gRPC API and its OpenAI HTTP API, on one
# `blockserve up` (bundled model, CPU), alternated twice at two concurrencies.
#   cargo build --release -p blockserve -p blockserve-loadtest && bash bench/http-vs-grpc.sh
set -e
B=target/release
$B/blockserve up --listen 127.0.0.1:50071 --http-listen 127.0.0.1:8071 --metrics-listen 127.0.0.1:9071 >/tmp/up-bench.log 2>&1 &
UP=$!
trap "kill $UP" EXIT
for i in $(seq 60); do curl -sf http://127.0.0.1:8071/v1/models >/dev/null && break; sleep 0.5; done
run() { $B/blockserve-loadtest "$@" --metrics up=127.0.0.1:9071 2>&1 | grep -v "^target" ; }
for c in 16 64; do
  for rep in 1 2; do
    echo "== gRPC concurrency $c rep $rep"; run --target http://127.0.0.1:50071 --concurrency $c --requests $((c*4)) --prompt-len 32 --gen-len 256
    echo "== HTTP concurrency $c rep $rep"; run --http http://127.0.0.1:8071 --concurrency $c --requests $((c*4)) --prompt-len 32 --gen-len 256
  done
done
