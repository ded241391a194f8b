# The README's commands. `make test` installs the test dependencies and runs every test.
#
# Inside an active virtual environment everything goes there; otherwise `make` creates
# .venv/ beside this file and uses it, so nothing lands in the system's Python.
ifdef VIRTUAL_ENV
PYTHON ?= python
else
PYTHON ?= .venv/bin/python
endif

# torch is only for the torch extra's tests. On Linux x86_64 the CPU build comes from
# PyTorch's CPU index (one ~190 MB wheel, against ~2.7 GB for the default CUDA build);
# where that index cannot be reached within a few seconds, pip's own configured index is
# used instead (and the message says so). `make test TORCH=no` skips torch and its tests.
TORCH ?= yes
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PIP := $(PYTHON) -m pip install --progress-bar on

.PHONY: install venv deps torch test test-fuzz lint bench

ifdef VIRTUAL_ENV
venv:
else
venv: .venv/bin/python
endif

.venv/bin/python:
	python3 -m venv .venv
	.venv/bin/python -m pip install --progress-bar on --upgrade pip

install: venv
	$(PIP) -e .

torch: venv
ifeq ($(TORCH),yes)
	@if [ "$$(uname -sm)" = "Linux x86_64" ] && $(PYTHON) -c "import sys, urllib.request; \
		urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" \
		'$(TORCH_CPU_INDEX)' 2>/dev/null; then \
		echo "installing torch $(TORCH_VERSION), CPU build (~190 MB), from $(TORCH_CPU_INDEX)"; \
		$(PIP) torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX); \
	else \
		echo "installing torch $(TORCH_VERSION) through pip's configured index (PyTorch's CPU" \
			"index is not reachable from here, or this is not Linux x86_64; on Linux this" \
			"may be the CUDA build, ~2.7 GB; \`make test TORCH=no\` skips torch)"; \
		$(PIP) torch==$(TORCH_VERSION); \
	fi
else
	@echo "TORCH=no: not installing torch; its tests are skipped"
endif

deps: venv torch
	$(PIP) -e '.[dev]'

# Two passes: everything but the `serial` tests on every core (pytest-xdist, at most 4
# workers), then the serial ones alone: floods, slow-client attacks and Ray clusters, whose
# deadlines are about a server under attack, not about sharing the CPU with other tests.
test: deps
	$(PYTHON) -m pytest -q -n auto --maxprocesses=4 -m "not serial"
	$(PYTHON) -m pytest -q -m serial

# Property tests with fresh random examples, many more of them (tests/conftest.py).
# A failure it finds becomes an explicit test case.
test-fuzz: deps
	SHOAL_HYPOTHESIS=fuzz $(PYTHON) -m pytest -q -n auto --maxprocesses=4 -m "not serial"
	SHOAL_HYPOTHESIS=fuzz $(PYTHON) -m pytest -q -m serial

lint: venv
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks
	$(PYTHON) -m mypy

bench: venv
	$(PYTHON) benchmarks/simulation.py --json results/simulation.json
