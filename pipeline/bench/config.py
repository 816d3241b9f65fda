"""What ``sidecache bench`` runs: the methods, seeds, data and the cached runs' settings."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import default_of, int_list, setting
from pipeline.errors import ConfigError
from pipeline.settings import CacheConfig, TrainConfig

DEFAULT_METHODS = [
    "cached:read",
    "cached:lst",
    "cached:linear",
    "cached:mlp",
    "online:read",
    "online:lst",
    "online:full",
    "online:lora",
    "online:meft",
]


def parse_methods(text: str) -> list[str]:
    """``--methods``: ``cached:read:hidden=64;lr=1e-3,online:lora`` -> one spec per method, its
    keys joined by ``,`` again (``;`` on the command line, where ``,`` separates methods)."""
    return [m.strip().replace(";", ",") for m in text.split(",") if m.strip()]


@dataclass
class BenchConfig:
    """Everything ``sidecache bench`` takes; the cached runs' settings are stage two's."""

    backbone: str = setting(
        help="as for sidecache cache", fallback=default_of(CacheConfig, "backbone")
    )
    data: str = setting(help="data spec, e.g. glue:../shared/data/glue/MRPC")
    out: str = setting(help="folder for stores, runs, bench.json/.csv/.md")
    methods: list[str] = setting(
        DEFAULT_METHODS,
        "comma list of cached:KIND[:key=value;...] (stage two side networks) and "
        "online:KIND[:key=value;...] (full, lora, meft, read, lst), keys joined by ';', e.g. "
        f"online:lora:r=8;lr=5e-4; default {','.join(DEFAULT_METHODS)}",
        parse=parse_methods,
    )
    seeds: list[int] = setting([0, 1, 2], "comma list, default 0,1,2", parse=int_list)
    epochs: int = setting(default_of(TrainConfig, "epochs"), "epochs of every run")
    batch_size: int = setting(TrainConfig.batch_size, "samples per training batch")
    limit: int | None = setting(None, "first N training samples")
    eval_limit: int | None = setting(None, "first N evaluation samples")
    eval_split: str = setting("dev", "the split every run is evaluated on")
    max_length: int | None = setting(128, "truncate samples to N tokens (stores and online runs)")
    dtype: str = setting(CacheConfig.dtype, "store dtype (online READ/LST round to it)")
    positions: str = setting(
        CacheConfig.positions,
        "the stores' positions: all, or first/last when every cached method reads only that "
        "one (a leaner store; online methods are unaffected)",
    )
    chunk_mb: float = setting(
        CacheConfig.chunk_mb,
        "the stores' chunk size; a streaming loader decodes whole chunks of every layer",
    )
    device: str = setting(TrainConfig.device, "auto | cpu | cuda")
    ram_budget_mb: int = setting(
        TrainConfig.ram_budget_mb,
        "cached runs hold stores up to this size in RAM (0: stream them)",
    )
    pool_mb: int = setting(TrainConfig.pool_mb, "cached runs: the loader's budget for stored rows")
    low_memory: bool = setting(TrainConfig.low_memory, "cached runs: sidecache train --low-memory")
    micro_rows: int = setting(TrainConfig.micro_rows, "cached runs: sidecache train --micro-rows")
    threads: int = setting(
        TrainConfig.threads,
        "cached runs: torch threads, as sidecache train --threads (0: its default, half the cores)",
    )
    valid_fraction: float = setting(
        0.0,
        "every run (cached and online) holds out this share of the training samples (the same "
        "draw for every run, seed and method) and chooses its best epoch on them, not on "
        "--eval-split; the table then also chooses each method's lr= on them. 0 (default): "
        "epochs are chosen on --eval-split",
        metavar="F",
    )


def split_method(text: str) -> tuple[str, str]:
    """``cached:read:hidden=64`` -> ``("cached", "read:hidden=64")``; validated."""
    mode, _, spec = text.partition(":")
    if mode not in ("cached", "online") or not spec:
        raise ConfigError(
            f"--methods: expected cached:KIND[...] or online:KIND[...]; found {text!r}"
        )
    if mode == "cached":
        from pipeline.sidenets import parse_spec

        parse_spec(spec)
    else:
        from pipeline.online.methods import parse_method

        parse_method(spec)
    return mode, spec
