# medvit: `make demo` sets everything up and runs the demo study; `make test` sets up and runs the tests.
# Both create ./.venv with Python 3.11 and the pinned dependencies from pyproject.toml.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
CORES  ?= 2
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test test-slurm studies test-all lint clean bench bench-quick bench-quality

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

demo: setup
	$(BIN)/snakemake --cores $(CORES) --profile workflows/profiles/local

# The SLURM integration test needs root (it installs and starts a one-node SLURM): CI runs
# it with `make test-slurm` (-m slurm); every other pytest run leaves it out (pyproject's addopts).
# Tests run in parallel (pytest-xdist), one worker per core but at most one per 3 GiB of
# available memory (a workflow test runs Snakemake with two training jobs at once); a test
# file stays on one worker, so a module's shared Snakemake run is made once. TEST_WORKERS=0
# runs them in this process.
TEST_WORKERS ?= $(or $(shell awk -v n=$$(nproc 2>/dev/null || echo 1) '/MemAvailable/ {m = int($$2 / 3145728); print (m < 1 ? 1 : (m < n ? m : n))}' /proc/meminfo 2>/dev/null),auto)
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

test-slurm: setup
	$(BIN)/python -m pytest -q -m slurm tests/test_slurm.py

# Several studies at once, one Snakemake per study, all in parallel in this directory:
#   make studies STUDIES="workflows/studies/a.yaml workflows/studies/b.yaml" PROFILE=workflows/profiles/slurm
# Each study writes only under results/<study>/ (distinct names are checked first), so the
# runs cannot touch each other's files; --nolock because Snakemake's lock folder is shared by
# every run in a directory and the first run to finish would delete the others' locks.
STUDIES ?=
PROFILE ?= workflows/profiles/local
SNAKEMAKE_ARGS ?=
studies: setup
	@test -n "$(STUDIES)" || { echo "error: set STUDIES to one or more study files"; exit 2; }
	$(BIN)/python -c "import sys; from medvit.config import load_study; n = [load_study(f)['study'] for f in sys.argv[1:]]; d = sorted({x for x in n if n.count(x) > 1}); sys.exit('error: two studies are named ' + ', '.join(d) + ': both would write results/<study>/' if d else 0)" $(STUDIES)
	printf '%s\n' $(STUDIES) | xargs -P 0 -I{} $(BIN)/snakemake --profile $(PROFILE) --nolock $(SNAKEMAKE_ARGS) --configfile {}

# Every benchmark in one run -> benchmarks/RESULTS.md (docs/performance.md); bench-quick: minutes.
bench: setup
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

bench-quick: setup
	$(BIN)/python benchmarks/run_all.py --quick $(BENCH_ARGS)

# Every real-data study, one after the other (each finishes or resumes where it stopped), then
# benchmarks/QUALITY.md from their result files. The LGG study reads ../shared/data beside the
# repository; a study file absent from the checkout is listed as such. QUALITY_STUDIES picks some.
QUALITY_STUDIES ?= pneumonia nih_cxr14 lgg_brain kather_histo
bench-quality: setup
	for s in $(QUALITY_STUDIES); do \
	  if [ -f workflows/studies/$$s.yaml ]; then \
	    $(BIN)/snakemake --cores $(CORES) --profile $(PROFILE) $(SNAKEMAKE_ARGS) --configfile workflows/studies/$$s.yaml || exit $$?; \
	  fi; \
	done
	$(BIN)/python benchmarks/quality.py --studies $(QUALITY_STUDIES)

# Python (ruff, settings in pyproject.toml) and the workflow (Snakemake's own linter).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/snakemake --lint --cores 1

clean:
	rm -rf results .snakemake
