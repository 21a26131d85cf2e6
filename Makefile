# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs the pinned requirements, and runs the main job on generated data
#   make test   creates .venv the same way and runs the test suite (what CI runs)
PYTHON_BOOT ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean-outputs

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m pipelines.demo

test: $(STAMP)
	$(PYTHON) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-outputs:
	rm -rf bundles/*/outputs bundles/*/models/*.pt data/phantoms
