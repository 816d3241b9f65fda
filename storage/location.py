"""Where a store lives: a local folder or any fsspec URL (``s3://``, ``file://``, ``memory://``).

This is the one place that tells paths from URLs. Everything else in ``storage`` asks a
:class:`Location` for a zarr store, for existence, size and deletion, and for small exclusive
files (the writers' claims). Credentials never appear here: fsspec and its back ends read them
from the environment and their usual config files (``AWS_ACCESS_KEY_ID``/``AWS_PROFILE``,
``~/.aws``, ``AWS_ENDPOINT_URL`` for an S3-compatible server, ``FSSPEC_S3_*`` or
``~/.config/fsspec/*.json``). A URL that carries a user or password is refused, so secrets are
never echoed into logs, metadata or error messages.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from storage.errors import ConfigError


@dataclass(frozen=True)
class Location:
    """A store's place: ``local`` is set for folders on this machine, ``fs``/``root`` otherwise."""

    text: str  # as the user wrote it (without a trailing slash); safe to log
    local: Path | None
    fs: Any = None  # fsspec AbstractFileSystem for remote locations
    root: str = ""  # path of the store inside ``fs``

    def __str__(self) -> str:
        return self.text

    @property
    def is_remote(self) -> bool:
        return self.local is None

    # -- the whole store -------------------------------------------------------------------
    def zarr_store(self, *, read_only: bool) -> Any:
        """What ``zarr.open_group(store=...)`` takes for this location."""
        if self.local is not None:
            return str(self.local)
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.text, read_only=read_only)

    def exists(self) -> bool:
        if self.local is not None:
            return self.local.exists()
        self._fresh()
        return bool(self.fs.exists(self.root))

    def is_empty(self) -> bool:
        """True when nothing is there (or an empty folder)."""
        if self.local is not None:
            return not self.local.exists() or (
                self.local.is_dir() and not any(self.local.iterdir())
            )
        self._fresh()
        return not self.fs.exists(self.root) or not self.fs.ls(self.root, detail=False)

    def remove(self) -> None:
        """Delete whatever is there (``--overwrite``)."""
        if self.local is not None:
            if self.local.is_dir():
                shutil.rmtree(self.local)
            elif self.local.exists():
                self.local.unlink()
        elif self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def size(self) -> int | None:
        """Bytes stored under this location, ``None`` when it is not a folder."""
        if self.local is not None:
            if not self.local.is_dir():
                return None
            return sum(p.stat().st_size for p in self.local.rglob("*") if p.is_file())
        self._fresh()
        try:
            return int(self.fs.du(self.root, total=True))
        except (FileNotFoundError, NotImplementedError):
            return None

    def _fresh(self) -> None:
        """Forget fsspec's listing cache: zarr writes through another (async) instance."""
        self.fs.invalidate_cache(self.root)

    def sibling(self, suffix: str) -> Location:
        """``STORE<suffix>`` beside the store (the claims folder lives there)."""
        return locate(self.text + suffix)

    # -- small files (claims) --------------------------------------------------------------
    def _file(self, name: str) -> str:
        if self.local is not None:
            return str(self.local / name)
        return f"{self.root}/{name}"

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create file ``name`` holding ``data``; ``False`` if it already exists. Atomic on local
        filesystems (``O_CREAT | O_EXCL``) and on S3 (conditional put, ``If-None-Match``)."""
        path = self._file(name)
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except OSError as exc:  # S3 answers a failed condition with 412 PreconditionFailed
            if "precondition" in str(exc).lower():
                return False
            raise
        return True

    def read_file(self, name: str) -> bytes | None:
        path = self._file(name)
        try:
            if self.local is not None:
                return Path(path).read_bytes()
            return bytes(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    def delete_file(self, name: str) -> None:
        path = self._file(name)
        with contextlib.suppress(FileNotFoundError):
            if self.local is not None:
                Path(path).unlink()
            else:
                self.fs.rm_file(path)

    def list_files(self) -> list[str]:
        """Names of the files directly under this location (none when it does not exist)."""
        if self.local is not None:
            if not self.local.is_dir():
                return []
            return sorted(p.name for p in self.local.iterdir() if p.is_file())
        self._fresh()
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries
                      if e.get("type") == "file")  # fmt: skip

    def remove_if_empty(self) -> None:
        if self.local is not None:
            with contextlib.suppress(OSError):  # not empty, or already gone
                self.local.rmdir()


def locate(where: str | os.PathLike[str] | Location) -> Location:
    """Parse a local path or an fsspec URL; ``file://`` URLs become local paths.

    Raises :class:`ConfigError` for a URL with credentials in it or an unknown protocol.
    """
    if isinstance(where, Location):
        return where
    text = os.fspath(where).strip()
    text = text.rstrip("/") or text
    if "://" not in text:
        return Location(text, Path(text).expanduser())
    parts = urlsplit(text)
    if parts.username or parts.password:
        raise ConfigError(
            f"the store URL {parts.scheme}://...@{parts.hostname}{parts.path} carries "
            "credentials; remove them and set them in the environment (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE) or in ~/.aws instead"
        )
    if parts.scheme == "file":
        return Location(text, Path(parts.netloc + parts.path))
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as exc:
        raise ConfigError(
            f"cannot open store URL {text!r}: {exc}; expected a local path or an fsspec URL "
            "such as s3://bucket/store (install s3fs for s3://)"
        ) from exc
    return Location(text, None, fs, str(root).rstrip("/"))
