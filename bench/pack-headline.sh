#!/usr/bin/env bash
# Pack what bench/headline.sh needs into .dev/pack, small enough to travel with
# the working tree (the device call carries 64 MiB in all): the engine binary,
# the CUDA check binaries and step_profile from .dev/bin (bash scripts/pack-cuda.sh first; the
# load generator and redis-server too when it built them),
# and ../shared/anchor-kit with its wheels (fetched here) unzipped, which xz
# packs to 6 MB instead of 15.
#
# The shared kit's copy of the reference (bt/) lacks bt/conf/, the reference's
# model configs: the reference's own .gitignore lists conf/, so a copy that
# honours it drops them. REF_REPO names a checkout (or bare mirror) of
# itsnamgyu/block-transformer; its conf/ at commit 17842dd goes into the
# packed kit (nothing of it is committed here).
#   REF_REPO=/path/to/block-transformer bash bench/pack-headline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p .dev/pack "$work/bin"
rm -f .dev/pack/*.tar.xz
# scripts/pack-cuda.sh leaves the binaries plain (TAR=1) or xz-compressed.
for b in blockserve golden batching paged_attention cuda_graph fused_layer step_profile; do
  if [ -e ".dev/bin/$b" ]; then cp ".dev/bin/$b" "$work/bin/"; else xz -dc ".dev/bin/$b.xz" > "$work/bin/$b"; fi
  chmod +x "$work/bin/$b"
done
# The load generator and a portable redis-server, when scripts/pack-cuda.sh built them: bench/disagg.sh's
# one-GPU steps (the block decoder alone, driven over the real link) run from the same pack.
for b in blockserve-loadtest blockserve-latency-proxy redis-server; do
  if [ -e ".dev/bin/$b" ]; then cp ".dev/bin/$b" "$work/bin/"; fi
done
tar cf - -C "$work" bin | xz -T2 -6 --lzma2=preset=6,dict=384MiB > .dev/pack/bin.tar.xz &
kit=../shared/anchor-kit
cp -r "$kit" "$work/anchor-kit"
[ -d "$work/anchor-kit/whl" ] || bash "$work/anchor-kit/fetch-wheels.sh" >/dev/null
if [ ! -d "$work/anchor-kit/bt/conf" ]; then
  : "${REF_REPO:?the kit has no bt/conf: set REF_REPO to a clone of itsnamgyu/block-transformer}"
  git -C "$REF_REPO" archive 17842dd conf | tar xf - -C "$work/anchor-kit/bt"
fi
chmod -R u+w "$work/anchor-kit"
for w in "$work"/anchor-kit/whl/*.whl; do
  mkdir "${w%.whl}.d" && python3 -m zipfile -e "$w" "${w%.whl}.d" && rm "$w"
done
tar cf - -C "$work" anchor-kit | xz -T1 -9e --lzma2=preset=9e,dict=256MiB > .dev/pack/anchor.tar.xz
wait
ls -la .dev/pack
