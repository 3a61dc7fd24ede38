# Two commands from a fresh clone; each makes the local .venv on first use and reuses it.
#
#   make demo        distill the pretrained MiniLM teacher on the embedded Wikipedia slice,
#                    export the student to Hugging Face and verify it (runs/demo)
#   make test        the whole test suite (what CI runs: .ci/run)
#   make test-fast   the fast tier, pytest -m "not slow"
#   make lint        ruff check --select F,I
#   make clean-venv  remove .venv
#
# Variables: PYTHON (the interpreter that makes the venv, default python3), VENV (.venv),
# TORCH (the torch requirement, default the CPU build torch==2.13.0+cpu: export and its checks
# need no CUDA; `make TORCH=torch==2.13.0 ...` takes PyPI's CUDA build instead), TORCH_INDEX
# (where the CPU build comes from when no local wheelhouse serves it), WORKDIR (runs/demo),
# TESTS (what pytest collects, default tests; e.g. TESTS=tests/test_losses.py), PYTEST_ARGS (extra
# pytest arguments, e.g. PYTEST_ARGS=--durations=40), JOBS (pytest-xdist workers, default auto = one
# per CPU; a test file stays on one worker, so its module fixtures are built once; JOBS=0 runs serially).

PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/demo
TORCH ?= $(if $(filter Darwin,$(shell uname -s)),torch==2.13.0,torch==2.13.0+cpu)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TESTS ?= tests
PYTEST_ARGS ?=
JOBS ?= auto
XDIST := $(if $(filter 0,$(JOBS)),,-n $(JOBS) --dist loadfile)

PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# What every run of the package here sets: no hub look-ups (local teachers only), quiet tokenizers.
RUN_ENV := HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: demo test test-fast lint venv clean-venv

demo: $(VENV)/.demo
	$(RUN_ENV) $(PY) -m flaxdistil.main --config configs/demo.py --workdir $(WORKDIR)
	$(RUN_ENV) $(PY) -m flaxdistil.export --workdir $(WORKDIR) --out $(WORKDIR)/export --overwrite

test: $(VENV)/.test
	$(RUN_ENV) $(PY) -m pytest -q $(XDIST) $(TESTS) $(PYTEST_ARGS)

test-fast: $(VENV)/.test
	$(RUN_ENV) $(PY) -m pytest -q -m "not slow" $(XDIST) $(TESTS) $(PYTEST_ARGS)

lint: $(VENV)/.test
	$(PY) -m pip install -q ruff && $(PY) -m ruff check --select F,I .

venv: $(VENV)/.test

# The venv and torch first, as the CPU build: from a local wheelhouse when pip's configuration
# has one (find-links), else from the PyTorch CPU index. Installing the package after it keeps
# that torch (it satisfies the export extra's torch>=2.4).
$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip 'setuptools>=70.1'
	$(PIP) install -q '$(TORCH)' || $(PIP) install -q '$(TORCH)' --index-url $(TORCH_INDEX)
	touch $@

# --no-build-isolation: the editable install builds with the venv's setuptools (no build env to
# fetch, so a local wheelhouse suffices).
$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PIP) install -q --no-build-isolation -e '.[demo]'
	touch $@

$(VENV)/.test: $(VENV)/.demo
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $@

clean-venv:
	rm -rf $(VENV)
