# The two commands a new user runs: `make demo` and `make test`.
# Both create (or reuse) a virtual environment in .venv and install the project into it.
#
# TORCH is the PyTorch requirement installed before the project. The default, torch==2.13.0, is a
# CPU wheel (what the development and CI machines use); on a GPU machine use e.g.
#   make demo TORCH=torch
# to get the CUDA build that pip picks for your platform.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
DEMO_DIR ?= demo
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# Phantoms (written once), a data check, then training of configs/phantom_demo.yaml; the run
# folder is runs/demo and the per-organ Dice of the held-out cases is printed at the end.
demo: $(STAMP) $(DEMO_DIR)/data/dataset.json
	$(VENV)/bin/btcv-unetr check-data --data_dir $(DEMO_DIR)/data --json_list dataset.json
	$(PY) main.py --config phantom_demo.yaml --data_dir $(DEMO_DIR)/data

# Reference-style path vs fast path (benchmarks/bench.py); BENCH_FLAGS=--quick for a short run.
bench: $(STAMP)
	$(PY) benchmarks/bench.py $(BENCH_FLAGS)

$(DEMO_DIR)/data/dataset.json: | $(STAMP)
	$(VENV)/bin/btcv-unetr phantoms --out $(DEMO_DIR)/data --cases 24 --test_cases 2 --size 128 --seed 0

clean:
	rm -rf $(DEMO_DIR) runs outputs .pytest_cache
