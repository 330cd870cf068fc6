#!/usr/bin/env bash
# The lint gates ./scripts/test runs first:
# - rustfmt (rustfmt.toml), no diff;
# - clippy on every target of the workspace, warnings as errors;
# - buf lint on proto/ (buf.yaml), and buf breaking against the image of the
#   last released protos (proto/released.binpb): a change that would break
#   existing gRPC or JSON clients fails here. After a release, refresh the
#   image with `buf build -o proto/released.binpb`.
# Needs BLOCKSERVE_BUF (scripts/test-tools.sh sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BLOCKSERVE_BUF:?run scripts/test-tools.sh first (eval its output)}"

cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
"$BLOCKSERVE_BUF" lint
"$BLOCKSERVE_BUF" breaking --against proto/released.binpb
echo "lint: rustfmt, clippy, buf lint and buf breaking passed"
