# Thin wrapper so a fresh clone needs exactly one command per job (see README). Project commands live in tasks.py.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# glibc malloc otherwise returns memory to the OS after every step and page-faults it back (~1.5x slower training).
export MALLOC_MMAP_THRESHOLD_ ?= 4294967296
export MALLOC_TRIM_THRESHOLD_ ?= 68719476736
export MALLOC_TOP_PAD_ ?= 1073741824
export WANDB_MODE ?= offline

.PHONY: setup pipeline test lint clean

$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e ".[train,dev]"
	touch $@

setup: $(BIN)/.installed  ## Create .venv with the pinned dependencies.

pipeline: setup  ## The main job on the bundled sample: data -> train -> evaluate -> export.
	$(BIN)/leaflens pipeline experiment=quickstart

# One thread per xdist worker: two workers with two threads each on 2 cores spin-wait and run several times slower.
test: setup  ## The test suite with coverage.
	OMP_NUM_THREADS=1 $(BIN)/pytest -n 2 --cov --cov-report=term --cov-report=xml

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

clean:
	rm -rf $(VENV) outputs .pytest_cache .coverage* coverage.xml
