# Set-up and the main jobs. Each target creates or reuses .venv and installs what it needs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all docs clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,docs]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m nextstep generate "a red circle to the left of a blue square" "grinning face with smiling eyes" \
		--model tiny --height 64 --width 64 --steps 20 --cfg 3.0 --num-images 2 --grid --output outputs/demo
	@echo "demo images in outputs/demo/"

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q -n 2

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) site outputs .pytest_cache .hypothesis
