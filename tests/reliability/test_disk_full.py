"""A disk that fills up, and an output folder that cannot be written: stage one stops with a named
error and exit 2, leaves a store that is not marked complete, and resumes to an identical store
once space is freed. ENOSPC is injected into zarr's local writes (always) and also produced by a
real, small tmpfs when this process may mount one (root on Linux)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zarr.storage._local as zarr_local

import storage.shardfile
from stages.cli import main
from tests.conftest import small_cache
from tests.pipeline.test_cache import assert_same_store

SMALL = ["--chunk-mb", str(256 * 64 / (1 << 20)), "--shard-chunks", "2", "--token-budget", "256"]


def cache_argv(model: str, data: str, out: Path) -> list[str]:
    return ["cache", "--backbone", model, "--data", data, "--out", str(out), "--device", "cpu",
            "--no-progress", *SMALL]  # fmt: skip


def marked_complete(store: Path) -> bool:
    try:
        meta = json.loads((store / "zarr.json").read_text())["attributes"]["sidecache"]
    except (OSError, KeyError, ValueError):
        return False
    return bool(meta.get("complete"))


def store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def reference(model_dir, glue_dir, tmp_path_factory) -> tuple[str, str, Path]:
    model, data = model_dir("bert"), f"glue:{glue_dir}"
    ref = tmp_path_factory.mktemp("disk") / "ref"
    small_cache(model, data, ref)
    return model, data, ref


@contextlib.contextmanager
def quota(monkeypatch: pytest.MonkeyPatch, under: Path, limit: int, code: int) -> Iterator[None]:
    """Writes below ``under`` raise ``OSError(code)`` once ``limit`` bytes were written there:
    zarr's local writes and stage one's own shard files (``storage.shardfile.put_file``)."""
    real_zarr, real_shard = zarr_local._put, storage.shardfile.put_file
    written = {"bytes": 0}

    def count(path: Path, size: int) -> None:
        if Path(path).is_relative_to(under):
            if written["bytes"] + size > limit:
                raise OSError(code, os.strerror(code), str(path))
            written["bytes"] += size

    def put(path: Path, value: Any, exclusive: bool = False) -> int:
        count(path, len(value.as_buffer_like()))
        return real_zarr(path, value, exclusive)

    def put_file(path: Path, parts: list[bytes]) -> None:
        count(path, sum(len(p) for p in parts))
        real_shard(path, parts)

    with monkeypatch.context() as m:
        m.setattr(zarr_local, "_put", put)
        m.setattr(storage.shardfile, "put_file", put_file)
        yield


def test_injected_disk_full_stops_cleanly_and_resumes(reference, tmp_path, monkeypatch, caplog):
    model, data, ref = reference
    out = tmp_path / "store"
    with quota(monkeypatch, out, store_bytes(ref) // 2, errno.ENOSPC), caplog.at_level("ERROR"):
        assert main(cache_argv(model, data, out)) == 2
    assert "DiskFullError" in caplog.text and "No space left on device" in caplog.text
    assert " was still to be written" in caplog.text and "re-run the same command" in caplog.text
    assert not marked_complete(out)
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp"))
    caplog.clear()
    assert main(cache_argv(model, data, out)) == 0
    assert_same_store(ref, out)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_unwritable_output_is_a_named_error(reference, tmp_path, monkeypatch, caplog, code):
    model, data, _ = reference
    out = tmp_path / "store"
    with quota(monkeypatch, tmp_path, 0, code), caplog.at_level(logging.ERROR):
        assert main(cache_argv(model, data, out)) == 2
    assert "StoreWriteError" in caplog.text and "choose another --out" in caplog.text
    assert os.strerror(code) in caplog.text
    assert not marked_complete(out)


def _mount(*args: str) -> bool:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    return done.returncode == 0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 96 KiB tmpfs, or a skip when this process cannot mount one."""
    point = tmp_path / "tmpfs"
    point.mkdir()
    if os.geteuid() != 0 or not _mount("-t", "tmpfs", "-o", "size=96k", "tmpfs", str(point)):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC test covers it")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_real_full_tmpfs_stops_then_resumes_after_growing(reference, tmpfs, caplog):
    model, data, ref = reference
    assert store_bytes(ref) > 96 * 1024, "the reference store must not fit the small tmpfs"
    out = tmpfs / "store"
    with caplog.at_level(logging.ERROR):
        assert main(cache_argv(model, data, out)) == 2
    assert "DiskFullError" in caplog.text and f"the disk holding {out} is full" in caplog.text
    assert "kB was still to be written (4 shards)" in caplog.text
    assert not marked_complete(out)
    assert _mount("-o", "remount,size=4m", str(tmpfs))  # free space
    assert main(cache_argv(model, data, out)) == 0
    assert_same_store(ref, out)


def test_real_read_only_folder(reference, tmp_path, caplog):
    model, data, _ = reference
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0 or not _mount("--bind", "-o", "ro", str(folder), str(folder)):
        pytest.skip("cannot bind-mount read-only here (needs root)")
    try:
        with caplog.at_level(logging.ERROR):
            assert main(cache_argv(model, data, folder / "store")) == 2
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
    assert "StoreWriteError" in caplog.text and "Read-only file system" in caplog.text
