# medvit: `make demo` sets everything up and runs the demo study; `make test` sets up and runs the tests.
# Both create ./.venv with Python 3.11 and the pinned dependencies from pyproject.toml.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
CORES  ?= 2
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test test-all lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

demo: setup
	$(BIN)/snakemake --cores $(CORES) --profile workflows/profiles/local

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/snakemake --lint --cores 1

clean:
	rm -rf results .snakemake
