"""The settings of stage one (:class:`CacheConfig`) and stage two (:class:`TrainConfig`).

Each field is declared once with :func:`pipeline.config.setting`: its default and help text
serve ``sidecache cache`` / ``sidecache train`` (their flags are built from these classes) and
``params.yaml`` (whose ``cache:`` and ``train:`` sections are checked against them). The module
imports nothing heavy, so :mod:`pipeline.params` can check both sections without making every
DVC stage depend on both stages' code. ``pipeline.cache`` and ``pipeline.train`` re-export
these classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import setting
from pipeline.errors import ConfigError

# what one more backbone batch costs, in padded token slots, for the cheapest-cut plan: 64 was the
# fastest of 16/64/256 for MiniLM and a 12-layer BERT on this CPU (BENCHMARKS.md, "Batch plan")
BATCH_COST = 64


AUTO_BATCH_COST = -1  # ``--batch-cost auto``: by device (pipeline.storeplan.batch_limits)


def parse_batch_cost(text: str) -> int | None:
    """``--batch-cost``: a number of token slots, ``fill`` for the budget-filling cut, or
    ``auto`` for the device's default."""
    if text == "fill":
        return None
    if text == "auto":
        return AUTO_BATCH_COST
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"expected a number of token slots or 'fill'; found {text!r}") from None


@dataclass(frozen=True)
class ColumnOptions:
    """Which columns hold the text, the optional second text, and the label."""

    text: str | None = setting(
        None, "column holding the text (default: a usual name such as sentence or text)",
        flag="--text-column",
    )  # fmt: skip
    pair: str | None = setting(
        None, "column holding the second text of sentence-pair tasks", flag="--text-pair-column"
    )
    label: str | None = setting(
        None, "column holding the label (default: label, or another usual name)",
        flag="--label-column",
    )  # fmt: skip


@dataclass
class CacheConfig:
    """Everything ``sidecache cache`` takes; sizes have working defaults."""

    backbone: str = setting(
        help="local model folder, hub id, or 'minilm' (default, shipped on PyPI)",
        fallback="minilm",
    )
    data: str = setting(
        help="bbc | glue:DIR | hf:NAME[:CONFIG] | csv:PATH | jsonl:PATH | parquet:PATH",
        fallback="bbc",
    )
    split: str = setting(help="train, dev, ... (default train)", fallback="train")
    out: str = setting(
        help="store to write: a folder or an fsspec URL (s3://bucket/store, memory://...); "
        "credentials come from the environment or ~/.aws, never from the URL"
    )
    layers: str = setting("all", "all, or comma list like 0,3,-1")
    positions: str = setting("all", "all | first | last | mean")
    # pipeline.pairs
    pairs: str = setting(
        "auto",
        "sentence pairs: joint runs each pair as one sequence ([CLS] A [SEP] B [SEP]); "
        "separate runs each sentence alone, as a bi-encoder such as MiniLM is used, and stores "
        "A's rows then B's (needs --positions all); auto (default): separate for a backbone "
        "that mean-pools (sentence-transformers models) with --positions all, else joint",
        choices=("auto", "joint", "separate"),
    )
    dtype: str = setting("bfloat16", "bfloat16 | float16 | float32 | int8")
    codec: str = setting("blosc-lz4:5", "blosc-lz4 | blosc-zstd | zstd | none [:LEVEL]")
    max_length: int | None = setting(None, "truncate samples to N tokens")
    device: str = setting("auto", "auto | cpu | cuda")
    overwrite: bool = setting(False, "replace whatever is at --out")
    revision: str | None = setting(None, "hub revision of the backbone")
    limit: int | None = setting(None, "only the first N samples of the split")
    lst_prune: int | None = setting(
        None, "also store a pruned copy of the backbone (width d/R) to initialise LST",
        metavar="R",
    )  # fmt: skip
    columns: ColumnOptions = field(default_factory=ColumnOptions)  # --text-column, ...
    token_budget: int = setting(
        0, "padded tokens per batch; 0: by device, 4096 on CPU, 65536 on CUDA"
    )
    max_batch: int = setting(0, "samples per batch at most; 0: by device, 256 on CPU, 4096 on CUDA")
    # batches are cut where slots plus this per batch are least
    # (pipeline.tokens.PlanSettings.batch_cost); None: fill each batch to the budget
    batch_cost: int | None = setting(
        AUTO_BATCH_COST,
        "what one more batch costs, in padded token slots: batches are cut where padding plus "
        f"this per batch is least; 'fill' fills each batch to the budget; 'auto' (default): "
        f"{BATCH_COST} on CPU, 4096 on CUDA (where a forward's fixed cost is larger)",
        parse=parse_batch_cost,
    )
    # stage one holds a window in RAM until written. On CPU, MiniLM on SST-2: 0.57% padding (1 GB:
    # 0.31%, 256 MB: 1.7%); half of 1 GB's fresh memory, which costs more than the padding
    # saved (`stage_one_ablation --window-mb 1024 --arms stage,halfwindow`), and less to
    # compress after the last batch
    window_mb: float = setting(
        0.0,
        "samples are length-sorted within windows of this many stored MB, held in RAM until "
        "written; 0: by device, 512 on CPU, 2048 on CUDA",
    )
    chunk_mb: float = setting(4.0, "target chunk size")
    shard_chunks: int = setting(8, "chunks per shard file")
    writer_threads: int = setting(
        0,
        "compression/write threads; 0: 2 on CPU (the backbone needs the cores), all cores but "
        "two on CUDA (the backbone needs none)",
    )
    # pipeline.extract.in_streams
    streams: int = setting(
        2,
        "on CPU, batches run through the backbone at once, each on its own thread with its "
        "share of torch's threads (CUDA: always 1)",
    )
    progress: bool = setting(True, "no progress bar")
    shard: str | None = setting(
        None,
        "write only worker I's share of N (run N of these, e.g. one per GPU); the last to "
        "finish finalises the store",
        metavar="I/N",
    )  # pipeline.shards
    finalize: bool = setting(
        False, "only finalise a store whose shards are all written (after --shard workers)"
    )


