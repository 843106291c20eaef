# vlcompress — all set-up happens here; see README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
EXP ?= default
ARGS ?=
WHAT ?=
PYTEST_ARGS ?=
SWEEP ?= runs/$(EXP)/sweep
# torch + torchvision as a matching pair (timm imports torchvision; PyPI's torchvision does not
# load beside a torch build it was not made for). x86_64: 2.14.1 / 0.29.1 (CUDA build, runs on
# the CPU); aarch64: 2.9.1 / 0.24.1 (CPU build). torch must stay <= 2.14.1 (pyproject.toml).
ifeq ($(shell uname -m),aarch64)
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: help venv train validate list test test-cluster lint format clean bench sweep report prepare backbones

help: ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setting up $(VENV) (offline-friendly; several minutes the first time: torch is a CUDA build)"
	@$(PIP) install -q --disable-pip-version-check $(TORCH_PINS) 2>&1 | grep -v "is ignored" || true
	@$(PIP) install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	@$(PY) -c "import torch, torchvision, timm, lightning, vlcompress.callbacks, vlcompress.datamodules" \
		|| { echo "environment set-up failed: see the pip messages above"; exit 1; }
	@touch $(STAMP)

venv: $(STAMP) ## create or refresh the virtual environment (.venv)

train: $(STAMP) ## run an experiment: make train EXP=<name> ARGS="key=value ..." (default: MCAN on easy-VQA)
	$(PY) -m vlcompress train $(EXP) $(ARGS)

backbones: $(STAMP) ## train the pretrained backbones (experiments/backbones/) not finished yet; ARGS="--list" shows them
	$(PY) -m vlcompress backbones $(ARGS)

validate: $(STAMP) ## validate an experiment's configuration without running it
	$(PY) -m vlcompress validate $(EXP) $(ARGS)

list: $(STAMP) ## list the experiments (make list WHAT=components: the registered components)
	$(PY) -m vlcompress list $(WHAT)

sweep: $(STAMP) ## run an experiment's sweep: section: make sweep EXP=<name> ARGS="key=value ..."
	$(PY) -m vlcompress sweep $(EXP) $(ARGS)

report: $(STAMP) ## aggregate a sweep (mean ± std over seeds; CSV, Markdown, PNG): make report SWEEP=<folder>
	$(PY) -m vlcompress report $(SWEEP) $(ARGS)

prepare: $(STAMP) ## convert region features once: make prepare BENCH=vqa_cp_v2 TSV="train2014_obj36.tsv val2014_obj36.tsv" OUT=<data_dir>/regions_obj36
	@test -n "$(BENCH)" -a -n "$(TSV)" -a -n "$(OUT)" || { echo 'make prepare: set BENCH=, TSV="..." and OUT='; exit 2; }
	$(PY) -m vlcompress prepare $(BENCH) --tsv $(TSV) --out $(OUT) $(ARGS)

lint: $(STAMP) ## ruff check + ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: $(STAMP) lint ## lint, then the test suite (CPU; TRITON_INTERPRET=1)
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# A real single-host Slurm (cluster/slurm_up.sh: installs Debian's packages if missing, starts
# the daemons; stopped by pid on exit unless it was already up) and torchrun on loopback.
test-cluster: $(STAMP) ## distributed tests (Slurm 2-node DDP, submitit sweep, requeue, torchrun; root)
	@test "$$(id -u)" = 0 || { echo "make test-cluster: needs root (it installs and starts Slurm)"; exit 2; }
	@if cluster/slurm_up.sh --check; then keep=1; else keep=; fi; \
	trap '[ -n "$$keep" ] || cluster/slurm_down.sh' EXIT; \
	cluster/slurm_up.sh && \
	TRITON_INTERPRET=1 timeout 1500 $(PY) -m pytest -m cluster -q -rA --durations=10 $(PYTEST_ARGS)

bench: $(STAMP) ## run the benchmarks in benchmarks/
	@for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean: ## remove the virtual environment and caches (keeps runs/)
	rm -rf $(VENV) .cache build *.egg-info
