"""Open a store for reading: check it is complete and what the caller expects, then serve rows."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from storage.codecs import decode_rows, itemsize
from storage.errors import (
    StoreCorruptError,
    StoreIncompleteError,
    StoreMismatchError,
    StoreNotFoundError,
)
from storage.schema import Layout, check_metadata, lookup


def open_store(
    path: str | os.PathLike[str],
    *,
    expect: dict[str, Any] | None = None,
    layers: list[int] | None = None,
    allow_incomplete: bool = False,
) -> StoreReader:
    """Open the store at ``path``.

    ``expect`` maps dotted metadata keys (``layout.hidden_size``, ``layout.positions``,
    ``identity.backbone.weights_hash`` ...) to required values; ``layers`` must all be stored.
    Raises :class:`StoreNotFoundError`, :class:`StoreIncompleteError` or
    :class:`StoreMismatchError` naming the first problem found.
    """
    where = str(path)
    if not Path(where).exists() and "://" not in where:
        raise StoreNotFoundError(f"no store at {where}: run 'sidecache cache ... --out {where}'")
    try:
        group = zarr.open_group(where, mode="r", zarr_format=3)
    except (FileNotFoundError, ValueError) as exc:
        raise StoreNotFoundError(f"{where} is not a Zarr v3 group: {exc}") from exc
    meta = check_metadata(group.attrs.get("sidecache"), where)
    if not meta.get("complete") and not allow_incomplete:
        raise StoreIncompleteError(
            f"{where} is incomplete (stage one was interrupted or is still running); re-run the "
            "same 'sidecache cache' command to resume it"
        )
    reader = StoreReader(where, group, meta)
    reader.check(expect or {}, layers)
    return reader


class StoreReader:
    """Read access to one store. Rows come back decoded to float32."""

    def __init__(self, path: str, group: zarr.Group, meta: dict[str, Any]):
        self.path = path
        self.group = group
        self.meta = meta
        self.layout = Layout.from_json(meta["layout"])

    # -- checks ----------------------------------------------------------------------------
    def check(self, expect: dict[str, Any], layers: list[int] | None = None) -> None:
        for key, wanted in expect.items():
            try:
                found = lookup(self.meta, key)
            except KeyError:
                found = "<missing>"
            if found != wanted:
                raise StoreMismatchError(
                    f"{self.path}: {key} is {found!r} but {wanted!r} was expected; use a store "
                    "written with matching settings (or re-run stage one with them)"
                )
        missing = [x for x in layers or [] if x not in self.layout.layers]
        if missing:
            raise StoreMismatchError(
                f"{self.path}: layers {missing} are needed but the store holds layers "
                f"{self.layout.layers}; re-run stage one with --layers including them"
            )

    # -- metadata --------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def identity(self) -> dict[str, Any]:
        return dict(self.meta["identity"])

    @property
    def task(self) -> dict[str, Any]:
        return dict(self.meta["task"])

    @cached_property
    def offsets(self) -> np.ndarray:
        return np.asarray(self._read("offsets", ...), dtype=np.int64)

    @cached_property
    def token_offsets(self) -> np.ndarray:
        return np.asarray(self._read("token_offsets", ...), dtype=np.int64)

    @cached_property
    def labels(self) -> np.ndarray:
        return np.asarray(self._read("labels", ...))

    def token_ids(self, sample: int) -> np.ndarray:
        a, b = self.token_offsets[sample], self.token_offsets[sample + 1]
        return np.asarray(self._read("token_ids", slice(a, b)))

    def token_type_ids(self, sample: int) -> np.ndarray | None:
        if not self.layout.has_token_type_ids:
            return None
        a, b = self.token_offsets[sample], self.token_offsets[sample + 1]
        return np.asarray(self._read("token_type_ids", slice(a, b)))

    # -- rows ------------------------------------------------------------------------------
    def raw_rows(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Stored (undecoded) rows ``[start, stop)`` of one layer."""
        return np.asarray(self._read(f"hidden/{layer}", slice(start, stop)))

    def rows(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Decoded float32 rows ``[start, stop)`` of one layer: ``(stop - start, d)``."""
        scales = None
        if self.layout.dtype == "int8":
            scales = np.asarray(self._read(f"scales/{layer}", slice(start, stop)))
        return decode_rows(self.raw_rows(layer, start, stop), self.layout.dtype, scales)

    def sample(self, sample: int, layers: list[int] | None = None) -> np.ndarray:
        """Decoded rows of one sample for the given layers: ``(n_rows, n_layers, d)``."""
        a, b = int(self.offsets[sample]), int(self.offsets[sample + 1])
        chosen = self.layout.layers if layers is None else layers
        return np.stack([self.rows(layer, a, b) for layer in chosen], axis=1)

    def extra(self, name: str) -> np.ndarray:
        """A whole small array stored beside the hidden states (``lst_init/r8/...``)."""
        return np.asarray(self._read(name, ...))

    def raw_scales(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Stored int8 scales of rows ``[start, stop)``."""
        return np.asarray(self._read(f"scales/{layer}", slice(start, stop)))

    def all_tokens(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Every stored token id (and segment id, when stored), packed."""
        types = None
        if self.layout.has_token_type_ids:
            types = np.asarray(self._read("token_type_ids", ...))
        return np.asarray(self._read("token_ids", ...)), types

    def _read(self, name: str, selection: Any) -> Any:
        try:
            arr: Any = self.group[name]
            return arr[selection]
        except KeyError as exc:
            raise StoreCorruptError(f"{self.path}: array {name!r} is missing") from exc
        except (ValueError, RuntimeError, OSError) as exc:
            raise StoreCorruptError(
                f"{self.path}: array {name!r} could not be decoded at {selection!r} "
                f"(checksum or codec failure: {exc}); run 'sidecache verify {self.path}'"
            ) from exc

    # -- summary ---------------------------------------------------------------------------
    def bytes_on_disk(self) -> int | None:
        root = Path(self.path)
        if not root.is_dir():
            return None
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    def summary(self) -> dict[str, Any]:
        lay = self.layout
        raw = lay.n_rows * lay.hidden_size * len(lay.layers) * itemsize(lay.dtype)
        disk = self.bytes_on_disk()
        ident = self.identity
        return {
            "path": self.path,
            "complete": self.complete,
            "schema_version": self.meta["schema_version"],
            "backbone": ident.get("backbone", {}).get("name"),
            "dataset": ident.get("dataset", {}).get("spec"),
            "split": ident.get("dataset", {}).get("split"),
            "samples": lay.n_samples,
            "tokens": lay.n_tokens,
            "rows": lay.n_rows,
            "layers": lay.layers,
            "hidden_size": lay.hidden_size,
            "positions": lay.positions,
            "dtype": lay.dtype,
            "codec": lay.codec.to_json(),
            "shards": lay.n_shards,
            "raw_bytes": raw,
            "bytes_on_disk": disk,
            "compression_ratio": (raw / disk) if disk else None,
            "bytes_per_token": (disk / lay.n_tokens) if disk and lay.n_tokens else None,
            "task": self.task,
        }
