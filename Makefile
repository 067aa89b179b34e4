# Two commands for a fresh machine:  `make demo` (main job)  and  `make test` (test suite).
# Each creates .venv and installs what it needs; re-running skips what is already installed.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# torch/torchvision pinned to the wheels this project's machines carry; override for your CUDA build:
#   make test TORCH_SPEC="torch==2.11.0 torchvision==0.26.0"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Extra arguments for the demo, e.g.  make demo DEMO_ARGS="--gallery ~/photos --port 8080"
DEMO_ARGS ?=
# Test processes (pytest-xdist): one per core, at most 8 (each holds torch); TEST_WORKERS=0: one process.
# `make test` ends with the 25 slowest tests, for whoever keeps the run under its 10 minutes.
TEST_WORKERS ?= auto --maxprocesses 8

.PHONY: dev demo test browser lint bench-losses clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)

$(VENV)/.installed-demo: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[demo]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[dev]"
	touch $@ $(VENV)/.installed-demo  # [dev] holds every package of [demo]: `make demo` needs no install

dev: $(VENV)/.installed-dev

# Main job: the Gradio app on the bundled model and gallery, offline, at http://127.0.0.1:7860
demo: $(VENV)/.installed-demo
	GRADIO_ANALYTICS_ENABLED=False $(PY) -m demo.app $(DEMO_ARGS)

# Headless Chromium + ChromeDriver from Debian for the browser tests (needs root, as on CI).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "warning: /usr/bin/chromium missing and not root: browser tests will be skipped"; fi; \
	fi

test: dev browser
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=25

lint: dev
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench-losses: dev
	$(PY) benchmarks/losses.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
