# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs the pinned requirements, and runs the main job on generated data
#   make test   creates .venv the same way (and .venv-deploy, the MONAI Deploy extra) and runs the test suite
#               (what CI runs)
PYTHON_BOOT ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEPLOY_VENV ?= .venv-deploy
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed

.PHONY: demo test lint install deploy-env dicom3tools chromium clean-outputs

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	# the project's library (import name clinseg), editable: bundles copied anywhere import it from here
	$(PYTHON) -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $(STAMP)

# the MONAI Deploy SDK and Holoscan in an environment of their own (see requirements-deploy.txt)
deploy-env: $(DEPLOY_STAMP)

$(DEPLOY_STAMP): requirements-deploy.txt
	$(PYTHON_BOOT) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install --disable-pip-version-check -q torch==2.13.0
	$(DEPLOY_VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements-deploy.txt
	touch $(DEPLOY_STAMP)

# Debian packages the tests need, installed with apt-get when their command is absent (CI runs as root on a fresh
# Debian machine; otherwise through sudo -n). $(call apt_command,COMMAND,PACKAGE,WHY)
SUDO := $(if $(filter 0,$(shell id -u)),,sudo -n)
define apt_command
	@command -v $(1) >/dev/null 2>&1 || { \
		echo "$(1) is absent: installing $(2) with apt-get"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(2); \
	}; \
	command -v $(1) >/dev/null 2>&1 || { \
		echo "error: $(1): could not be installed (apt-get install $(2), as root); $(3)" >&2; \
		exit 1; \
	}
endef

# dciodvfy validates every DICOM SEG the Deploy apps write
dicom3tools:
	$(call apt_command,dciodvfy,dicom3tools,tests/test_deploy.py needs it to validate the DICOM SEGs)

# Chromium for the browser test of the MLflow UI; Playwright drives it (its own browser download cannot work here)
chromium:
	$(call apt_command,chromium,chromium,tests/test_mlflow_ui.py needs it)

demo: $(STAMP)
	$(PYTHON) -m pipelines.demo

# The suite runs in TEST_WORKERS processes (pytest-xdist), one test file per worker at a time: a file's tests share
# their module fixtures (a trained model, a server). Most tests wait on bundle runs, servers and files as much as they
# compute, so one worker per logical core finishes sooner than one process; each worker's threads are capped at its
# share of the cores (tests/conftest.py). TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= logical

test: $(STAMP) $(DEPLOY_STAMP) dicom3tools chromium
	DEPLOY_PYTHON=$(abspath $(DEPLOY_VENV))/bin/python $(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-outputs:
	rm -rf bundles/*/outputs bundles/*/models/*.pt data/phantoms
