# Two commands on a fresh machine:  make demo  |  make test        (`make help` lists every target)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PYTHON := $(VENV)/bin/python
BIN := $(abspath $(VENV)/bin)
export PATH := $(BIN):$(PATH)
export GX_ANALYTICS_ENABLED := false
UI_PORT ?= 5000
AGAINST ?= auto
# pip prints a warning per package for this machine's local mirrors; keep real messages only
PIP_FILTER := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: help demo test install lint data repro summary gate seeds bench ui ui-check docs docs-serve clean \
	server server-stop server-status cluster cluster-stop cluster-status sweep
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(PYTHON):
	python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PYTHON)
	@echo "installing into $(VENV) (first time: a few minutes)"
	@time ($(PYTHON) -m scripts.install ".[test,lint,export,remote,server,docs,cluster]" 2>&1 | $(PIP_FILTER))   # uv, with pip's settings
	$(PYTHON) -m scripts.offline_plots .dvc/plots_template.html   # dvc plots pages that render offline
	@touch $@

install: $(VENV)/.installed ## create .venv and install the project (once; again when pyproject.toml changes)

# The demo data set: scikit-learn's digits as an image folder. Your own folder at data/images is left as it is.
data/images: | install
	$(PYTHON) -m stages.demo_data --out data/images
	dvc add -q data/images

data: data/images ## write the demo images to data/images (unless it exists) and track them with DVC

repro: install data ## run the pipeline (dvc repro): only what changed re-runs
	@time dvc repro

summary: | install ## print the last run's results and where to look in MLflow
	@$(PYTHON) -m stages.summary --evaluate reports/evaluate/metrics.json --finetune metrics/finetune.json \
		--card models/finetuned/config.json --ui-port $(UI_PORT)

demo: repro summary ## fresh machine: install, demo data, the whole pipeline, a summary

# ruff (lint and format check; rules in pyproject.toml) and import-linter (the library's layers)
lint: install ## ruff (lint, format check) and the import contracts of stages/lib (lint-imports)
	ruff check .
	ruff format --check .
	lint-imports

test: install ## run the test suite (PYTEST_ARGS="-m 'not slow'" for the quick part)
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

gate: | install ## is the model worse than the champion (or AGAINST=file) beyond noise? exit 1 if so
	$(PYTHON) -m stages.gate --against $(AGAINST) --report reports/gate.md

# Every benchmark, each against a plain baseline in the same run (about 12 minutes on 2 quiet cores); writes
# benchmarks/results/*.json and the table benchmarks/results/summary.md. Torch keeps to BENCH_THREADS threads.
BENCH_THREADS ?= 1
bench: | install ## every benchmark beside a plain baseline; benchmarks/results/*.json and summary.md
	@uptime
	OMP_NUM_THREADS=$(BENCH_THREADS) MKL_NUM_THREADS=$(BENCH_THREADS) TQDM_DISABLE=1 bash -c '\
	  $(PYTHON) benchmarks/startup.py && \
	  $(PYTHON) benchmarks/validate.py && \
	  $(PYTHON) benchmarks/decode.py && \
	  $(PYTHON) benchmarks/features.py --threads $(BENCH_THREADS) && \
	  $(PYTHON) benchmarks/train.py'
	$(PYTHON) benchmarks/probe.py   # outside OMP_NUM_THREADS=1: OpenBLAS cannot raise its threads past it later
	@$(PYTHON) benchmarks/summary.py
	@uptime

seeds: | install ## mean ± std over the seed experiments (queue them first: see README)
	$(PYTHON) -m stages.seeds

ui: | install ## the MLflow UI on the local store at http://127.0.0.1:$(UI_PORT)
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

ui-check: | install ## screenshot the MLflow UI's key pages (headless chromium) and fail on an empty one
	$(PYTHON) -m scripts.ui_check --out .cache/ui_check

# The documentation site (mkdocs-material, docs/ and mkdocs.yml): strict, so a broken link or anchor fails the build
docs: | install ## build the documentation site into site/ (strict: broken links fail)
	mkdocs build --strict --site-dir site

docs-serve: | install ## serve the documentation at http://127.0.0.1:8000, rebuilt on every save
	mkdocs serve -a 127.0.0.1:8000

# The team's MLflow tracking server (PostgreSQL + proxied artifacts) in the background, state in $(TEAM_HOME)/:
#   make server [AUTH=1] [SERVER_PORT=5000] [PG_PORT=5433] [ARTIFACTS=s3://bucket/prefix]  |  make server-stop
TEAM_HOME ?= .team
SERVER_PORT ?= 5000
PG_PORT ?= 5433
AUTH ?= 0
ARTIFACTS ?=
SERVER_ARGS = --home $(TEAM_HOME) --port $(SERVER_PORT) --pg-port $(PG_PORT)

server: | install ## the team tracking server (PostgreSQL, proxied artifacts; AUTH=1: users) in the background
	@$(PYTHON) -m team.server start $(SERVER_ARGS) $(if $(filter 1 yes true,$(AUTH)),--auth) $(if $(ARTIFACTS),--artifacts $(ARTIFACTS))

server-stop: | install ## stop what make server started
	@$(PYTHON) -m team.server stop $(SERVER_ARGS)

server-status: | install ## is the team tracking server up (PIDs, health)
	@$(PYTHON) -m team.server status $(SERVER_ARGS)

# A local Ray cluster for sweeps (team/cluster.py), state in $(TEAM_HOME)/ray/; on Linux run it inside a
# loopback-only network namespace (docs/cluster.md), or ALLOW_NETWORK=1 where listening on the network is fine:
#   make cluster [NODES=2] [NODE_CPUS=1] [NODE_GPUS=0] [RAY_PORT=6380]  |  make cluster-stop
NODES ?= 2
NODE_CPUS ?= 1
NODE_GPUS ?= 0
RAY_PORT ?= 6380
CLUSTER_ARGS = --home $(TEAM_HOME)/ray --port $(RAY_PORT)

cluster: | install ## a local Ray head + worker nodes on 127.0.0.1 (NODES=2) in the background
	@$(PYTHON) -m team.cluster start $(CLUSTER_ARGS) --nodes $(NODES) --cpus $(NODE_CPUS) --gpus $(NODE_GPUS)

cluster-stop: | install ## stop what make cluster started (by PID, never `ray stop`)
	@$(PYTHON) -m team.cluster stop $(CLUSTER_ARGS)

cluster-status: | install ## is the local Ray cluster up (PIDs, alive nodes)
	@$(PYTHON) -m team.cluster status $(CLUSTER_ARGS)

sweep: | install ## a sweep of DVC experiments, on this machine or a Ray cluster: make sweep ARGS="--name x -S 'k=a,b'"
	$(PYTHON) -m team.sweep $(ARGS)

clean: ## remove pipeline outputs, caches and the local MLflow store (not data/images)
	rm -rf data/manifest.csv data/splits data/prepared data/features models reports .cache mlflow.db mlartifacts
