# `make demo` and `make test` do all set-up on a fresh Debian machine: a virtual environment, a CPU build of
# torch where there is no CUDA, the package with its dev extras, and the Fashion-MNIST files.
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The CPU wheel; on a machine with an NVIDIA driver pip's default (CUDA) build is taken instead.
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test test-timm test-slow gpu-check mutants lint docs data venv clean

demo: venv data
	$(VENV)/bin/dfkd demo

test: venv data
	$(PY) -m pytest -q -m "not slow"

# timm and torchvision for real: timm imports torchvision, whose PyPI wheels are CUDA builds that do not import beside
# the CPU-only torch of `make test`. So these tests get their own venv with torch and torchvision together (a CUDA
# build of several GB that also runs on a CPU; CI runs it after `make test`).
TIMM_VENV ?= .venv-timm
TIMM_TORCH ?= torch==2.14.1 torchvision==0.29.1
test-timm: data
	test -x $(TIMM_VENV)/bin/python || python3 -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install -q --upgrade pip
	$(TIMM_VENV)/bin/python -c "import torchvision" 2>/dev/null || $(TIMM_VENV)/bin/python -m pip install -q $(TIMM_TORCH)
	$(TIMM_VENV)/bin/python -m pip install -q -e '.[dev,timm]'
	DFKD_REQUIRE_TIMM=1 $(TIMM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_sources.py -k "timm or torchvision"

test-slow: venv data
	$(PY) -m pytest -q -m slow

# The first thing to run on a GPU machine: one short epoch of every method in fp32 and in bf16 + channels_last
# (ResNet-34 -> ResNet-18 on Fashion-MNIST as 3x32x32, batch 512); a table of speed, memory and finite losses. A rerun
# replaces the previous check (--overwrite).
gpu-check: venv data
	$(VENV)/bin/dfkd bench gpu-check --overwrite

# The mutation pass of docs/mutation-pass.md: each guard and refusal broken on purpose must fail a test (minutes).
mutants: venv
	$(PY) tools/mutants.py

# ruff, and the import contract of pyproject.toml: the layers import downward only, no cycles (import-linter)
lint: venv
	$(VENV)/bin/ruff check src tests tools
	$(VENV)/bin/lint-imports --no-cache

# The documentation site (mkdocs.yml) into site/: --strict fails on a broken link, a missing page or an API reference
# that does not resolve. mkdocstrings reads src/ without importing it, so this needs only the `docs` extra's tools
# (the same list as pyproject.toml's), not torch: it installs them into $(VENV) when they are missing.
DOCS_TOOLS ?= 'mkdocs>=1.6' 'mkdocs-material>=9.5' 'mkdocstrings[python]>=0.26'
docs:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import material, mkdocstrings_handlers.python" 2>/dev/null || $(PY) -m pip install -q $(DOCS_TOOLS)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "torch>=2.3"; \
	  else $(PY) -m pip install -q "$(TORCH_CPU)"; fi; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist; skipped when DFKD_DATA points elsewhere or apt is not usable.
data:
	@if [ -e "$(FMNIST)" ] || [ -e "$${DFKD_DATA:-/nonexistent}/fashion-mnist/train-images-idx3-ubyte.gz" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else \
	  echo "note: Fashion-MNIST is missing and apt-get needs root: run 'apt-get install dataset-fashion-mnist' as root"; exit 0; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
	  || echo "note: could not install dataset-fashion-mnist; tests that need it will be skipped"

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache
