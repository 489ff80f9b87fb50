# Each target sets up .venv itself on a fresh machine (python3 -m venv + pip install -e '.[dev]').
# Pass overrides with ARGS, e.g. `make train ARGS="data.root=/data/cifar10 device=cuda"`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: train smoke lint test test-fast data clean-venv

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

train: $(BIN)/.installed  ## the full seed recipe on CIFAR-10 (downloads it and the ImageNet weights)
	$(BIN)/cbam-train $(ARGS)

smoke: $(BIN)/.installed  ## ~13 s CPU run on generated data (model.width=16), no downloads
	$(BIN)/cbam-train experiment=smoke $(ARGS)

lint: $(BIN)/.installed  ## ruff (style, bugs, import boundaries) and mypy (types) over the code: part of `make test`
	$(BIN)/ruff check cbam_train tests benchmarks
	$(BIN)/mypy

test: lint  ## lint, then the whole test suite (CPU, no network): what CI runs
	$(BIN)/python -m pytest $(ARGS)

test-fast: $(BIN)/.installed  ## the unit tests only: no subprocess runs, signals, torchrun or sweeps (marker `slow`)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

data: data/cifar10-jpeg/train  ## unpack the real CIFAR-10 training images (JPEG copy) from ../shared

data/cifar10-jpeg/train: ../shared/data/cifar10-jpeg/train.tar.gz
	mkdir -p data/cifar10-jpeg
	tar -xzf $< -C data/cifar10-jpeg
	touch $@

clean-venv:
	rm -rf $(VENV)
