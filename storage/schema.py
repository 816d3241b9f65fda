"""The store's layout and JSON metadata (schema version 1).

A store is a Zarr v3 group::

    STORE/
      zarr.json                  group attributes["sidecache"]: the metadata below
      hidden/<layer>             (n_rows, d) per stored layer; 0 = embedding output,
                                 i = output of block i (residual stream, no final norm)
      scales/<layer>             (n_rows,) float32 absmax/127, int8 stores only
      offsets                    (n_samples + 1,) int64 row offsets per sample
      token_offsets              (n_samples + 1,) int64 offsets into token_ids
      token_ids                  (n_tokens,) int32, every real (non-pad) token
      token_type_ids             (n_tokens,) int8, only for backbones that take segment ids
      labels                     (n_samples,) int64 class ids or float32 regression targets
      progress                   (n_shards, n_layers, 4) float64 per-shard stats; a row is
                                 written only after that shard of every layer is on disk

Rows are tokens when ``positions == "all"`` and samples otherwise (``first``, ``last``,
``mean``: one vector per sample and layer). Samples are always in dataset order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from storage.codecs import CodecSpec, parse_dtype
from storage.errors import ConfigError, StoreSchemaError

SCHEMA_VERSION = 1
FORMAT_NAME = "sidecache-store"
POSITIONS = ("all", "first", "last", "mean")
STAT_FIELDS = ("sum", "sumsq", "min", "max")


def parse_positions(value: str) -> str:
    """Return a valid positions mode or raise :class:`ConfigError`."""
    key = value.strip().lower()
    if key not in POSITIONS:
        raise ConfigError(
            f"unknown positions {value!r}: expected one of {', '.join(POSITIONS)} "
            "(flag --positions)"
        )
    return key


@dataclass(frozen=True)
class Layout:
    """Everything about a store's arrays that is fixed when the store is created."""

    n_samples: int
    n_tokens: int
    n_rows: int
    layers: list[int]
    hidden_size: int
    positions: str
    dtype: str
    codec: CodecSpec = field(default_factory=CodecSpec)
    chunk_rows: int = 4096
    shard_rows: int = 32768
    has_token_type_ids: bool = False
    label_dtype: str = "int64"

    def __post_init__(self) -> None:
        parse_positions(self.positions)
        parse_dtype(self.dtype)
        if self.shard_rows % self.chunk_rows:
            raise ConfigError(
                f"shard_rows ({self.shard_rows}) must be a multiple of chunk_rows "
                f"({self.chunk_rows})"
            )
        if self.label_dtype not in ("int64", "float32"):
            raise ConfigError(f"label dtype must be int64 or float32, found {self.label_dtype!r}")

    @property
    def n_shards(self) -> int:
        return max(1, -(-self.n_rows // self.shard_rows))

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.n_rows)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["codec"] = self.codec.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Layout:
        try:
            fields = dict(data)
            fields["codec"] = CodecSpec.from_json(fields["codec"])
            fields["layers"] = [int(x) for x in fields["layers"]]
            return cls(**fields)
        except (KeyError, TypeError) as exc:
            raise StoreSchemaError(f"store layout metadata is malformed: {exc}") from exc


def make_metadata(layout: Layout, identity: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    """The JSON document kept in the group's ``sidecache`` attribute."""
    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "complete": False,
        "layout": layout.to_json(),
        "identity": identity,
        "task": task,
        "stats": None,
    }


def check_metadata(meta: Any, where: str) -> dict[str, Any]:
    """Validate the outer shape of a store's metadata; refuse newer schema versions."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise StoreSchemaError(
            f"{where} is a Zarr group but not a sidecache store (no 'sidecache' metadata with "
            f"format {FORMAT_NAME!r}); point at a store written by 'sidecache cache'"
        )
    version = meta.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise StoreSchemaError(
            f"{where} was written with store schema version {version!r}; this sidecache reads "
            f"versions up to {SCHEMA_VERSION}: upgrade sidecache to read it"
        )
    for key in ("layout", "identity", "task"):
        if not isinstance(meta.get(key), dict):
            raise StoreSchemaError(f"{where}: metadata key {key!r} is missing or not an object")
    return meta


def lookup(meta: dict[str, Any], dotted: str) -> Any:
    """Fetch ``a.b.c`` from nested metadata; ``KeyError`` names the missing part."""
    node: Any = meta
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node
