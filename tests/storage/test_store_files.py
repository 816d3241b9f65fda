"""What a store's files guard beyond the chunks' crc32c: a chunk file that is missing (zarr would
read it as the fill value), an array's ``zarr.json`` changed after finalisation, and temporary
files that a killed writer left behind."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from storage import (
    BatchRows,
    Layout,
    StoreCorruptError,
    claim,
    create_store,
    open_store,
    shard_slot,
)
from storage import writer as writer_mod
from storage.claims import others_alive

IDENTITY, TASK = {"backbone": {"name": "t"}}, {"type": "classification"}
N, D = 40, 8


def build(tmp_path: Path, *, finish: bool = True) -> tuple[str, Layout]:
    """A store whose labels and segment ids are all zero (every chunk equal to the fill value);
    with ``finish``, complete, else created with no shard written (a killed stage one)."""
    lengths = np.random.default_rng(0).integers(1, 9, size=N)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rows = int(offsets[-1])
    layout = Layout(N, rows, rows, [0, 1], D, "all", "float32", chunk_rows=16, shard_rows=64,
                    has_token_type_ids=True)  # fmt: skip
    arrays = {
        "offsets": offsets,
        "token_offsets": offsets,
        "token_ids": np.arange(1, rows + 1, dtype=np.int32),
        "labels": np.zeros(N, dtype=np.int64),
        "token_type_ids": np.zeros(rows, dtype=np.int8),
    }
    path = str(tmp_path / "store")
    writer = create_store(path, layout, IDENTITY, TASK, arrays)
    assert writer is not None
    if not finish:
        writer.abort()
        return path, layout
    values = np.random.default_rng(1).standard_normal((rows, D)).astype(np.float32)
    stats = np.ones((rows, 2, 4), np.float32)
    writer.put(BatchRows(np.arange(N), lengths, [values, values], None, stats))
    assert writer.close()["complete"]
    return path, layout


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several chunks per small array, so the message must name the right one."""
    monkeypatch.setattr(writer_mod, "SMALL_CHUNK", 16)


# -- missing chunk files ----------------------------------------------------------------------
def read_whole(path: str, name: str) -> Any:
    reader = open_store(path, check_files=False)  # the lazy check, as when an array is read
    return reader.labels if name == "labels" else reader.all_tokens()[1]


@pytest.mark.parametrize("name", ["labels", "token_type_ids"])
@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_a_missing_all_zero_chunk_is_refused_naming_array_and_file(
    tmp_path: Path, small_chunks: None, name: str, how: str
) -> None:
    path, _ = build(tmp_path)
    chunks = sorted(p.name for p in (Path(path) / name / "c").iterdir())
    assert len(chunks) >= 3, "every all-zero chunk is written as a file"
    assert not read_whole(path, name).any()
    victim = Path(path) / name / "c" / "1"
    if how == "deleted":
        victim.unlink()
    else:
        victim.write_bytes(b"")
    with pytest.raises(StoreCorruptError) as caught:
        open_store(path)
    message = str(caught.value)
    assert f"array {name!r} is missing chunk file(s) {name}/c/1 " in message, message
    assert "--overwrite" in message and "restore" in message
    with pytest.raises(StoreCorruptError) as caught:  # an empty file also fails its crc32c
        read_whole(path, name)
    message = str(caught.value)
    assert f"array {name!r}" in message and f"{name}/c/1 " in message, message
    assert "--overwrite" in message


def test_every_small_array_chunk_is_checked_on_open(tmp_path: Path, small_chunks: None) -> None:
    path, _ = build(tmp_path)
    open_store(path)
    for name in ("offsets", "token_offsets", "token_ids"):
        kept = tmp_path / "kept"
        shutil.copy(Path(path) / name / "c" / "0", kept)
        (Path(path) / name / "c" / "0").unlink()
        with pytest.raises(StoreCorruptError, match=f"array '{name}' is missing chunk"):
            open_store(path)
        shutil.copy(kept, Path(path) / name / "c" / "0")
    open_store(path)


def drop_integrity(path: str) -> None:
    """Make the store look like one written before the ``integrity`` key existed."""
    group = zarr.open_group(path, mode="r+")
    meta = dict(group.attrs["sidecache"])  # type: ignore[arg-type]
    del meta["integrity"]
    group.attrs["sidecache"] = meta


def test_a_store_written_before_the_integrity_record_still_opens(tmp_path: Path) -> None:
    path, _ = build(tmp_path)
    drop_integrity(path)
    reader = open_store(path)
    assert reader.metadata_problems() is None  # verify reports "not recorded"
    assert not reader.labels.any() and reader.extra("token_ids")[0] == 1
    # there, a labels chunk may legitimately be absent (all zero): it reads as zeros
    (Path(path) / "labels" / "c" / "0").unlink()
    assert not open_store(path).labels.any()
    (Path(path) / "token_ids" / "c" / "0").unlink()  # never all zero: still refused
    with pytest.raises(StoreCorruptError, match="'token_ids' is missing chunk"):
        open_store(path).extra("token_ids")


# -- array metadata ---------------------------------------------------------------------------
def edit(path: str, name: str, change: Any) -> None:
    file = Path(path) / name / "zarr.json"
    doc = json.loads(file.read_text())
    change(doc)
    file.write_text(json.dumps(doc, indent=2))


def grow(doc: dict[str, Any]) -> None:
    doc["shape"][0] += 16


def narrow(doc: dict[str, Any]) -> None:
    doc["data_type"] = "int32"


def refill(doc: dict[str, Any]) -> None:
    doc["fill_value"] = 7


def recompress(doc: dict[str, Any]) -> None:
    doc["codecs"][1]["configuration"]["clevel"] = 1


TAMPERING = {
    "shape": ("hidden/1", grow),
    "dtype": ("labels", narrow),
    "fill": ("token_type_ids", refill),
    "codec": ("offsets", recompress),  # the chunks still decode: only the hash sees it
}


@pytest.mark.parametrize("kind", sorted(TAMPERING))
def test_changed_array_metadata_is_refused_on_open(tmp_path: Path, kind: str) -> None:
    path, _ = build(tmp_path)
    name, change = TAMPERING[kind]
    edit(path, name, change)
    with pytest.raises(StoreCorruptError) as caught:
        open_store(path)
    message = str(caught.value)
    assert f"array {name!r}: {name}/zarr.json has sha256" in message and "recorded" in message
    problems = open_store(path, check_files=False).metadata_problems()
    assert problems is not None and len(problems) == 1 and f"array {name!r}" in problems[0]


def test_reformatted_metadata_is_not_a_change(tmp_path: Path) -> None:
    """The hash is of canonical JSON: indentation and key order do not count."""
    path, _ = build(tmp_path)
    file = Path(path) / "labels" / "zarr.json"
    doc = json.loads(file.read_text())
    file.write_text(json.dumps(dict(reversed(list(doc.items())))))
    assert open_store(path).metadata_problems() == []


def test_a_missing_or_added_array_is_reported(tmp_path: Path) -> None:
    path, _ = build(tmp_path)
    group = zarr.open_group(path, mode="r+")
    group.create_array("extra", shape=(3,), dtype="int8")
    assert open_store(path).metadata_problems() == [
        "array 'extra' was not in the store when it was finalised (added later)"
    ]
    (Path(path) / "labels" / "zarr.json").unlink()
    with pytest.raises(StoreCorruptError, match=r"'labels': labels/zarr\.json is missing"):
        open_store(path)


# -- temporary files of a killed writer -------------------------------------------------------
def plant_stale_files(path: str) -> list[Path]:
    """What a writer killed mid-write leaves: zarr's ``NAME.HEX.partial``, sidecache's
    ``.NAME.PID.THREAD.tmp`` (here of a pid no process has)."""
    root = Path(path)
    files = [
        root / "hidden" / "0" / "c" / "1" / ".0.4999999.140000000.tmp",
        root / "progress" / "c" / "0" / "0" / f"0.{'ab' * 16}.partial",
        root / f"zarr.{'cd' * 16}.partial",
    ]
    for file in files:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"torn")
    return files


def resume(path: str, layout: Layout) -> None:
    writer = create_store(path, layout, IDENTITY, TASK, {})
    assert writer is not None and not writer.done.any()
    writer.abort()


def foreign_claim(path: str, slot: str, pid: int) -> None:
    folder = Path(path + ".claims")
    folder.mkdir(exist_ok=True)
    info = {"pid": pid, "host": socket.gethostname(), "since": time.time()}
    (folder / slot).write_text(json.dumps(info))


def test_stale_temporary_files_are_removed_on_resume(tmp_path: Path) -> None:
    path, layout = build(tmp_path, finish=False)
    files = plant_stale_files(path)
    with claim(path, shard_slot(0, 2)):  # this process's own claim does not keep them
        resume(path, layout)
    assert not any(f.exists() for f in files)
    assert (Path(path) / "zarr.json").is_file() and (Path(path) / "labels" / "c" / "0").is_file()


def test_temporary_files_are_kept_while_another_writer_holds_a_live_claim(
    tmp_path: Path,
) -> None:
    path, layout = build(tmp_path, finish=False)
    files = plant_stale_files(path)
    other = subprocess.Popen(["sleep", "60"])
    try:
        foreign_claim(path, shard_slot(1, 2), other.pid)
        with claim(path, shard_slot(0, 2)):
            assert others_alive(path) == [shard_slot(1, 2)]
            resume(path, layout)
        assert all(f.exists() for f in files), "another live writer may be writing them"
    finally:
        other.kill()
        other.wait()
    assert others_alive(path) == []  # its process is gone: the claim is stale
    resume(path, layout)
    assert not any(f.exists() for f in files)


def test_finalising_removes_what_a_killed_writer_left(tmp_path: Path) -> None:
    """Once every shard is on disk no writer is still writing: finalisation removes the
    temporary files even while a shard worker still holds its claim."""
    path, _ = build(tmp_path)
    group = zarr.open_group(path, mode="r+")
    meta = dict(group.attrs["sidecache"])  # type: ignore[arg-type]
    group.attrs["sidecache"] = dict(meta, complete=False)
    files = plant_stale_files(path)
    foreign_claim(path, shard_slot(1, 2), os.getppid())
    writer_mod.finalize_store(path)
    assert not any(f.exists() for f in files)
    assert open_store(path).complete
