"""Errors of the pipeline layer; the shared base classes come from :mod:`storage`."""

from __future__ import annotations

from storage import (
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


class DataSpecError(SidecacheError, ValueError):
    """A data spec, split, column or label cannot be used."""


class BackboneError(SidecacheError, ValueError):
    """The backbone cannot be loaded or does not fit the request (layers, identity)."""


class VerifyError(SidecacheError, AssertionError):
    """Stored hidden states differ from what the backbone computes now."""


__all__ = [
    "BackboneError",
    "ConfigError",
    "DataSpecError",
    "NonFiniteError",
    "SidecacheError",
    "StoreCorruptError",
    "StoreError",
    "StoreExistsError",
    "StoreIncompleteError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "StoreSchemaError",
    "VerifyError",
]
