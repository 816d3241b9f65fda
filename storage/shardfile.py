"""Whole shard files of the big per-layer arrays, encoded and decoded without zarr's chunk pipeline.

Stage one always writes whole shards and the loader always reads whole chunks. For those two
cases zarr 3.1's generic path adds work around the codec (a fill-value template per shard,
copies, an asyncio hop per chunk, under the GIL) that on a CPU-bound run competes with the
backbone and with training for the same cores (``benchmarks/shard_io.py`` measures both paths).
This module writes and reads the same bytes directly: a shard file is the standard
``sharding_indexed`` layout (chunks back to back, each ``blosc|zstd`` + crc32c, then the index of
``(offset, nbytes)`` pairs + crc32c at the end; chunks past the array's end absent, a partial
last chunk padded with the fill value). Tests compare the files with zarr's byte for byte, and
any Zarr v3 reader reads them.

:meth:`ShardFile.of` returns ``None`` for any array whose codecs are not the ones written here;
callers then use zarr's own path, which remains the reference.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import numcodecs
import numpy as np
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

from storage.atomic import atomic_path

EMPTY = np.iinfo(np.uint64).max  # index entry of a chunk that is not in the file
SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


class ShardFileError(ValueError):
    """A shard file does not decode: missing, truncated, or a checksum that does not match.
    ``chunk`` is the first damaged chunk (index in the array) when one can be named."""

    def __init__(self, message: str, chunk: int | None = None):
        super().__init__(message)
        self.chunk = chunk


def _crc(data: Any) -> bytes:
    """crc32c of ``data`` as zarr stores it. The ``crc32c`` package, not ``google_crc32c`` (which
    zarr uses): the same checksum, two to three times as fast here (``benchmarks/shard_io.py``
    prints both)."""
    return int(crc32c.crc32c(data)).to_bytes(4, "little")


def _compressor(codec: Any) -> Any:
    """The numcodecs codec doing what a zarr bytes-to-bytes codec does; ``None`` if unknown."""
    if isinstance(codec, BloscCodec):
        return numcodecs.Blosc(
            cname=codec.cname.value,
            clevel=codec.clevel,
            shuffle=SHUFFLES[codec.shuffle.value],
            blocksize=codec.blocksize,
            typesize=codec.typesize,
        )
    if isinstance(codec, ZstdCodec):
        return numcodecs.Zstd(level=codec.level, checksum=codec.checksum)
    return None


ALIGN = 4096  # O_DIRECT wants buffer address, file offset and length in whole blocks
DIRECT_WRITES = hasattr(os, "O_DIRECT")  # switched off (for a process) if the file system says no
_direct = threading.local()  # each writer thread's reused page-aligned staging buffer


def _staging(size: int) -> mmap.mmap:
    buf: mmap.mmap | None = getattr(_direct, "buf", None)
    if buf is None or len(buf) < size:
        if buf is not None:
            buf.close()
        buf = _direct.buf = mmap.mmap(-1, -(-size // (1 << 24)) * (1 << 24))  # 16 MB steps
    return buf


def _write_direct(tmp: Path, parts: Sequence[bytes]) -> bool:
    """Write ``parts`` back to back to ``tmp`` with ``O_DIRECT``, past the page cache (which, on a
    CPU-bound run, costs more CPU to fill than the compression). ``False`` when the file system
    refuses ``O_DIRECT`` on open or write (tmpfs, some network or FUSE file systems): the caller
    then writes through the page cache, and so does every later write of this process."""
    global DIRECT_WRITES
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        DIRECT_WRITES = False
        return False
    try:
        size = sum(len(p) for p in parts)
        padded = -(-size // ALIGN) * ALIGN
        buf = _staging(padded)
        at = 0
        for part in parts:  # the file's image, assembled once in the aligned buffer
            buf[at : at + len(part)] = part
            at += len(part)
        buf[size:padded] = bytes(padded - size)
        with memoryview(buf) as whole:
            view = whole[:padded]
            done = 0
            try:
                while done < padded:
                    done += os.write(fd, view[done:])
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                DIRECT_WRITES = False  # opened, but the writes are refused: write normally
                return False
            finally:
                view.release()
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return True


def put_file(final: Path, parts: Sequence[bytes]) -> None:
    """Write ``parts`` back to back to a temporary file beside ``final`` and rename it over
    ``final``; on any failure (a full disk, say) the temporary file is removed and ``final`` is
    untouched."""
    with atomic_path(final) as tmp:
        if not (DIRECT_WRITES and _write_direct(tmp, parts)):
            with open(tmp, "wb") as f:
                f.writelines(parts)


@dataclass(frozen=True)
class ShardFile:
    """The shard layout of one array chunked (and sharded) along its first axis only."""

    folder: Path  # the array's folder in a local store
    n_rows: int
    chunk_rows: int
    shard_rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fill: Any
    compressor: Any  # numcodecs codec, or None for no compression
    keys: Any  # zarr's chunk-key encoder: shard coordinates -> "c/3/0"

    @classmethod
    def of(cls, arr: Any, folder: Path) -> ShardFile | None:
        """The layout of ``arr`` (a zarr Array in a local store at ``folder``), or ``None`` when
        it is not exactly a first-axis-sharded array with little-endian bytes, an optional blosc
        or zstd compressor and crc32c, and a little-endian, crc32c-checked index at the end."""
        meta = arr.metadata
        codecs: tuple[Any, ...] = tuple(getattr(meta, "codecs", ()))
        if arr.shards is None or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        shard = codecs[0]
        inner, index = list(shard.codecs), list(shard.index_codecs)
        little = BytesCodec(endian="little")
        if (
            shard.index_location.value != "end"
            or index != [little, Crc32cCodec()]
            or not inner
            or inner[0] not in (little, BytesCodec(endian=None))
            or not isinstance(inner[-1], Crc32cCodec)
            or len(inner) > 3
            or arr.dtype.byteorder == ">"
        ):
            return None
        compressor = None
        if len(inner) == 3:
            compressor = _compressor(inner[1])
            if compressor is None:
                return None
        if tuple(arr.chunks[1:]) != tuple(arr.shape[1:]) or arr.shards[1:] != arr.shape[1:]:
            return None
        return cls(
            folder=folder,
            n_rows=int(arr.shape[0]),
            chunk_rows=int(arr.chunks[0]),
            shard_rows=int(arr.shards[0]),
            row_shape=tuple(int(x) for x in arr.shape[1:]),
            dtype=np.dtype(arr.dtype),
            fill=meta.fill_value,
            compressor=compressor,
            keys=meta.encode_chunk_key,
        )

    @property
    def per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    def key(self, shard: int) -> str:
        return str(self.keys((shard,) + (0,) * len(self.row_shape)))

    def path(self, shard: int) -> Path:
        return self.folder / self.key(shard)

    # -- writing ---------------------------------------------------------------------------------
    def encode(self, shard: int, rows: np.ndarray) -> bytes:
        """The bytes of shard ``shard`` holding ``rows`` (all of the shard's rows in the array)."""
        return b"".join(self._parts(shard, rows))

    def _parts(self, shard: int, rows: np.ndarray) -> list[bytes]:
        """:meth:`encode`'s bytes in pieces (each chunk, its crc32c, the index, its crc32c)."""
        start = shard * self.shard_rows
        n = min(self.shard_rows, self.n_rows - start)
        if rows.shape != (n, *self.row_shape):
            raise ValueError(f"shard {shard} holds {n} rows, got an array of shape {rows.shape}")
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        parts: list[bytes] = []
        index = np.full((self.per_shard, 2), EMPTY, dtype="<u8")
        at = 0
        for k in range(self.per_shard):
            a = k * self.chunk_rows
            if a >= n:
                break  # past the array's end: not written
            chunk = rows[a : a + self.chunk_rows]
            if len(chunk) < self.chunk_rows:  # the array's last chunk, padded like zarr does
                pad = np.full((self.chunk_rows, *self.row_shape), self.fill, dtype=self.dtype)
                pad[: len(chunk)] = chunk
                chunk = pad
            body = chunk.tobytes() if self.compressor is None else self.compressor.encode(chunk)
            body = bytes(body)
            parts += [body, _crc(body)]
            index[k] = (at, len(body) + 4)
            at += len(body) + 4
        table = index.tobytes()
        return [*parts, table, _crc(table)]

    def write(self, shard: int, rows: np.ndarray) -> None:
        """Write shard ``shard`` atomically (:func:`put_file`): a killed process never leaves a
        torn shard file behind."""
        put_file(self.path(shard), self._parts(shard, rows))

    # -- reading ---------------------------------------------------------------------------------
    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Rows ``[start, stop)`` into ``out`` (shape ``(stop - start, *row_shape)``, any strides).

        Raises :class:`ShardFileError` naming the shard file and chunk for a missing or empty
        file, a bad index, a chunk outside the file, a checksum mismatch or a codec failure."""
        row = start
        while row < stop:
            shard = row // self.shard_rows
            end = min(stop, (shard + 1) * self.shard_rows)
            self._read_shard(shard, row, end, out[row - start : end - start])
            row = end

    def _read_shard(self, shard: int, start: int, stop: int, out: np.ndarray) -> None:
        path = self.path(shard)
        first = start // self.chunk_rows
        last = (stop - 1) // self.chunk_rows
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ShardFileError(f"file {self.key(shard)} is missing", first) from None
        try:
            size = os.fstat(fd).st_size
            tail = 16 * self.per_shard + 4
            if size < tail:
                raise ShardFileError(f"file {self.key(shard)} is too short ({size} bytes)", first)
            raw = os.pread(fd, tail, size - tail)
            if _crc(raw[:-4]) != raw[-4:]:
                raise ShardFileError(f"the index of {self.key(shard)} fails its crc32c", first)
            index = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.per_shard, 2)
            base = shard * self.per_shard  # chunk number of the shard's first chunk
            local = index[first - base : last - base + 1]
            present = local[:, 0] != EMPTY
            if not present.any():
                lo = hi = 0
            else:
                lo = int(local[present, 0].min())
                hi = int((local[present, 0] + local[present, 1]).max())
            if hi > size - tail:
                raise ShardFileError(f"the index of {self.key(shard)} is out of range", first)
            blob = os.pread(fd, hi - lo, lo) if hi > lo else b""
        finally:
            os.close(fd)
        view = np.frombuffer(blob, dtype=np.uint8)
        for chunk in range(first, last + 1):
            a = max(start, chunk * self.chunk_rows)
            b = min(stop, (chunk + 1) * self.chunk_rows)
            dest = out[a - start : b - start]
            offset, nbytes = (int(x) for x in local[chunk - first])
            if offset == EMPTY:
                dest[...] = self.fill
                continue
            body = view[offset - lo : offset - lo + nbytes - 4]
            stored = view[offset - lo + nbytes - 4 : offset - lo + nbytes].tobytes()
            if nbytes < 4 or _crc(body) != stored:
                raise ShardFileError(f"chunk in {self.key(shard)} fails its crc32c", chunk)
            try:
                if self.compressor is None:
                    decoded = np.frombuffer(body, dtype=self.dtype)
                else:
                    decoded = np.frombuffer(self.compressor.decode(body), dtype=self.dtype)
                decoded = decoded.reshape(self.chunk_rows, *self.row_shape)
            except (ValueError, RuntimeError) as exc:
                message = f"chunk in {self.key(shard)} does not decode: {exc}"
                raise ShardFileError(message, chunk) from exc
            dest[...] = decoded[a - chunk * self.chunk_rows : b - chunk * self.chunk_rows]
