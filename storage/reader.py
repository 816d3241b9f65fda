"""Open a store for reading: check it is complete and what the caller expects, then serve rows."""

from __future__ import annotations

import itertools
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.metadata.v3 import ArrayV3Metadata

from storage.codecs import decode_rows, itemsize
from storage.errors import (
    StoreCorruptError,
    StoreIncompleteError,
    StoreMismatchError,
    StoreNotFoundError,
)
from storage.location import locate
from storage.schema import (
    ALWAYS_WRITTEN,
    Layout,
    canonical_sha256,
    check_metadata,
    every_chunk_written,
    lookup,
    recorded_hashes,
)
from storage.shardfile import ShardFile, ShardFileError


def open_store(
    path: str | os.PathLike[str],
    *,
    expect: dict[str, Any] | None = None,
    layers: list[int] | None = None,
    allow_incomplete: bool = False,
    check_files: bool = True,
) -> StoreReader:
    """Open the store at ``path``.

    ``expect`` maps dotted metadata keys (``layout.hidden_size``, ``layout.positions``,
    ``identity.backbone.weights_hash`` ...) to required values; ``layers`` must all be stored.
    Raises :class:`StoreNotFoundError`, :class:`StoreIncompleteError` or
    :class:`StoreMismatchError` naming the first problem found, and :class:`StoreCorruptError`
    when ``check_files`` finds a complete store damaged (:meth:`StoreReader.check_files`).
    """
    loc = locate(path)
    where = str(loc)
    if not loc.exists():
        raise StoreNotFoundError(f"no store at {where}: run 'sidecache cache ... --out {where}'")
    try:
        group = zarr.open_group(loc.zarr_store(read_only=True), mode="r", zarr_format=3)
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
    if check_files:
        reader.check_files()
    return reader


