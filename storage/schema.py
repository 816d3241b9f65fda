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
      token_type_ids             (n_tokens,) int8, only for backbones that take segment ids,
                                 and in ``--pairs separate`` stores: each token's sentence (0, 1)
      labels                     (n_samples,) int64 class ids or float32 regression targets
      progress                   (n_shards, n_layers, 4) float64 per-shard stats; a row is
                                 written only after that shard of every layer is on disk

Rows are tokens when ``positions == "all"`` and samples otherwise (``first``, ``last``,
``mean``: one vector per sample and layer). Samples are always in dataset order.

The metadata's optional ``integrity`` object guards what the chunks' crc32c cannot:

* ``all_chunks_written`` (set when the arrays are created): every chunk of every array is a
  file on disk, all-zero ones included, so a missing chunk file is damage, never a chunk that
  reads as the fill value. Without it (stores written before the key existed) only the arrays
  that never hold an all-zero chunk (:data:`ALWAYS_WRITTEN`) are checked for missing files.
* ``metadata_sha256`` (set when the store is finalised): per array, the sha256 of its
  ``zarr.json`` in canonical form (:func:`canonical_sha256`), so a changed shape, dtype, fill
  value or codec is caught. Without it ``verify`` says the hashes are not recorded.

Both keys are additions that older readers ignore, so the schema version stays 1.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from storage.codecs import CodecSpec, parse_dtype
from storage.errors import ConfigError, StoreSchemaError

SCHEMA_VERSION = 1
FORMAT_NAME = "sidecache-store"
POSITIONS = ("all", "first", "last", "mean")
STAT_FIELDS = ("sum", "sumsq", "min", "max")
INTEGRITY = "integrity"
# arrays that never hold an all-zero chunk, so every chunk file is on disk even in a store
# written before ``integrity.all_chunks_written`` existed
ALWAYS_WRITTEN = ("hidden/", "scales/", "progress", "offsets", "token_offsets", "token_ids")


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


def canonical_sha256(doc: bytes | dict[str, Any]) -> str:
    """sha256 (hex) of a JSON document (its bytes, or already parsed) in canonical form (keys
    sorted, no whitespace), so the same metadata hashes the same however it was indented.
    Raises ``ValueError`` for bytes that are not JSON."""
    parsed = json.loads(doc) if isinstance(doc, bytes) else doc
    text = json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def integrity(meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata's ``integrity`` object (empty for a store written before it existed)."""
    found = meta.get(INTEGRITY)
    return found if isinstance(found, dict) else {}


def every_chunk_written(meta: dict[str, Any]) -> bool:
    return integrity(meta).get("all_chunks_written") is True


def recorded_hashes(meta: dict[str, Any]) -> dict[str, str] | None:
    """``array name -> sha256`` recorded at finalisation, or ``None`` when not recorded."""
    found = integrity(meta).get("metadata_sha256")
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else None


def lookup(meta: dict[str, Any], dotted: str) -> Any:
    """Fetch ``a.b.c`` from nested metadata; ``KeyError`` names the missing part."""
    node: Any = meta
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node
