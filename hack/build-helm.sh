#!/usr/bin/env bash
# Build (once) and cache the helm v3 binary from the Go module proxy; print its path on stdout.
#
# Layout: ${LORA_CACHE:-~/.cache/lora-operator}/bin/helm-<version>/helm; a second run is a no-op.
# The ldflags mirror helm's own Makefile: the version for `helm version`, and the Kubernetes version
# that `helm template`/`helm lint` assume without a cluster (the client-go minor, major 1), which
# otherwise falls back to v1.20. The build is niced and limited to two compile jobs because it
# shares the machine with the control-plane build (hack/build-binaries.sh).
# Env: LORA_CACHE, LORA_HELM_VERSION.
set -euo pipefail

HELM_VERSION="${LORA_HELM_VERSION:-v3.21.4}"
CACHE="${LORA_CACHE:-$HOME/.cache/lora-operator}"
DEST="${CACHE}/bin/helm-${HELM_VERSION}"
HELM="${DEST}/helm"

if [[ -x "${HELM}" && "$("${HELM}" version --template '{{.Version}}' 2>/dev/null)" == "${HELM_VERSION}" ]]; then
  echo "${HELM}"
  exit 0
fi

export PATH="${PATH}:/usr/local/go/bin"
command -v go >/dev/null || { echo "build-helm: go not found" >&2; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
module="helm.sh/helm/v3"

start=$(date +%s)
echo "build-helm: building ${module}/cmd/helm@${HELM_VERSION} (a few minutes)" >&2
gomod="$(go mod download -json "${module}@${HELM_VERSION}" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
k8s_minor="$(sed -n 's/^[[:space:]]*k8s.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "${gomod}")"
[[ -n "${k8s_minor}" ]] || { echo "build-helm: no k8s.io/client-go in ${gomod}" >&2; exit 1; }

ldflags="-s -w -X ${module}/internal/version.version=${HELM_VERSION}"
ldflags+=" -X ${module}/internal/version.gitTreeState=clean"
for pkg in pkg/lint/rules pkg/chartutil; do
  ldflags+=" -X ${module}/${pkg}.k8sVersionMajor=1 -X ${module}/${pkg}.k8sVersionMinor=${k8s_minor}"
done

mkdir -p "${DEST}"
tmp="$(mktemp -d "${DEST}/.build.XXXXXX")"
trap 'rm -rf "${tmp}"' EXIT
GOBIN="${tmp}" nice -n 10 go install -p 2 -trimpath -ldflags "${ldflags}" "${module}/cmd/helm@${HELM_VERSION}" >&2
mv -f "${tmp}/helm" "${HELM}"
echo "build-helm: built $("${HELM}" version --short) (kube v1.${k8s_minor} defaults) in $(( $(date +%s) - start ))s" >&2
echo "${HELM}"
