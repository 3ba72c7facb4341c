# Two commands on a fresh machine:  make demo  |  make test
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PYTHON := $(VENV)/bin/python
BIN := $(abspath $(VENV)/bin)
export PATH := $(BIN):$(PATH)
export GX_ANALYTICS_ENABLED := false
# pip prints a warning per package for this machine's local mirrors; keep real messages only
PIP_FILTER := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: demo test install data repro summary ui clean server server-stop server-status
.DEFAULT_GOAL := demo

$(PYTHON):
	python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PYTHON)
	@echo "installing into $(VENV) (first time: a few minutes)"
	@time ($(PYTHON) -m pip install -q --upgrade pip 2>&1 | $(PIP_FILTER))
	@time ($(PYTHON) -m pip install -q -e ".[test,export,server]" 2>&1 | $(PIP_FILTER))
	@touch $@

install: $(VENV)/.installed

# The demo data set: scikit-learn's digits as an image folder. Your own folder at data/images is left as it is.
data/images: | install
	$(PYTHON) -m stages.demo_data --out data/images
	dvc add -q data/images

data: data/images

repro: install data
	@time dvc repro

summary: | install
	@$(PYTHON) -m stages.summary

demo: repro summary

test: install
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

ui: | install
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db

# The team's MLflow tracking server (PostgreSQL + proxied artifacts) in the background, state in $(TEAM_HOME)/:
#   make server [AUTH=1] [PORT=5000] [PG_PORT=5433] [ARTIFACTS=s3://bucket/prefix]  |  make server-stop
TEAM_HOME ?= .team
PORT ?= 5000
PG_PORT ?= 5433
AUTH ?= 0
ARTIFACTS ?=
SERVER_ARGS = --home $(TEAM_HOME) --port $(PORT) --pg-port $(PG_PORT)

server: | install
	@$(PYTHON) -m team.server start $(SERVER_ARGS) $(if $(filter 1 yes true,$(AUTH)),--auth) $(if $(ARTIFACTS),--artifacts $(ARTIFACTS))

server-stop: | install
	@$(PYTHON) -m team.server stop $(SERVER_ARGS)

server-status: | install
	@$(PYTHON) -m team.server status $(SERVER_ARGS)

clean:
	rm -rf data/manifest.csv data/splits data/prepared data/features models reports checkpoints .cache mlflow.db mlartifacts
