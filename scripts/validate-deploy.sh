#!/usr/bin/env bash
# Validates deploy/ against its schemas, offline once the tools are installed:
# - deploy/compose.yaml against the Compose Specification's JSON schema
#   (check-jsonschema's vendored copy, `vendor.compose-spec`);
# - each Kubernetes overlay, rendered with `kubectl kustomize`, against the
#   Kubernetes 1.30 OpenAPI schemas bundled in kubernetes-validate (strict:
#   unknown fields fail).
# The Python tools come from PyPI into a venv under ~/.cache/blockserve;
# kubectl, if missing, from Debian (kubernetes-client).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${BLOCKSERVE_DEPLOY_VENV:-$HOME/.cache/blockserve/deploy-venv}"
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/check-jsonschema" ]; then
  echo "installing kubernetes-validate and check-jsonschema (PyPI) into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q kubernetes-validate==1.37.0 check-jsonschema==0.39.0
fi
if ! command -v kubectl >/dev/null 2>&1; then
  echo "installing kubectl (apt-get kubernetes-client)" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq kubernetes-client >/dev/null
fi
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for overlay in deploy/k8s/overlays/*/; do
  name=$(basename "$overlay")
  kubectl kustomize "$overlay" 2>/dev/null > "$out/$name.yaml"
  "$venv/bin/kubernetes-validate" --strict --quiet -k 1.30.0 "$out/$name.yaml"
  echo "ok -- $overlay: $(grep -c '^kind:' "$out/$name.yaml") resources valid for Kubernetes 1.30"
done
