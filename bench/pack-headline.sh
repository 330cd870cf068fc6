#!/usr/bin/env bash
# Pack what bench/headline.sh needs into .dev/pack, small enough to travel with
# the working tree (the device call carries 64 MiB in all): the engine binary
# and the CUDA check binaries from .dev/bin (bash scripts/pack-cuda.sh first),
# and ../shared/anchor-kit with its wheels (fetched here) unzipped, which xz
# packs to 6 MB instead of 15.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p .dev/pack "$work/bin"
rm -f .dev/pack/*.tar.xz
cp .dev/bin/{blockserve,golden,batching,paged_attention,cuda_graph} "$work/bin/"
tar cf - -C "$work" bin | xz -T2 -6 --lzma2=preset=6,dict=384MiB > .dev/pack/bin.tar.xz &
kit=../shared/anchor-kit
cp -r "$kit" "$work/anchor-kit"
[ -d "$work/anchor-kit/whl" ] || bash "$work/anchor-kit/fetch-wheels.sh" >/dev/null
for w in "$work"/anchor-kit/whl/*.whl; do
  mkdir "${w%.whl}.d" && python3 -m zipfile -e "$w" "${w%.whl}.d" && rm "$w"
done
tar cf - -C "$work" anchor-kit | xz -T1 -9e --lzma2=preset=9e,dict=256MiB > .dev/pack/anchor.tar.xz
wait
ls -la .dev/pack
