# lora-operator developer entry points. `make demo` and `make test` do all the set-up themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CACHE   ?= $(HOME)/.cache/lora-operator
VENV    ?= $(CACHE)/venv
PY      := $(VENV)/bin/python
# The editable install points at one checkout: a clone elsewhere (CI) must reinstall, or its tests
# would import this tree's code.
STAMP   := $(VENV)/.installed-$(shell (cat pyproject.toml; echo $(CURDIR)) | sha256sum | cut -c1-12)
export PATH := $(VENV)/bin:$(PATH):/usr/local/go/bin
export KUBECONFIG_LOCAL := $(CURDIR)/.local/kubeconfig

.PHONY: help setup binaries kueue cluster cluster-down crds lint test test-fast operator demo bench helm

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[operator,trainer,dev]'
	@rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)  ## create the venv ($(VENV)) and install the package with all extras

binaries: setup  ## build (once, cached in $(CACHE)/bin) etcd, kube-apiserver, kube-controller-manager
	bash hack/build-binaries.sh

kueue: setup  ## build (once, cached in $(CACHE)/bin) Kueue's manager from the Go proxy (KUEUE_BIN to bring your own)
	python3 hack/build_binaries.py --kueue

cluster: binaries $(if $(KUEUE),kueue)  ## start the local control plane + S3 + pod runner (KUEUE=1: + real Kueue); writes .local/kubeconfig, .local/s3.env
	$(PY) hack/localcluster.py up $(if $(KUEUE),--kueue)

cluster-down:  ## stop everything `make cluster` started
	@if [ -x $(PY) ]; then $(PY) hack/localcluster.py down; else python3 hack/localcluster.py down; fi

crds: setup  ## regenerate crds/ from the pydantic models
	$(PY) -m lora_operator.api.crd > crds/training.lora.dev_loratrainingjobs.yaml
	$(PY) -m lora_operator.api.crd channels > crds/training.lora.dev_loraadapterchannels.yaml
	$(PY) -m lora_operator.api.reference > docs/spec-reference.md
	@if [ -d charts/lora-operator/crds ]; then cp crds/*.yaml charts/lora-operator/crds/; fi

lint: setup  ## ruff, import-linter contracts, hadolint
	$(VENV)/bin/ruff check operator trainer tests hack bench
	$(VENV)/bin/lint-imports --config .importlinter
	$(VENV)/bin/hadolint Dockerfile.operator Dockerfile.trainer

test: binaries kueue  ## the whole test suite (unit, trainer on tiny models, real control plane + S3)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup  ## unit tests only (no cluster, no training)
	$(PY) -m pytest -q -m "not cluster and not slow" $(PYTEST_ARGS)

operator: setup  ## run the operator locally against .local/kubeconfig
	KUBECONFIG=$(KUBECONFIG_LOCAL) $(PY) -m lora_operator --all-namespaces

helm: setup  ## build the helm binary (cached)
	bash hack/build-helm.sh

demo: binaries  ## the Harbor Support demo: cluster, operator, tiny base model, train, gate, publish
	$(PY) hack/demo.py

bench: binaries  ## benchmarks: trainer vs HF Trainer, checkpoint upload, operator at N=50..2000 on simulated pods (BENCH_ARGS="--only operator")
	$(PY) bench/run.py $(BENCH_ARGS)
