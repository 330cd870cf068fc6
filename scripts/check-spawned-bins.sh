#!/usr/bin/env bash
# Fails when a test spawns, through blockserve_testkit::workspace_bin, a binary
# that is not one of the workspace's binary targets (so `cargo build
# --workspace --bins` in scripts/test would not build it) or that is missing
# from the target dir after that build.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}/debug"
bins=$(cargo metadata --locked --no-deps --format-version 1 \
  | python3 -c 'import json,sys; print("\n".join(t["name"] for p in json.load(sys.stdin)["packages"] for t in p["targets"] if "bin" in t["kind"]))')
spawned=$(grep -rhoE 'workspace_bin\([^,]+, *"[A-Za-z0-9_-]+"\)' --include='*.rs' crates services loadtest | grep -oE '"[A-Za-z0-9_-]+"\)$' | tr -d '")' | sort -u)
status=0
for b in $spawned; do
  if ! grep -qx "$b" <<<"$bins"; then
    echo "a test spawns '$b', which is not a binary of this workspace: scripts/test cannot build it" >&2; status=1
  elif [ ! -x "$target/$b" ]; then
    echo "a test spawns '$b', but $target/$b was not built" >&2; status=1
  fi
done
[ $status -eq 0 ] && echo "spawned binaries: $(echo $spawned | tr '\n' ' ')(all built)"
exit $status
