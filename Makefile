# Tianping: two commands. `make demo` runs the main job; `make test` runs the tests.
# Both bootstrap what they need: a virtual environment in .venv with the project and its
# extras, and the Debian packages the real peers come from (mosquitto).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEB_PACKAGES := mosquitto curl openssl libssl-dev gcc postgresql chromium chromium-driver fonts-noto-cjk fonts-wqy-zenhei poppler-utils victoria-metrics systemd
PYTEST_ARGS ?=

.PHONY: all demo test lint typecheck deps venv clean

all: test

# deps first (order only): the C scanner of access logs builds against OpenSSL's headers (libssl-dev)
$(STAMP): pyproject.toml setup.py connectors/resolution/_scan.c | deps
	@echo "== setting up $(VENV) (Python virtual environment with tianping[dev])"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Debian packages for the real peers. Installed only when missing; says what it installs.
deps:
	@bash scripts/ensure-debs.sh $(DEB_PACKAGES)

demo: venv deps
	@$(PY) -m demo

test: venv deps
	@$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy protocol connectors agent verifier simulator demo bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
