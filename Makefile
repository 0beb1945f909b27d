# Three commands: `make run` (the whole pipeline), `make test` (lint + test suite) and
# `make demo` (draw a digit for the registered champion, in the browser).
# All create .venv from the pinned requirements first, once.
# For a team: `make tracking-server` starts a shared MLflow server (PostgreSQL backend, installed
# where missing), `make tracking-server-stop` stops it; options: SERVER_ARGS="--host 0.0.0.0".
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# A venv holds its own absolute path (script shebangs, the editable install). One that came along
# when the project folder was moved or copied would run, or fail to find, the old folder's code:
# the stamp records where it was built, and a venv found elsewhere is rebuilt.
VENV_MOVED := $(filter-out $(abspath $(VENV)),$(file < $(INSTALLED)))
# Stages call `python`, `dvc` and (when serving) `uvicorn` from the venv.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test demo lint format relocate-store clean-outputs FORCE tracking-server tracking-server-stop postgres

# The store is checked first: `dvc repro` deletes a stage's outputs before running it, and a stage
# that then finds the MLflow store unusable would leave them deleted (`dvc checkout` restores them).
run: $(INSTALLED)
	python -m mnist_mlops.store
	dvc repro

test: $(INSTALLED) lint
	pytest

# Options after DEMO_ARGS=, e.g. DEMO_ARGS="--port 8080" (python -m mnist_mlops.demo --help).
demo: $(INSTALLED)
	python -m mnist_mlops.demo $(DEMO_ARGS)

lint: $(INSTALLED)
	ruff check src tests benchmarks scripts
	ruff format --check src tests benchmarks scripts

format: $(INSTALLED)
	ruff check --fix src tests benchmarks scripts
	ruff format src tests benchmarks scripts

tracking-server: $(INSTALLED)
	python scripts/tracking_server.py start $(SERVER_ARGS)

tracking-server-stop: $(INSTALLED)
	python scripts/tracking_server.py stop $(SERVER_ARGS)

# PostgreSQL alone (tracking-server installs it too): for the tests' throwaway servers.
postgres: $(INSTALLED)
	python scripts/tracking_server.py install

$(INSTALLED): requirements.txt pyproject.toml $(if $(VENV_MOVED),FORCE)
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	$(if $(VENV_MOVED),@echo "$(VENV) was built in $(VENV_MOVED): rebuilding it here"; rm -rf $(VENV))
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps -e .
	echo $(abspath $(VENV)) > $@

# After the project folder was moved or copied: point the local MLflow store's recorded artifact
# locations at this folder's mlartifacts/ (stages refuse the store until then).
relocate-store: $(INSTALLED)
	python -m mnist_mlops.store --relocate

FORCE:

# Removes pipeline outputs and the local MLflow store (not the venv).
clean-outputs:
	rm -rf data/prepared models tuning evaluation reports mlflow.db mlflow.db.lock mlartifacts
