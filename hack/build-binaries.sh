#!/usr/bin/env bash
# Build and cache etcd, kube-apiserver and kube-controller-manager for the local dev cluster.
# See hack/build_binaries.py; env: LORA_CACHE, LORA_K8S_VERSION, LORA_ETCD_VERSION, KUBEBUILDER_ASSETS.
set -euo pipefail
export PATH="${PATH}:/usr/local/go/bin"
exec python3 "$(dirname "$0")/build_binaries.py" "$@"
