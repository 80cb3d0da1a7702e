# Everything installs into a local venv from this project's own files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml setup.py uffd_async/_native_lib.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/lazy_restore.py

test: lint
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check uffd_async tests examples benchmarks
	$(PY) -m ruff format --check uffd_async tests examples benchmarks
	$(PY) -m mypy

# Builds benchmarks/c/*.c with cc -O2 into benchmarks/_build/, then measures.
bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info uffd_async/*.so
