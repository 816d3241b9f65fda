"""Write a file whole or not at all: into a temporary name beside it, then renamed over it.

Every file sidecache writes that a reader may take as complete (shard files, checkpoints,
manifests, metrics, tables, predictions) goes through :func:`atomic_path`. The temporary name,
``.NAME.PID.THREAD.tmp``, is hidden, unique per writer, and recognisable as stale.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_name(final: Path) -> Path:
    """The temporary file a writer of ``final`` in this process and thread uses."""
    return final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``final`` in one rename, on any
    failure (a full disk, an exception, an interrupt) it is removed and ``final`` is untouched.
    Parent folders are created."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(final: str | Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text)
