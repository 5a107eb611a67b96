# One command sets up and runs the demo, one sets up and runs the whole test suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo demo-llm cluster test test-all lint crd docs monitoring test-tools k8s-binaries mutants clean

$(VENV)/.installed: pyproject.toml .ci/install-k8s-tools
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # first: anything else could pull a CUDA build
	$(PY) -m pip install -q -e '.[trainer,operator,dev]'
	.ci/install-k8s-tools $(VENV)   # real kubectl + helm into $(VENV)/bin
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m kubetune.demo

demo-llm: setup
	$(PY) -m kubetune.demo --llm

# SFT then DPO on the tiny GPT-2: the preference accuracy the model gains (examples/preferences-dpo.yaml).
.PHONY: demo-dpo
demo-dpo: setup
	$(PY) -m kubetune.demo --dpo

# Both images for a cluster, built and pushed: make images REGISTRY=registry.you/kubetune TAG=0.1.0
# (ENGINE=podman to choose; docker when it is installed). Then: helm install ... --set image.registry=$(REGISTRY)
.PHONY: images
ENGINE ?= $(shell command -v docker >/dev/null 2>&1 && echo docker || echo podman)
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
TAG ?= $(VERSION)
images:
	@test -n "$(REGISTRY)" || { echo "make images: set REGISTRY=<registry/path> (and TAG=..., default $(TAG))" >&2; exit 2; }
	$(ENGINE) build --target trainer -t $(REGISTRY)/trainer:$(TAG) .
	$(ENGINE) build --target operator -t $(REGISTRY)/operator:$(TAG) .
	$(ENGINE) push $(REGISTRY)/trainer:$(TAG)
	$(ENGINE) push $(REGISTRY)/operator:$(TAG)
	@echo "pushed; install with: helm install kubetune charts/kubetune -n kubetune-system --create-namespace --set image.registry=$(REGISTRY)$(if $(filter-out $(VERSION),$(TAG)), --set image.operator.tag=$(TAG) --set image.trainer.tag=$(TAG))"

# The Kubernetes control plane the tests and `make cluster` run, built with Go from the k8s.io/kubernetes
# module (first time: minutes; then taken from ~/.cache/kubetune/controlplane).
k8s-binaries:
	tests/k8s-binaries/build.sh

# A dev cluster on this machine: the real control plane, two nodes whose pods run as processes, S3 (README).
cluster: setup k8s-binaries
	$(PY) -m tests.devcluster

lint: setup
	$(VENV)/bin/ruff check trainer operator tests bench
	$(VENV)/bin/mypy trainer/kubetune operator/kubetune_operator

# Prometheus + promtool for the monitoring tests (a Debian package; no-op when already installed).
test-tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

test: setup lint test-tools k8s-binaries
	$(VENV)/bin/pytest

test-all: setup lint test-tools k8s-binaries
	$(VENV)/bin/pytest -m ''

# Deliberate bugs (tests/mutants.yaml) put back one at a time: the suite must catch every one.
mutants: setup test-tools k8s-binaries
	$(PY) -m tests.mutants

crd: setup
	$(VENV)/bin/kubetune crd > crds/finetunejob.yaml
	cp crds/finetunejob.yaml charts/kubetune/crds/finetunejob.yaml   # the chart ships the same bytes
	$(VENV)/bin/kubetune crd --kind FineTuneSweep > crds/finetunesweep.yaml
	cp crds/finetunesweep.yaml charts/kubetune/crds/finetunesweep.yaml

docs: setup
	$(PY) -m kubetune.specdoc > docs/spec-reference.md   # the field-by-field reference, from the spec model

monitoring: setup
	$(PY) -m kubetune.monitoring charts/kubetune/files

clean:
	rm -rf $(VENV) .kubetune .pytest_cache .mypy_cache .ruff_cache
