# Two entry points for a fresh clone (Python 3.11 and make are all they need):
#   make pipeline   create .venv, install the project, run `dvc repro`
#   make test       create .venv, install the project with test tools, run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup pipeline test test-all

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-installs only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

pipeline: setup
	. $(BIN)/activate && dvc repro

test: setup
	. $(BIN)/activate && pytest

test-all: setup
	. $(BIN)/activate && pytest -m ""
