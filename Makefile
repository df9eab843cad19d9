# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-fast bench-quick bench clean

setup: $(STAMP) $(FMNIST)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian: the real data used by the example, tests and benchmarks.
$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist

# Repair the bundled backdoored example and print ACC / ASR before and after.
demo: setup
	mkdir -p out
	$(BIN)/otbr-hub repair examples/badnets-resnet --output out/badnets-resnet-otbr --overwrite \
		--eval-dataset fashion_mnist --trigger examples/badnets-resnet/trigger.json

test: setup
	$(BIN)/python -m pytest -q -ra

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) out .pytest_cache
