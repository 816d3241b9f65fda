"""What ``sidecache bench`` runs: the methods, seeds, data and the cached runs' settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import ConfigError

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


@dataclass
class BenchConfig:
    backbone: str
    data: str
    out: str
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 3
    batch_size: int = 32
    limit: int | None = None  # first N training samples
    eval_limit: int | None = None
    eval_split: str = "dev"
    max_length: int | None = 128
    dtype: str = "bfloat16"  # the store's dtype; online READ/LST round to it too
    positions: str = "all"  # the stores' positions (first/last: single-position side networks)
    chunk_mb: float = 4.0  # the stores' chunk size: the streaming loader's unit of decoding
    device: str = "auto"
    ram_budget_mb: int = 4096  # cached runs: stores up to this size are held in RAM
    pool_mb: int = 512  # cached runs: the loader's budget for stored rows (sidecache train)
    low_memory: bool = False  # cached runs: ``sidecache train --low-memory``
    micro_rows: int = 0  # cached runs: ``sidecache train --micro-rows``
    threads: int = 0  # cached runs: ``sidecache train --threads`` (0: half the cores)


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
