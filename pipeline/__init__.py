"""sidecache's library: data specs, backbones, stage-one extraction and the CLI.

Data flow of stage one: :mod:`pipeline.data` (text) -> :mod:`pipeline.tokens` (token ids and a
batch plan) -> :mod:`pipeline.backbone` (hidden states) -> :mod:`pipeline.cache` (cast, gather,
hand to :mod:`storage`).
"""

import os

# torch's CPU BLAS is MKL, which may choose a GEMM kernel by the number of threads it is given:
# on an AVX-512 AMD EPYC, 18 of 117 small (M x K) @ (K x K) shapes gave different last bits at
# one and at two threads, so a store written by two streams of one thread each did not match a
# two-thread recomputation. Strict conditional numerical reproducibility makes MKL's results
# independent of the thread count (no cost seen on full-length runs:
# `python -m benchmarks.mkl_strict`).
# MKL reads the setting at its first computation, not when torch is imported, so setting it here
# covers every entry point (the CLI, stages, benchmarks and tests import pipeline before torch
# computes); a value the user set is kept, and every store records the mode it was written with
# (pipeline.backbone.cpu_numerics; stage one warns when MKL is not strict).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# cuBLAS may pick reduction splits by the workspace it has; with a fixed workspace its results
# are reproducible run to run on one GPU (NVIDIA's documented setting for deterministic cuBLAS),
# so a network trained alone equals itself inside a pass of K. Read when CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
