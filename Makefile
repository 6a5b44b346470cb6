# The README's commands live here. Everything installs into .venv with the one constraints file
# (it pins torch to the CPU build; without it pip pulls a multi-GB CUDA build).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --progress-bar off -c constraints.txt
DEMO_JOB ?= jobs.vatt
DEMO_CONFIG ?= jobs/vatt/configs/tiny.yaml

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# DeepSpeed compiles its CPU ops once; keep them between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_DEDUP_LOGS ?= 0

.PHONY: install tools demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -q -U pip setuptools wheel
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Test tools from Debian: promtool (package prometheus) checks the metrics exposition.
tools:
	@command -v promtool >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@promtool --version | head -1

# Start the embedded local cluster, run the main job end to end through `ray job submit`, stop the cluster.
demo: install
	labtrain cluster up
	status=0; ray job submit --working-dir . -- python -m $(DEMO_JOB) --config $(DEMO_CONFIG) || status=$$?; \
	  labtrain cluster down; exit $$status

test: install tools
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

bench: install
	$(PY) bench/data.py
	$(PY) bench/overhead.py

clean:
	-labtrain cluster down
	rm -rf runs .labtrain .pytest_cache
