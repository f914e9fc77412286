# Two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Kernels compile once per process and are cached next to the sources.
export NUMBA_CACHE_DIR ?= $(CURDIR)/.venv/numba_cache

.PHONY: demo test test-all bench bytecode clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: setup.py $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	$(MAKE) bytecode
	touch $@

# An editable install leaves the project's modules uncompiled, and where
# PYTHONDONTWRITEBYTECODE is set (CI, these machines) every run then compiles the ~100 it
# imports (~0.2 s CPU of a 1e6 sweep's run; issue 10). compileall writes them as a wheel
# install does; a module edited later is recompiled in memory until the next `make bytecode`.
bytecode:
	$(BIN)/python -m compileall -q dials_vmerge command_line

$(VENV)/.installed-test: setup.py Makefile $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test,mpi]"  # mpi: mpich + mpi4py, so the MPI tests run
	touch $@

demo: $(VENV)/.installed
	rm -rf demo_output && mkdir -p demo_output
	cd demo_output && ../$(BIN)/dials.vmerge ../examples/integrated.expt ../examples/integrated.refl \
		partiality_cutoff=0.4
	@echo
	@echo "Demo outputs (scaled quartz sweep, from dials/data-files) are in $(CURDIR)/demo_output:"
	@ls -1 demo_output | sed 's/^/  /'
	@echo "Report (open in a browser): $(CURDIR)/demo_output/dials.vmerge.html"

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests

bench: $(VENV)/.installed-test bytecode
	$(BIN)/python benchmarks/run.py --sizes 1e5,1e6,1e7 --kernel-only-sizes 1e8 --out bench_results.json

clean:
	rm -rf $(VENV) demo_output build *.egg-info
