"""The sidecache store: per-layer hidden states packed along tokens in a Zarr v3 group.

This package is the only code in sidecache that imports ``zarr``. It knows nothing about
transformers: it stores rows of hidden states (one row per token, or per sample for the
single-position modes), their sample offsets, token ids and labels, and JSON metadata.
"""

from storage.codecs import STORED_DTYPES, CodecSpec, decode_rows, parse_codec, parse_dtype
from storage.errors import (
    ConfigError,
    NonFiniteError,
    SidecacheError,
    StoreCorruptError,
    StoreError,
    StoreExistsError,
    StoreIncompleteError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreSchemaError,
)
from storage.reader import StoreReader, open_store
from storage.schema import POSITIONS, SCHEMA_VERSION, Layout, parse_positions
from storage.writer import BatchRows, StoreWriter, create_store

__all__ = [
    "POSITIONS",
    "SCHEMA_VERSION",
    "STORED_DTYPES",
    "BatchRows",
    "CodecSpec",
    "ConfigError",
    "Layout",
    "NonFiniteError",
    "SidecacheError",
    "StoreCorruptError",
    "StoreError",
    "StoreExistsError",
    "StoreIncompleteError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "StoreReader",
    "StoreSchemaError",
    "StoreWriter",
    "create_store",
    "decode_rows",
    "open_store",
    "parse_codec",
    "parse_dtype",
    "parse_positions",
]
