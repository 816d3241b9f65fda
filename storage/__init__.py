"""The sidecache store: per-layer hidden states packed along tokens in a Zarr v3 group.

This package is the only code in sidecache that imports ``zarr``. It knows nothing about
transformers: it stores rows of hidden states (one row per token, or per sample for the
single-position modes), their sample offsets, token ids and labels, and JSON metadata.
"""

from storage.atomic import atomic_path, write_text_atomic
from storage.claims import WHOLE, claim, meta_lock, shard_slot
from storage.codecs import (
    STORED_DTYPES,
    CodecSpec,
    decode_rows,
    itemsize,
    parse_codec,
    parse_dtype,
)
from storage.errors import (
    ConfigError,
    DiskFullError,
    NonFiniteError,
    SidecacheError,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    StoreExistsError,
    StoreIncompleteError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreSchemaError,
    StoreWriteError,
)
from storage.location import Location, locate
from storage.reader import StoreReader, open_store
from storage.schema import POSITIONS, SCHEMA_VERSION, Layout, parse_positions
from storage.writer import BatchRows, StoreWriter, create_store, finalize_store

__all__ = [
    "POSITIONS",
    "SCHEMA_VERSION",
    "STORED_DTYPES",
    "WHOLE",
    "BatchRows",
    "CodecSpec",
    "ConfigError",
    "DiskFullError",
    "Layout",
    "Location",
    "NonFiniteError",
    "SidecacheError",
    "StoreBusyError",
    "StoreCorruptError",
    "StoreError",
    "StoreExistsError",
    "StoreIncompleteError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "StoreReader",
    "StoreSchemaError",
    "StoreWriteError",
    "StoreWriter",
    "atomic_path",
    "claim",
    "create_store",
    "decode_rows",
    "finalize_store",
    "itemsize",
    "locate",
    "meta_lock",
    "open_store",
    "parse_codec",
    "parse_dtype",
    "parse_positions",
    "shard_slot",
    "write_text_atomic",
]
