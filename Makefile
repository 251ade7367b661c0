# ssmooth: `make demo` and `make test` set everything up themselves (a .venv at the repo root).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# One thread per process: several processes with default threads oversubscribe a small CPU (up to 20x slower).
THREADS := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
SHARED ?=
SMOKE ?= 0

.PHONY: install demo test test-all reproduce-mnist reproduce-cifar10 bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

## The main job on scikit-learn's 8x8 digits: pretrain at sigma 0.25, finetune per-sample levels, certify.
demo: install
	$(BIN)/ssmooth-train

## The default suite (slow tests deselected); `make test-all` runs everything. Tests on real data or published
## files run with SSMOOTH_DATA=DIR (MNIST / CIFAR-10 .npz) and SSMOOTH_PUBLISHED=DIR, and are skipped, saying so, without.
test: install
	$(THREADS) $(BIN)/python -m pytest -m "not slow" -q

test-all: install
	$(THREADS) $(BIN)/python -m pytest -q

## Published protocols (docs/METHOD.md); SHARED=DIR reads npz files from DIR, else torchvision downloads; SMOKE=1 runs the same pipeline at toy size on a CPU in minutes.
reproduce-mnist: install
	SMOKE=$(SMOKE) SHARED=$(SHARED) bash scripts/reproduce.sh mnist

reproduce-cifar10: install
	SMOKE=$(SMOKE) SHARED=$(SHARED) bash scripts/reproduce.sh cifar10

bench: install
	$(BIN)/python benchmarks/certify_throughput.py
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf outputs/runs outputs/sweeps .pytest_cache
