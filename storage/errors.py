"""Errors raised by sidecache.

Every error subclasses :class:`SidecacheError` *and* the builtin it behaves like, so callers can
catch either. Messages say what was expected, what was found, and which flag or key to change.
This module sits in ``storage`` because it is the lowest layer; ``pipeline`` re-exports it.
"""

from __future__ import annotations

from typing import Any


class SidecacheError(Exception):
    """Base class of every error sidecache raises on purpose."""


class ConfigError(SidecacheError, ValueError):
    """A flag, option or parameter has a value sidecache cannot use."""


class StoreError(SidecacheError):
    """Base class of errors about an activation store."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store (or no sidecache store) at the given location."""


class StoreExistsError(StoreError, FileExistsError):
    """The output location holds something that would be clobbered. ``differences``: for a
    store written with other settings, ``(key, existing, new)`` per differing metadata key
    (dotted, e.g. ``identity.extraction.window_rows``)."""

    def __init__(self, message: str, differences: list[tuple[str, Any, Any]] | None = None):
        super().__init__(message)
        self.differences = list(differences or [])


class StoreIncompleteError(StoreError, RuntimeError):
    """The store was never finished (stage one was interrupted or is still running)."""


class StoreMismatchError(StoreError, ValueError):
    """The store was written for something other than what the caller expects."""


class StoreSchemaError(StoreError, ValueError):
    """The store's metadata is malformed or written by a newer, unknown schema version."""


class StoreCorruptError(StoreError, OSError):
    """Stored bytes do not decode or do not match their checksum."""


class NonFiniteError(SidecacheError, ArithmeticError):
    """The backbone produced NaN or inf hidden states; nothing non-finite is ever stored."""


class StoreWriteError(StoreError, OSError):
    """The store could not be written (read-only or unwritable location, I/O error); whatever
    was written stays incomplete and resumable."""


class DiskFullError(StoreWriteError):
    """The disk holding the store ran out of space (``ENOSPC``) while stage one was writing."""


class StoreBusyError(StoreError, BlockingIOError):
    """Another stage-one process holds a claim on the store (or on the same shard of it)."""
