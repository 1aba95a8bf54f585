# Two commands: `make study` runs the notebook series end to end, `make test` runs the tests.
# Both build (once) a virtual environment outside the clone, keyed by the lock file, so CI reuses it.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
LOCK_HASH := $(shell sha256sum requirements.lock | cut -c1-12)
VENV ?= $(HOME)/.cache/portrait-studio/venv-$(LOCK_HASH)
PY := $(VENV)/bin/python
# The checkout being run always provides nbutils (the venv is shared by every clone with the same lock file).
export PYTHONPATH := $(CURDIR)
QUICK ?= 0
# `make study` resumes the newest interrupted study of the same options; FRESH=1 starts a new one.
FRESH ?= 0
# open_clip only lends its CLIP BPE vocabulary file; its torchvision dependency is deliberately not installed.
OPEN_CLIP := open-clip-torch==3.3.0
# pip names every configured package location that lacks a package ("WARNING: Location ... is ignored"); hide that
# noise, keep everything else (pipefail keeps pip's exit status).
PIP_FILTER := 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }

.PHONY: venv study portrait lab test test-sd15 toy-model toy-evaluators toy-encoders clean-venv

venv: $(VENV)/.ready

# No file prerequisite: the folder name already carries the lock file's hash, and a fresh clone's newer file
# times must not trigger a rebuild of a venv that matches it.
$(VENV)/.ready:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(PIP_FILTER)
	$(PY) -m pip install -q -r requirements.lock $(PIP_FILTER)
	$(PY) -m pip install -q --no-deps $(OPEN_CLIP) $(PIP_FILTER)
	$(PY) -m pip install -q --no-deps -e . $(PIP_FILTER)
	$(PY) -m ipykernel install --user --name portrait-studio --display-name "portrait-studio" >/dev/null
	touch $@

study: venv
	$(PY) scripts/run_study.py --quick $(QUICK) $(if $(MODEL),--model $(MODEL)) $(if $(SEED),--seed $(SEED)) \
		$(if $(SEEDS),--seeds $(SEEDS)) $(if $(ONLY),--only $(ONLY)) $(if $(GPUS),--gpus $(GPUS)) \
		$(if $(filter 1,$(FRESH)),--fresh) $(foreach p,$(PARAMS),--param '$(p)')

# `make portrait PHOTOS=data/me SCENE="on the beach" STYLE=watercolor METHOD=auto ROUTE=prompt`: notebook 09 in one
# papermill call, into its own run folder under runs/ (defaults: the tier's demo subject; see the README).
PORTRAIT_ARGS = $(if $(PHOTOS),--photos "$(PHOTOS)") $(if $(SCENE),--scene "$(SCENE)") \
	$(if $(STYLE),--style "$(STYLE)") $(if $(METHOD),--method "$(METHOD)") $(if $(ROUTE),--route "$(ROUTE)") \
	$(if $(STYLE_IMAGE),--style-image "$(STYLE_IMAGE)") $(if $(MODEL),--model "$(MODEL)") \
	$(if $(SEED),--seed $(SEED)) $(if $(OUT),--out "$(OUT)") $(if $(filter 1,$(ALLOW_TOY_PHOTOS)),--allow-toy-photos 1)

portrait: venv
	$(PY) scripts/make_portrait.py --quick $(QUICK) $(strip $(PORTRAIT_ARGS))

# `make lab`: JupyterLab on notebooks/, from the venv; new notebooks get its kernel "portrait-studio", registered
# again first since that name is per user and another clone's venv may have taken it, and the committed ones run in
# the same Python whichever of its two names they record. It serves on localhost and prints the address with its
# token; Ctrl-C twice stops it. Jupyter refuses root without --allow-root.
LAB_ARGS = --ServerApp.root_dir=notebooks --MappingKernelManager.default_kernel_name=portrait-studio \
	$(if $(filter 0,$(shell id -u)),--allow-root)

lab: venv
	$(PY) -m ipykernel install --user --name portrait-studio --display-name "portrait-studio" >/dev/null
	$(VENV)/bin/jupyter lab $(strip $(LAB_ARGS))

test: venv
	$(PY) -m pytest

# `make test-sd15`: notebooks 01-05 in QUICK mode on SD1.5's architecture with random weights at 128 px (MODEL
# sd15-random: built on first use, 4.3 GB, cached outside the clone), into runs/test-sd15/: the real tier's code
# paths on a CPU (CLIP ViT-L-sized text encoder, 860M-parameter UNet, 8x VAE, dlib faces, gradient checkpointing,
# the 8-bit Adam fallback). Shortened by SD15_PARAMS; it resumes like `make study`. Not part of `make test`.
SD15_PARAMS ?= STEPS=2 CHECKPOINT_EVERY=2 N_SAMPLES=1 N_PER_IMAGE=1 SWEEP_RANKS=[4] N_CLASS_IMAGES=2 \
	MIX_STEPS=1 N_MIX=1 OPTIMIZER=adamw8bit

test-sd15: venv
	PORTRAIT_STUDIO_RESOLUTION=128 $(PY) scripts/run_study.py --quick 1 --model sd15-random --only 01,02,03,04,05 \
		--out runs/test-sd15 $(foreach p,$(SD15_PARAMS),--param '$(p)')

# The toy model conditions on the committed toy CLIP's text tower (data/models/toy-clip); `make toy-evaluators`
# retrains that CLIP and the other toy evaluators (run it first to rebuild the whole chain from scratch).
toy-model: venv
	$(PY) scripts/train_toy.py

toy-evaluators: venv
	$(PY) scripts/train_toy_evaluators.py

# The encoders of notebook 06 (E4T, IP-Adapter), pretrained on the toy world's people under the committed toy model
# (data/models/toy-encoders/); each script resumes from its newest checkpoint.
toy-encoders: venv
	$(PY) scripts/train_toy_e4t.py
	$(PY) scripts/train_toy_ip_adapter.py

clean-venv:
	rm -rf $(VENV)
