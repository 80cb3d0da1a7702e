# Everything installs into a local venv from this project's own files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: probe demo test stress lint bench clean

$(STAMP): pyproject.toml setup.py uffd_async/_core/_native_lib.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

probe: $(STAMP)
	$(PY) -m uffd_async probe

demo: $(STAMP)
	$(PY) examples/lazy_restore.py

# The default pytest options leave out the slow tests (see pyproject.toml).
test: lint
	$(PY) -m pytest

# The slow tests: a million faults under churn, long write tracking, and the fuzz
# tests with more (and fresh) examples. About six minutes on 2 cores.
stress: $(STAMP)
	$(PY) -m pytest -m slow
	UFFD_ASYNC_FUZZ_EXAMPLES=300 $(PY) -m pytest tests/test_hostile.py

lint: $(STAMP)
	$(PY) -m ruff check uffd_async tests examples benchmarks tools
	$(PY) -m ruff format --check uffd_async tests examples benchmarks tools
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

# Builds benchmarks/c/*.c with cc -O2 into benchmarks/_build/, then measures.
bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info uffd_async/_core/*.so
