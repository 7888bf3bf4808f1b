# The two commands a new user runs: `make demo` and `make test`.
# Both create (or reuse) a virtual environment in .venv and install the project into it.
#
# TORCH is the PyTorch requirement installed before the project (one requirement, not pip options).
# torch==2.13.0 is whatever build the package index serves: the CPU-only wheel on the development and CI
# machines (their pip finds it in a local wheel folder; about 190 MB), the CUDA build from the default
# index (PyPI) on Linux (several GB with its nvidia-* wheels). The CPU-only build from PyTorch's index:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make test TORCH=torch==2.13.0+cpu
# An existing .venv keeps its torch: remove it first (rm -rf .venv) to change builds.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
DEMO_DIR ?= demo
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-packaging demo demo2d bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Tests run over TEST_WORKERS processes (pytest-xdist), each with one OpenMP thread (two processes of two threads
# on two cores spin against each other). --dist loadgroup spreads the tests one by one, except the files marked
# xdist_group (a server or a trained run of their own), whose tests stay in one process so that it is made once.
# The slowest tests are listed at the end (--durations). Test ids must not change between processes (no
# timestamps in them). `make test-packaging` builds the wheel and installs it into a fresh venv (CI runs it too).
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
PYTEST_FLAGS ?=  # more pytest flags, e.g. PYTEST_FLAGS="--durations=0 -k serve"

test: $(STAMP)
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=25 $(PYTEST_FLAGS)

test-packaging: $(STAMP)
	$(PY) -m pytest -m packaging

# Phantoms (written once), a data check, training of configs/phantom_demo.yaml (run folder
# runs/demo; the mean organ Dice of the held-out cases on the training's 4 mm grid is printed after
# each validation, the per-organ table after the last), then the best model segments the held-out
# cases, keeping each organ's largest connected component, and their per-organ Dice is printed in
# each scan's own geometry (masks and pictures in runs/demo/validation).
# MODEL=swin_unetr|segresnet|dynunet|mednext trains that network instead (configs/phantom_demo_MODEL.yaml,
# run folder runs/demo_MODEL), with the same data, split and time budget.
MODEL ?= unetr
DEMO_CONFIG = $(if $(filter unetr,$(MODEL)),phantom_demo.yaml,phantom_demo_$(MODEL).yaml)
DEMO_RUN = $(if $(filter unetr,$(MODEL)),runs/demo,runs/demo_$(MODEL))
demo: $(STAMP) $(DEMO_DIR)/data/dataset.json
	$(VENV)/bin/btcv-unetr check-data --data_dir $(DEMO_DIR)/data --json_list dataset.json
	$(PY) main.py --config $(DEMO_CONFIG) --data_dir $(DEMO_DIR)/data --logdir $(DEMO_RUN) --overwrite
	$(PY) test.py --data_dir $(DEMO_DIR)/data --json_list dataset.json --pretrained_dir $(DEMO_RUN) \
		--pretrained_model_name model.pt --output_dir $(DEMO_RUN)/validation --overwrite --largest_component

# The 2D mode: synthetic pet trimaps (written once), a data check, training of configs/shapes2d.yaml
# (run folder runs/demo2d; a per-class Dice/IoU table after the last validation), then the best model
# segments the validation pictures: masks and colour overlays in runs/demo2d/validation.
demo2d: $(STAMP) $(DEMO_DIR)/pets/dataset.json
	$(VENV)/bin/btcv-unetr check-data --data_dir $(DEMO_DIR)/pets --json_list dataset.json --spatial_dims 2 \
		--in_channels 3 --out_channels 3
	$(PY) main.py --config shapes2d.yaml --data_dir $(DEMO_DIR)/pets --overwrite
	$(PY) test.py --data_dir $(DEMO_DIR)/pets --json_list dataset.json --pretrained_dir runs/demo2d \
		--pretrained_model_name model.pt --output_dir runs/demo2d/validation --overwrite --no_hd95

$(DEMO_DIR)/pets/dataset.json: | $(STAMP)
	$(VENV)/bin/btcv-unetr shapes2d --out $(DEMO_DIR)/pets --kind pet --cases 200 --size 128 --seed 0

# The benchmark's own test, then the reference-style path vs the fast path on this machine
# (benchmarks/bench.py); BENCH_FLAGS=--quick for a short run.
bench: $(STAMP)
	$(PY) -m pytest -m bench
	$(PY) benchmarks/bench.py $(BENCH_FLAGS)

$(DEMO_DIR)/data/dataset.json: | $(STAMP)
	$(VENV)/bin/btcv-unetr phantoms --out $(DEMO_DIR)/data --cases 24 --test_cases 2 --size 128 --seed 0

clean:
	rm -rf $(DEMO_DIR) runs outputs .pytest_cache
