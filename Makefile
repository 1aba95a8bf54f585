# Two commands: `make study` runs the notebook series end to end, `make test` runs the tests.
# Both build (once) a virtual environment outside the clone, keyed by the lock file, so CI reuses it.
SHELL := /bin/bash
PYTHON ?= python3
LOCK_HASH := $(shell sha256sum requirements.lock | cut -c1-12)
VENV ?= $(HOME)/.cache/portrait-studio/venv-$(LOCK_HASH)
PY := $(VENV)/bin/python
QUICK ?= 0
MODEL ?= auto
# open_clip only lends its CLIP BPE vocabulary file; its torchvision dependency is deliberately not installed.
OPEN_CLIP := open-clip-torch==3.3.0

.PHONY: venv study test toy-model clean-venv

venv: $(VENV)/.ready

$(VENV)/.ready: requirements.lock
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps $(OPEN_CLIP)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --user --name portrait-studio --display-name "portrait-studio" >/dev/null
	touch $@

study: venv
	$(PY) scripts/run_study.py --quick $(QUICK) --model $(MODEL)

test: venv
	$(PY) -m pytest

toy-model: venv
	$(PY) scripts/train_toy.py
	$(PY) scripts/train_toy_evaluators.py

clean-venv:
	rm -rf $(VENV)
