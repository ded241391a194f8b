# The README's commands. `make test` installs the test dependencies and runs every test.
PYTHON ?= python3

.PHONY: install test lint bench

install:
	$(PYTHON) -m pip install -e .

test:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[dev,torch]'
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks
	$(PYTHON) -m mypy

bench:
	$(PYTHON) benchmarks/simulation.py --json results/simulation.json
