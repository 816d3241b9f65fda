# One environment for everything: `make demo` and `make test` both create/update .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, pinned, so pip never pulls a multi-GB CUDA build by accident.
# On a GPU machine: make TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.sidecache-installed
STORES ?= stores
DEMO_FLAGS ?= --backbone minilm --data bbc --max-length 128 --positions all --dtype bfloat16

.PHONY: setup demo test test-slow check lint typecheck bench-stage-one clean

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "sidecache needs Python 3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/python -m pip install --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

DEMO_SIDENETS ?= --sidenet read --sidenet lst --sidenet linear --sidenet mlp
DEMO_EPOCHS ?= 3

demo: $(STAMP)
	$(BIN)/sidecache cache $(DEMO_FLAGS) --split train --out $(STORES)/bbc-train
	$(BIN)/sidecache cache $(DEMO_FLAGS) --split dev --out $(STORES)/bbc-dev
	$(BIN)/sidecache verify $(STORES)/bbc-dev --samples 4
	$(BIN)/sidecache inspect $(STORES)/bbc-train
	$(BIN)/sidecache train --train $(STORES)/bbc-train --eval $(STORES)/bbc-dev \
		$(DEMO_SIDENETS) --epochs $(DEMO_EPOCHS) --out outputs/bbc

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
	rm -rf $(VENV) $(STORES) .pytest_cache .mypy_cache .ruff_cache
