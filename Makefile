# One environment for everything: `make demo` and `make test` both create/update .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, pinned, so pip never pulls a multi-GB CUDA build by accident.
# On a GPU machine: make TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.sidecache-installed
STORES ?= stores

.PHONY: setup demo glue test test-slow check lint typecheck bench-stage-one clean

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "sidecache needs Python 3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/python -m pip install --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# dvc runs `sidecache stage ...` (dvc.yaml): it must find this environment's commands first
export PATH := $(abspath $(BIN)):$(PATH)
GLUE_DIR ?= ../shared/data/glue

# The main job: `dvc repro` = cache MiniLM's hidden states of BBC News once, train READ, LST
# and two probes from them in one pass, re-evaluate, write results/report/report.html.
demo: $(STAMP)
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show
	@echo "report: results/report/report.html (and report.md)"

# Every GLUE task found under GLUE_DIR (folders in the GLUE TSV layout), as a DVC experiment.
glue: $(STAMP)
	$(BIN)/dvc exp run -S "glue_dir=$(GLUE_DIR)" \
		-S "tasks=$$($(BIN)/sidecache stage tasks --glue $(GLUE_DIR))"
	$(BIN)/dvc metrics show

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

bench-stage-one: $(STAMP)
	$(BIN)/python -m benchmarks.stage_one --repeats 2

clean:
	rm -rf $(VENV) $(STORES) outputs results dvc.lock .dvc/tmp .pytest_cache .mypy_cache .ruff_cache
