# Two entry points for a fresh clone (Python 3.11 and make are all they need):
#   make pipeline   create .venv, install the project, run `dvc repro`
#   make test       create .venv, install the project with test tools, run the tests
#   make ui         the MLflow UI on http://127.0.0.1:5000, the light way (see README, Compare runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup pipeline test test-all ui

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

# MLflow 3.17's `mlflow ui` starts GenAI job runners and 4 workers: 15 processes, ~3.4 GB. Without
# them it is 2 processes, ~0.6 GB, and the runs table, run pages, charts and compare view all work.
ui: setup
	. $(BIN)/activate && MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --host 127.0.0.1 --port 5000 --workers 1
