# Two commands, each setting itself up on a fresh machine:
#   make demo   - the main job (see README)
#   make test   - the test suite (what CI runs)
# torch==2.13.0 is installed first: on this project's machines it is a local CPU build, and any other
# torch spec (or letting diffusers pull torch in) would download a multi-GB CUDA build.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tomediff-installed

.PHONY: setup data test test-all demo lint

# Fashion-MNIST (Debian's dataset-fashion-mnist) trains and evaluates the bundled demo model; the
# tests that read it need it. Installed with apt when missing (needs root, as on this project's machines).
FASHION_MNIST := /usr/share/datasets/fashion-mnist

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

data:
	@test -d $(FASHION_MNIST) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

test: $(STAMP) data
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks integrations
	$(VENV)/bin/ruff format --check src tests benchmarks integrations

demo: $(STAMP)
	$(VENV)/bin/tomediff demo
