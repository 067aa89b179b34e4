# Two commands for a fresh machine:  `make demo` (main job)  and  `make test` (test suite).
# Each creates .venv and installs what it needs; re-running skips what is already installed.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# torch/torchvision pinned to the wheels this project's machines carry; override for your CUDA build:
#   make test TORCH_SPEC="torch==2.11.0 torchvision==0.26.0"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv dev demo test lint bench-losses clean

$(VENV)/.installed-dev: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

dev: $(VENV)/.installed-dev

# Main job. Until the Gradio demo lands (issue 5) this is a real small job: a tiny ViT trained with VISReg
# on committed real Fashion-MNIST images, printing every loss term and the health of the embeddings.
demo: dev
	$(PY) -m training.smoke --steps 300

test: dev
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: dev
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench-losses: dev
	$(PY) benchmarks/losses.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
