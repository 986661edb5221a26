# Two entry points (see README):  make run   |   make test
# Both create .venv on first use and install visionattn (editable) with its dependencies.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.visionattn-installed

.PHONY: setup setup-mm run test lint gpu-test

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -c "import torch, torchvision, timm, visionattn; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
	touch $(STAMP)

# mmdet/mmseg stack for visionattn.mm (README, "Detection and segmentation"): builds mmcv's
# ops once into ~/.cache/visionattn/wheels (VISIONATTN_CACHE) and reuses the wheel after that.
MM_STAMP := $(VENV)/.visionattn-mm-installed
setup-mm: $(MM_STAMP)

$(MM_STAMP): $(STAMP) tools/install_mm.sh
	tools/install_mm.sh $(BIN)/python
	touch $(MM_STAMP)

run: setup
	$(BIN)/visionattn train $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# GPU-only tests (marker `gpu`): run on a machine with CUDA, e.g. the lent GPU (README).
gpu-test:
	python3 -m pytest -q -m gpu $(PYTEST_ARGS)
