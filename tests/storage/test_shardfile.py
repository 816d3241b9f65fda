"""storage.shardfile writes the very bytes zarr writes, and reads what zarr reads."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.codecs import ShardingCodecIndexLocation

from storage import shardfile
from storage.codecs import compressors_for, parse_codec
from storage.shardfile import ShardFile, ShardFileError

# (zarr dtype, codec, row shape): every stored dtype and codec stage one can write
CASES = [
    ("uint16", "blosc-zstd:3", (24,)),
    ("uint16", "blosc-lz4:5", (24,)),
    ("int8", "blosc-lz4:5", (24,)),
    ("float16", "zstd:3", (24,)),
    ("float32", "none", (24,)),
    ("float32", "blosc-lz4:5", ()),  # int8 scales: one float per row
]
N_ROWS, CHUNK, SHARD = 70, 8, 32  # a partial last chunk and shard, chunks past the array's end


def make(group: zarr.Group, name: str, dtype: str, codec: str, row: tuple[int, ...]) -> zarr.Array:
    return group.create_array(
        name,
        shape=(N_ROWS, *row),
        dtype=dtype,
        chunks=(CHUNK, *row),
        shards=(SHARD, *row),
        compressors=compressors_for(parse_codec(codec), dtype),
        fill_value=0,
        config={"write_empty_chunks": True},
    )


def values(dtype: str, row: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N_ROWS, *row)).astype(np.float32)
    if dtype == "uint16":
        return (x.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bits
    if dtype == "int8":
        return np.clip(np.round(x * 40), -127, 127).astype(np.int8)
    return x.astype(dtype)


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("c/*/*")} | {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.glob("c/*") if p.is_file()
    }


@pytest.mark.parametrize(("dtype", "codec", "row"), CASES)
def test_shard_files_are_byte_identical_to_zarr(tmp_path: Path, dtype, codec, row) -> None:
    group = zarr.open_group(tmp_path, mode="w", zarr_format=3)
    data = values(dtype, row)
    by_zarr, mine = make(group, "zarr", dtype, codec, row), make(group, "mine", dtype, codec, row)
    by_zarr[...] = data
    file = ShardFile.of(mine, tmp_path / "mine")
    assert file is not None
    for shard in range(-(-N_ROWS // SHARD)):
        file.write(shard, data[shard * SHARD : (shard + 1) * SHARD])
    expected, written = files(tmp_path / "zarr"), files(tmp_path / "mine")
    assert len(expected) == 3 and expected == written  # the last shard is a partial one
    assert np.array_equal(mine[...], data)  # and zarr reads them
    assert not list((tmp_path / "mine").rglob("*.tmp"))


@pytest.mark.parametrize(("dtype", "codec", "row"), CASES)
def test_reads_equal_zarr_reads(tmp_path: Path, dtype, codec, row) -> None:
    arr = make(zarr.open_group(tmp_path, mode="w", zarr_format=3), "x", dtype, codec, row)
    data = values(dtype, row, seed=1)
    arr[...] = data
    file = ShardFile.of(arr, tmp_path / "x")
    assert file is not None
    rng = np.random.default_rng(2)
    spans = [(0, N_ROWS), (0, 1), (N_ROWS - 1, N_ROWS), (CHUNK - 1, SHARD + 1)]
    spans += [tuple(sorted(rng.choice(N_ROWS + 1, 2, replace=False))) for _ in range(20)]
    for a, b in spans:
        out = np.empty((b - a, *row), dtype)
        file.read(a, b, out)
        assert np.array_equal(out, data[a:b]), (a, b)
    strided = np.zeros((N_ROWS, 2, *row), dtype)  # e.g. the loader's (rows, layers, d) buffer
    file.read(0, N_ROWS, strided[:, 1])
    assert np.array_equal(strided[:, 1], data) and not strided[:, 0].any()


def test_only_layouts_it_writes_are_taken(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path, mode="w", zarr_format=3)
    plain = group.create_array("plain", shape=(10, 4), dtype="uint16", chunks=(5, 4))
    assert ShardFile.of(plain, tmp_path / "plain") is None  # not sharded
    split = group.create_array("split", shape=(16, 4), dtype="uint16", chunks=(8, 2),
                               shards=(16, 4))  # fmt: skip
    assert ShardFile.of(split, tmp_path / "split") is None  # chunked along the second axis
    front = zarr.create_array(
        store=str(tmp_path / "front"),
        shape=(16, 4),
        dtype="uint16",
        chunks=(8, 4),
        shards={"shape": (16, 4), "index_location": ShardingCodecIndexLocation.start},
    )
    assert ShardFile.of(front, tmp_path / "front") is None  # index at the start


def test_damage_is_named(tmp_path: Path) -> None:
    arr = make(zarr.open_group(tmp_path, mode="w", zarr_format=3), "x", "uint16", "blosc-lz4:5",
               (24,))  # fmt: skip
    arr[...] = values("uint16", (24,))
    file = ShardFile.of(arr, tmp_path / "x")
    assert file is not None
    out = np.empty((N_ROWS, 24), np.uint16)
    path = file.path(1)
    good = path.read_bytes()
    index = np.frombuffer(good[-(16 * 4 + 4) : -4], "<u8").reshape(4, 2)
    blob = bytearray(good)
    blob[int(index[2, 0]) + 3] ^= 0x40  # a byte inside the third chunk of shard 1
    path.write_bytes(bytes(blob))
    with pytest.raises(ShardFileError, match="fails its crc32c") as caught:
        file.read(0, N_ROWS, out)
    assert caught.value.chunk == 4 + 2
    file.read(0, SHARD + 2 * CHUNK, out[: SHARD + 2 * CHUNK])  # the damage is not in these
    for broken, words in ((good[:-1], "index"), (b"", "too short"), (good + b"x", "index")):
        path.write_bytes(broken)
        with pytest.raises(ShardFileError, match=words):
            file.read(SHARD, SHARD + 1, out[:1])
    path.unlink()
    with pytest.raises(ShardFileError, match="missing"):
        file.read(SHARD, SHARD + 1, out[:1])


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, (1 << 24) + 5])
@pytest.mark.parametrize("direct", [True, False])
def test_put_file_writes_exactly_the_bytes_direct_or_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, direct: bool
) -> None:
    """Shard files go out with O_DIRECT (whole blocks from a page-aligned buffer, then truncated
    to their length) or, where the file system refuses it, through the page cache: the same
    bytes either way, a shorter rewrite leaves nothing of the old file, no temporary file."""
    monkeypatch.setattr(shardfile, "DIRECT_WRITES", direct and shardfile.DIRECT_WRITES)
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    target = tmp_path / "c" / "0"
    shardfile.put_file(target, [data[:3], data[3:]])
    assert target.read_bytes() == data
    shardfile.put_file(target, [data[: size // 2]])
    assert target.read_bytes() == data[: size // 2]
    assert [p.name for p in target.parent.iterdir()] == ["0"]


@pytest.mark.parametrize("refuses", ["open", "write"])
def test_a_file_system_without_o_direct_falls_back_to_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuses: str
) -> None:
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real_open, real_write = os.open, os.write
    direct_fds: set[int] = set()

    def opening(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT and refuses == "open":
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        fd = real_open(path, flags, *args)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def writing(fd: int, data: Any) -> int:
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(shardfile, "DIRECT_WRITES", True)
    monkeypatch.setattr(shardfile.os, "open", opening)
    monkeypatch.setattr(shardfile.os, "write", writing)
    shardfile.put_file(tmp_path / "f", [b"ab", b"c"])
    assert (tmp_path / "f").read_bytes() == b"abc"
    assert shardfile.DIRECT_WRITES is False  # not tried again by this process
