# Set-up and the main jobs. Each target creates or reuses .venv and installs what it needs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install tritons data photos demo test test-all test-gpu-versions docs ci-fresh clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,docs]'
	touch $(STAMP)

install: $(STAMP)

# More Triton releases to compile the GPU kernels with, beside the installed one: the release of the
# last GPU run (benchmarks/results/gpu/environment.txt). Each goes into .tritons/VERSION, which
# tests/test_kernels_target_compile.py puts ahead of the installed Triton in a process of its own.
# Triton ships for Linux only (as the test extra installs it).
ifeq ($(shell uname -s),Linux)
TRITONS ?= 3.6.0
else
TRITONS ?=
endif
TRITON_STAMPS := $(TRITONS:%=.tritons/%/.installed)

.tritons/%/.installed: | $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --target .tritons/$* triton==$*
	touch $@

tritons: $(STAMP) $(TRITON_STAMPS)

# Debian packages of the built-in training datasets (emoji font, Unicode emoji list, Fashion-MNIST),
# and of the extra photos used to train and evaluate image tokenizers (wallpapers).
# Each target installs only what is missing; that needs root.
DATA_PACKAGES := fonts-noto-color-emoji unicode-data dataset-fashion-mnist
PHOTO_PACKAGES := mate-backgrounds plasma-workspace-wallpapers

define apt_install
	@missing=$$(for p in $(1); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "packages present: $(1)"; exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "run as root: apt-get install -y $$missing"; exit 1; fi; \
	echo "installing $$missing"; \
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing
endef

data:
	$(call apt_install,$(DATA_PACKAGES))

photos:
	$(call apt_install,$(PHOTO_PACKAGES))

# The shipped model (nextstep/pretrained/emoji-shapes-64): no download, a few seconds on a CPU.
DEMO_PROMPTS := "a red circle to the left of a blue square" "three yellow triangles" \
	"a purple square and a green circle" "grinning face with smiling eyes" "red heart" "flag of France"

demo: $(STAMP)
	$(PY) -m nextstep generate $(DEMO_PROMPTS) --num-images 4 --grid --output outputs/demo --overwrite
	@echo "demo images in outputs/demo/ (grid.png: one row per prompt)"

# TRITON_INTERPRET=1: the fused kernels run on CPU tensors through Triton's interpreter, so the
# kernel tests check them against their PyTorch references without a GPU (it must be set before
# anything imports Triton).
test: $(STAMP) tritons data
	TRITON_INTERPRET=1 $(PY) -m pytest -m "not slow" -q -n 2

test-all: $(STAMP) tritons data
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2

# The fast tier under the PyTorch of the last GPU run (benchmarks/results/gpu/environment.txt) and the
# Triton it pins, in a venv of their own (about 5 GB: PyPI's PyTorch is a CUDA build, which also runs
# on the CPU). NumPy stays below 2.4 there, which Triton's interpreter before 3.7 needs.
GPU_TORCH ?= 2.11.0
GPU_VENV := .venv-torch-$(GPU_TORCH)

test-gpu-versions: data
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --disable-pip-version-check torch==$(GPU_TORCH) 'numpy<2.4'
	$(GPU_VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 'numpy<2.4'
	TRITON_INTERPRET=1 $(GPU_VENV)/bin/python -m pytest -m "not slow" -q -n 2

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# CI on the committed tree as a fresh machine sees it: a clone in a temporary folder (with its own
# .venv, about 3 GB) runs .ci/run and is removed afterwards, whether CI passed or not.
ci-fresh:
	@dir=$$(mktemp -d) && trap 'rm -rf "$$dir"' EXIT && git clone -q . "$$dir" && cd "$$dir" && CI=true bash .ci/run

clean:
	rm -rf $(VENV) .venv-torch-* .tritons site outputs .pytest_cache .hypothesis