class StoreReader:
    """Read access to one store. Rows come back decoded to float32."""

    def __init__(self, path: str, group: zarr.Group, meta: dict[str, Any]):
        self.path = path
        self.group = group
        self.meta = meta
        self.layout = Layout.from_json(meta["layout"])
        self._files: dict[str, ShardFile | None] = {}

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

    def check_files(self) -> None:
        """The cheap checks of a complete local store that :func:`open_store` runs (about a
        millisecond): every array's ``zarr.json`` still has the sha256 recorded at finalisation,
        and every chunk file of the small unsharded arrays that readers load whole (offsets,
        token ids, labels, segment ids, extras) is on disk; shard files are checked as they are
        read, ``progress`` (not read once the store is complete) by ``verify``. Raises
        :class:`StoreCorruptError` naming each array and file. A store without recorded hashes
        (written before they existed) is not checked here."""
        local = locate(self.path).local
        recorded = recorded_hashes(self.meta)
        if not self.complete or local is None or recorded is None:
            return
        changed: list[str] = []
        missing: dict[str, list[str]] = {}
        for name, want in recorded.items():
            doc = _parse(_read_bytes(f"{local}/{name}/zarr.json"))
            problem = _metadata_problem(name, want, doc)
            if problem is not None or not isinstance(doc, dict):
                changed += [problem] if problem else []
                continue
            if name == "progress" or not self.every_chunk_expected(name) or _is_sharded(doc):
                continue
            files = absent_chunk_files(local, name, ArrayV3Metadata.from_dict(doc))
            if files:
                missing[name] = files
        if changed:
            raise _metadata_error(self.path, changed)
        if missing:
            raise _missing_error(self.path, missing)

    def metadata_problems(self) -> list[str] | None:
        """Every array whose ``zarr.json`` differs from (or is missing against) the sha256
        recorded at finalisation, and every array not recorded then (added later); ``None``
        when the store has no recorded hashes (written before they existed)."""
        recorded = recorded_hashes(self.meta)
        if recorded is None:
            return None
        loc = locate(self.path)
        problems = []
        for name, want in recorded.items():
            problem = _metadata_problem(name, want, _parse(loc.read_file(f"{name}/zarr.json")))
            problems += [problem] if problem else []
        try:
            found = [name for name, node in self.group.members(max_depth=None)
                     if isinstance(node, zarr.Array)]  # fmt: skip
        except (ValueError, TypeError, KeyError) as exc:  # metadata zarr cannot parse
            return [*problems, f"the store's arrays cannot be listed ({exc})"]
        problems += [
            f"array {name!r} was not in the store when it was finalised (added later)"
            for name in sorted(set(found) - set(recorded))
        ]
        return problems

    def every_chunk_expected(self, name: str) -> bool:
        """Whether every chunk of array ``name`` is a file on disk, so a missing file is damage
        (every array of a store written with ``integrity.all_chunks_written``; otherwise only
        the arrays that never hold an all-zero chunk, :data:`storage.schema.ALWAYS_WRITTEN`)."""
        return every_chunk_written(self.meta) or name.startswith(ALWAYS_WRITTEN)

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
    def raw_rows(
        self, layer: int, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Stored (undecoded) rows ``[start, stop)`` of one layer (into ``out`` when given)."""
        return self._read_rows(f"hidden/{layer}", start, stop, out)

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

    def raw_scales(
        self, layer: int, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Stored int8 scales of rows ``[start, stop)`` (into ``out`` when given)."""
        return self._read_rows(f"scales/{layer}", start, stop, out)

    def _read_rows(self, name: str, start: int, stop: int, out: np.ndarray | None) -> np.ndarray:
        """Rows of a per-layer array: straight from the shard files of a complete local store
        (:mod:`storage.shardfile`), else through zarr."""
        file = self._shard_file(name)
        if file is None:
            rows = np.asarray(self._read(name, slice(start, stop)))
            if out is None:
                return rows
            out[...] = rows
            return out
        if out is None:
            out = np.empty((stop - start, *file.row_shape), file.dtype)
        try:
            file.read(start, stop, out)
        except ShardFileError as exc:
            chunk = start // file.chunk_rows if exc.chunk is None else exc.chunk
            a, b = chunk * file.chunk_rows, min((chunk + 1) * file.chunk_rows, file.n_rows)
            coords = (chunk, *(0,) * len(file.row_shape))
            rel = _chunk_file(self.group[name], name, chunk)
            where = f"chunk {coords} [rows {a}:{b}] in file {rel}"
            raise _damaged(self.path, name, [where], str(exc)) from exc
        return out

    def _shard_file(self, name: str) -> ShardFile | None:
        if name not in self._files:
            local = locate(self.path).local
            file = None
            if self.complete and local is not None:  # an incomplete store reads as zarr does
                try:
                    file = ShardFile.of(self.group[name], local / name)
                except KeyError as exc:
                    raise StoreCorruptError(f"{self.path}: array {name!r} is missing") from exc
            self._files[name] = file
        return self._files[name]

    def all_tokens(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Every stored token id (and segment id, when stored), packed."""
        types = None
        if self.layout.has_token_type_ids:
            types = np.asarray(self._read("token_type_ids", ...))
        return np.asarray(self._read("token_ids", ...)), types

    def arrays(self) -> dict[str, tuple[int, int, int]]:
        """Every array in the store: ``name -> (length, rows per chunk, rows per file)``."""
        out = {}
        for name, node in self.group.members(max_depth=None):
            if isinstance(node, zarr.Array) and node.shape:
                shards = node.shards
                per_file = shards[0] if shards is not None else node.chunks[0]
                out[name] = (int(node.shape[0]), int(node.chunks[0]), int(per_file))
        return dict(sorted(out.items()))

    def read(self, name: str, selection: Any = ...) -> Any:
        """Any stored array (or ``selection`` of it); a damaged chunk raises
        :class:`StoreCorruptError` naming the array, the chunk and its file."""
        return self._read(name, selection)

    def _read(self, name: str, selection: Any) -> Any:
        try:
            arr: Any = self.group[name]
        except KeyError as exc:
            raise StoreCorruptError(f"{self.path}: array {name!r} is missing") from exc
        try:
            out = arr[selection]
        except (ValueError, RuntimeError, OSError) as exc:
            bad = _bad_chunks(arr, name, selection) or ["(could not narrow it down to one chunk)"]
            raise _damaged(self.path, name, bad, f"checksum or codec failure: {exc}") from exc
        missing = []
        if self.complete and self.every_chunk_expected(name):
            missing = _missing_files(self.path, name, arr, selection)
        if missing:
            raise _missing_error(self.path, {name: missing})
        return out

    # -- summary ---------------------------------------------------------------------------
    def bytes_on_disk(self) -> int | None:
        return locate(self.path).size()

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


# -- naming damaged chunks ------------------------------------------------------------------
# Every array is chunked along its first axis only; hidden/scales arrays group chunks in shards.
# In a store written with ``integrity.all_chunks_written`` every chunk of every array is a file
# (all arrays are written with write_empty_chunks); in an older one only the arrays that never
# hold an all-zero chunk are (``labels``, ``token_type_ids`` and ``lst_init/...`` may lack
# files there: zarr skipped chunks equal to the fill value).
REDO = (
    "restore the file(s) from a copy, or re-create the store with the same 'sidecache cache' "
    "command plus --overwrite (resuming does not rewrite a complete store); 'sidecache verify' "
    "lists every problem"
)


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _parse(raw: bytes | None) -> dict[str, Any] | str | None:
    """A ``zarr.json`` parsed; ``None`` when absent, an error message when it is not JSON."""
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        return f"not valid JSON ({exc})"
    return doc if isinstance(doc, dict) else "not a JSON object"


def _metadata_problem(name: str, want: str, doc: dict[str, Any] | str | None) -> str | None:
    """How array ``name``'s parsed ``zarr.json`` (see :func:`_parse`) differs from the
    recorded sha256 ``want``, or ``None`` when it matches."""
    if doc is None:
        return f"array {name!r}: {name}/zarr.json is missing"
    if isinstance(doc, str):
        return f"array {name!r}: {name}/zarr.json is {doc}"
    found = canonical_sha256(doc)
    if found != want:
        return (
            f"array {name!r}: {name}/zarr.json has sha256 {found[:16]}..., recorded "
            f"{want[:16]}... at finalisation"
        )
    return None


def _metadata_error(path: str, problems: list[str]) -> StoreCorruptError:
    return StoreCorruptError(
        f"{path}: the metadata of {len(problems)} array(s) changed since the store was "
        f"finalised: {'; '.join(problems[:8])}; the stored chunks may no longer mean what "
        f"zarr.json says (shape, data type, fill value, codecs): {REDO}"
    )


def _missing_error(path: str, missing: dict[str, list[str]]) -> StoreCorruptError:
    """The error for chunk files absent from a complete store (``array -> files``)."""
    parts = [
        f"array {name!r} is missing chunk file(s) {', '.join(files[:8])}"
        + (f" and {len(files) - 8} more" if len(files) > 8 else "")
        for name, files in missing.items()
    ]
    return StoreCorruptError(
        f"{path}: {'; '.join(parts)} (zarr would read them as the fill value, zeros); expected "
        f"every chunk file of a complete store on disk: {REDO}"
    )


def _is_sharded(doc: dict[str, Any]) -> bool:
    codecs = doc.get("codecs") or [{}]
    return isinstance(codecs[0], dict) and codecs[0].get("name") == "sharding_indexed"


def absent_chunk_files(local: Path, name: str, meta: ArrayV3Metadata) -> list[str]:
    """Chunk files (relative to the store) of an unsharded array that are absent or empty."""
    if 0 in meta.shape:
        return []  # no element, no chunk
    grid = [-(-int(n) // int(c)) for n, c in zip(meta.shape, meta.chunks, strict=True)]
    out = []
    for coords in itertools.product(*(range(n) for n in grid)):
        rel = f"{name}/{meta.encode_chunk_key(coords)}"
        try:
            if os.stat(f"{local}/{rel}").st_size == 0:
                out.append(rel)
        except FileNotFoundError:
            out.append(rel)
    return out


def _damaged(path: str, name: str, bad: list[str], cause: str) -> StoreCorruptError:
    """The error for damaged chunks of array ``name``; ``bad`` describes each chunk."""
    return StoreCorruptError(
        f"{path}: array {name!r} has {len(bad)} damaged chunk(s): {'; '.join(bad[:8])} "
        f"({cause}); expected every chunk to decode and match its crc32c: re-create the store "
        "with 'sidecache cache ... --overwrite' (run 'sidecache verify' to list every damaged "
        "chunk)"
    )


def _row_range(arr: Any, selection: Any) -> range:
    n = int(arr.shape[0]) if arr.shape else 1
    first = selection[0] if isinstance(selection, tuple) and selection else selection
    if isinstance(first, slice):
        return range(*first.indices(n))
    if isinstance(first, int | np.integer):
        return range(int(first), int(first) + 1)
    return range(n)


def _chunk_file(arr: Any, name: str, chunk: int) -> str:
    rows = arr.shards[0] if arr.shards is not None else arr.chunks[0]
    key = arr.metadata.encode_chunk_key((chunk * arr.chunks[0] // rows,) + (0,) * (arr.ndim - 1))
    return f"{name}/{key}"


def _bad_chunks(arr: Any, name: str, selection: Any) -> list[str]:
    """Read the selection chunk by chunk and describe every chunk that fails to decode."""
    if not arr.shape:
        return []
    step, rows = int(arr.chunks[0]), _row_range(arr, selection)
    if not rows:
        return []
    bad = []
    for chunk in range(rows.start // step, (rows.stop - 1) // step + 1):
        a, b = chunk * step, min((chunk + 1) * step, int(arr.shape[0]))
        try:
            arr[a:b]
        except (ValueError, RuntimeError, OSError):
            coords = (chunk,) + (0,) * (arr.ndim - 1)
            bad.append(f"chunk {coords} [rows {a}:{b}] in file {_chunk_file(arr, name, chunk)}")
    return bad


def _missing_files(path: str, name: str, arr: Any, selection: Any) -> list[str]:
    """Files of the selection of an array whose every chunk is written that are absent or empty
    (zarr would serve fill values)."""
    root = locate(path).local
    if root is None or not root.is_dir() or not arr.shape:
        return []
    step = int(arr.shards[0] if arr.shards is not None else arr.chunks[0])
    rows = _row_range(arr, selection)
    if not rows:
        return []
    out = []
    for unit in range(rows.start // step, (rows.stop - 1) // step + 1):
        rel = _chunk_file(arr, name, unit * step // int(arr.chunks[0]))
        file = root / rel
        if not file.is_file() or file.stat().st_size == 0:
            out.append(rel)
    return out