@dataclass
class TrainConfig:
    """Everything ``sidecache train`` takes."""

    train: str = setting(help="store of the training split")
    eval: str = setting(help="store of the evaluation split")
    specs: list[str] = setting(
        help="KIND[:key=value,...], e.g. read:hidden=128,lr=1e-3 (kinds read, lst, linear, mlp, "
        "or MODULE.CLASS for your own nn.Module); repeat for more",
        flag="--sidenet", metavar="SPEC", append=True, fallback=[],
    )  # fmt: skip
    epochs: int = setting(help="passes over the training store", fallback=3)
    out: str = setting(help="one folder per side network goes here")
    batch_size: int = setting(32, "samples per training batch")
    seed: int = setting(0, "seed of weight initialisation, shuffling and dropout")
    device: str = setting("auto", "auto | cpu | cuda")
    ram_budget_mb: int = setting(4096, "keep stores this small in RAM")
    valid_fraction: float = setting(
        0.0,
        "hold out this share of the train store's samples (a fixed draw, the same for every "
        "run, seed and method) and choose each network's best epoch on them instead of on "
        "--eval; they are not trained on. 0 (default): the best epoch is --eval's",
        metavar="F",
    )
    progress: bool = setting(True, "no progress bar")
    # torch intra-op threads on CPU
    threads: int = setting(0, "PyTorch threads on CPU (0: half the cores)")
    # streaming: a round holds at most half of it
    pool_mb: int = setting(
        512,
        "the loader's budget for stored rows when streaming (default 512): the round being "
        "shuffled, the next one read ahead, cached chunk edges and leftovers together; a round "
        "holds at most half, so a smaller budget shuffles over fewer chunks at a time "
        "(different batches, in RAM too)",
    )
    device_budget_mb: int = setting(
        -1,
        "on CUDA, hold both stores on the GPU when their stored rows fit in this many MB "
        "(-1, the default: half the free GPU memory; 0: never), else read them on the host",
    )
    low_memory: bool = setting(
        False,
        "one prefetched batch instead of 4, and (glibc) large buffers returned to the OS when "
        "freed; same batches and results, lower peak RSS, some CPU for page faults",
    )
    micro_rows: int = setting(
        0,
        "run each batch's forward and backward in groups of whole samples of at most N stored "
        "rows, adding up the gradients: the same step up to float rounding (dropout masks "
        "drawn per group), with activation memory bounded by N rows instead of by the batch's "
        "longest samples. 0 (default): whole batches",
        metavar="N",
    )
