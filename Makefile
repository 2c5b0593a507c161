# `make demo` runs the main job, `make test` the whole suite; both create or reuse .venv.
# torch is pinned and installed first: this machine holds the torch 2.13.0 CPU wheel, and an
# unpinned torch would pull a multi-GB CUDA build. constraints.txt pins what CI needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mixprec-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mixprec demo --json demo.json

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Every benchmark, side by side with the peers (Accelerate, Fabric: the `bench` extra);
# regenerates docs/benchmarks.md. Under 10 minutes on 2 idle CPU cores.
bench: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[bench]'
	$(BIN)/python benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) demo.json mixprec-demo
