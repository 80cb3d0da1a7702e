# Everything installs into a local venv from this project's own files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

PEERS := tests/peers/node_modules/.installed

.PHONY: probe demo test stress lint bench clean peers

$(STAMP): pyproject.toml setup.py uffd_async/_core/_native_lib.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The servers the tests run on loopback that do not come from PyPI: Azurite (npm, pinned by
# tests/peers/package-lock.json). Without npm this says so and the Azure tests fail, naming
# what is missing (UFFD_ASYNC_ALLOW_MISSING_PEERS=1 skips them instead).
$(PEERS): tests/peers/package.json tests/peers/package-lock.json
	@if command -v npm >/dev/null; then \
		cd tests/peers && npm ci --no-audit --no-fund --ignore-scripts && touch node_modules/.installed; \
	else \
		echo "peers: npm not found: the Azurite tests will fail (apt-get install nodejs npm)"; \
	fi

peers: $(PEERS)

probe: $(STAMP)
	$(PY) -m uffd_async probe

demo: $(STAMP)
	$(PY) examples/lazy_restore.py

# The default pytest options leave out the slow tests (see pyproject.toml).
test: lint peers
	$(PY) -m pytest

# The slow tests: a million faults under churn, long write tracking, and the fuzz
# tests with more (and fresh) examples. About six minutes on 2 cores.
stress: $(STAMP) peers
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
	rm -rf $(VENV) build *.egg-info uffd_async/_core/*.so tests/peers/node_modules
