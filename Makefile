# The two commands of the README (demo, test). Each creates .venv when missing and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.spo_fast-installed

.PHONY: demo test lint bench bench-quick test-distributed build-ext

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch (an unpinned torch would pull a multi-GB CUDA build on a fresh machine).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,deepspeed,data]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m spo_fast.train --overwrite

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q --durations=15  # the slowest tests in the log: CI must stay under 25 minutes

test-distributed: $(STAMP)
	$(PY) -m pytest -q -m distributed tests/test_distributed.py

build-ext: $(STAMP)
	SPO_FAST_BUILD_EXT=1 $(PY) -m pip install -q -e . --no-build-isolation --no-deps

bench: $(STAMP)
	$(PY) bench/run_all.py

bench-quick: $(STAMP)
	$(PY) bench/run_all.py --quick
