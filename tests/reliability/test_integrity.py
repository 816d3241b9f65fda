"""Flipped bytes anywhere in a store's chunk files are caught by ``verify`` and by the loader.

Every trial damages a copy of one tiny store, seeded, and cycles through the places a byte can
sit: a chunk's compressed body, a chunk's crc32c, a shard's index, the index's crc32c, a chunk of
an unsharded array; plus whole-file damage (truncated, emptied, deleted, bytes appended). Shard
files hold chunks back to back and end in the index; there is no padding (checked below), so
every byte of a chunk file is covered by a checksum. Every chunk is a file, all-zero ones too, so
a deleted labels or segment-id file is caught like any other; an array's changed ``zarr.json``
is caught by its hash recorded at finalisation.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import StoreCorruptError
from pipeline.loader import StoreLoader
from pipeline.verify import check_array_metadata, check_chunks, run_verify
from storage import open_store
from tests.conftest import small_cache

TRIALS = 60
LOADER_READS = ("hidden/", "offsets", "token_offsets", "labels")  # what stage two reads
KINDS = ("chunk body", "chunk crc", "shard index", "index crc", "unsharded chunk",
         "many bytes", "truncated", "emptied", "deleted", "appended")  # fmt: skip


@pytest.fixture(scope="module")
def pristine(model_dir, glue_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "store"
    small_cache(model_dir("bert"), f"glue:{glue_dir}", out)
    return out


def chunk_files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file() and p.name != "zarr.json")


def shard_index(path: Path, chunks: int) -> np.ndarray:
    """``(chunks, 2)`` (offset, nbytes) of a shard file: ``16 * chunks`` bytes + 4 of crc32c."""
    blob = path.read_bytes()
    return np.frombuffer(blob[-(16 * chunks + 4) : -4], dtype="<u8").reshape(chunks, 2)


def test_shard_files_have_no_bytes_outside_chunks_and_index(pristine: Path) -> None:
    reader = open_store(pristine)
    per_file = reader.layout.shard_rows // reader.layout.chunk_rows
    for path in pristine.glob("hidden/*/c/*/0"):
        index = shard_index(path, per_file)
        used = index[index[:, 0] != np.iinfo(np.uint64).max]
        spans = sorted((int(a), int(a + n)) for a, n in used)
        assert spans[0][0] == 0 and all(x[1] == y[0] for x, y in itertools.pairwise(spans))
        assert spans[-1][1] + 16 * per_file + 4 == path.stat().st_size, path


def damage(store: Path, kind: str, rng: random.Random, per_file: int) -> tuple[str, str]:
    """Damage one file of ``store`` in the way ``kind`` says; ``(array, file)`` it belongs to."""
    sharded = sorted(store.glob("hidden/*/c/*/0"))
    if kind == "unsharded chunk":
        files = [p for p in chunk_files(store) if "hidden" not in p.parts]
    elif kind in ("chunk body", "chunk crc", "shard index", "index crc"):
        files = sharded
    else:
        files = chunk_files(store)
    path = rng.choice(files)
    blob = bytearray(path.read_bytes())
    tail = 16 * per_file + 4
    if kind in ("chunk body", "chunk crc"):
        index = shard_index(path, per_file)
        a, n = (int(x) for x in index[rng.randrange(len(index))])
        if a == np.iinfo(np.uint64).max:
            a, n = (int(x) for x in index[0])
        pos = rng.randrange(a, a + n - 4) if kind == "chunk body" else a + n - 4 + rng.randrange(4)
        positions = [pos]
    elif kind == "shard index":
        positions = [len(blob) - tail + rng.randrange(tail - 4)]
    elif kind == "index crc":
        positions = [len(blob) - 4 + rng.randrange(4)]
    elif kind == "unsharded chunk":
        positions = [rng.randrange(len(blob))]
    elif kind == "many bytes":
        positions = rng.sample(range(len(blob)), k=min(len(blob), rng.randint(2, 16)))
    else:
        positions = []
    for pos in positions:
        blob[pos] ^= rng.randint(1, 255)
    if kind == "truncated":
        blob = blob[: rng.randrange(1, len(blob))]
    elif kind == "emptied":
        blob = bytearray()
    elif kind == "appended":
        blob += bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 64)))
    if kind == "deleted":
        path.unlink()
    else:
        path.write_bytes(bytes(blob))
    rel = path.relative_to(store).as_posix()
    return rel.split("/c/")[0], rel


def loader_detects(store: Path, in_ram: bool) -> StoreCorruptError | None:
    try:
        reader = open_store(store)
        loader = StoreLoader(reader, 16, shuffle=True, ram_budget=(1 << 40) if in_ram else 0)
        for _ in loader.epoch(0):
            pass
    except StoreCorruptError as exc:
        return exc
    return None


def test_every_corruption_is_detected_by_verify_and_by_the_loader(
    pristine: Path, tmp_path: Path
) -> None:
    rng = random.Random(1234)
    per_file = open_store(pristine).layout.shard_rows // open_store(pristine).layout.chunk_rows
    store = tmp_path / "store"
    seen = {"verify": 0, "loader": 0, "loader applies": 0}
    for trial in range(TRIALS):
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(pristine, store)
        kind = KINDS[trial % len(KINDS)]
        array, rel = damage(store, kind, rng, per_file)
        with pytest.raises(StoreCorruptError) as caught:
            check_chunks(open_store(store))
            pytest.fail(f"trial {trial}: {kind} in {rel} went unnoticed by verify")
        message = str(caught.value)
        assert f"array {array!r}" in message and rel in message, (kind, message)
        seen["verify"] += 1
        if array.startswith(LOADER_READS):
            seen["loader applies"] += 1
            exc = loader_detects(store, in_ram=trial % 2 == 0)
            assert exc is not None, (kind, rel)
            assert f"array {array!r}" in str(exc), (kind, str(exc))
            seen["loader"] += 1
    assert seen["verify"] == TRIALS and seen["loader"] == seen["loader applies"] >= 30, seen
    print(f"{TRIALS} trials: {seen}")


@pytest.mark.parametrize("name", ["labels", "token_type_ids"])
def test_a_deleted_all_zero_chunk_is_caught_by_open_verify_and_the_loader(
    pristine: Path, tmp_path: Path, name: str
) -> None:
    """The tiny store's segment ids are all zero (single sentences), the fill value: their chunk
    is a file all the same, and deleting it (or the labels') is damage, named."""
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    if name == "token_type_ids":
        assert not open_store(store).all_tokens()[1].any()
    (store / name / "c" / "0").unlink()
    expected = f"array {name!r} is missing chunk file(s) {name}/c/0 "
    for check in (
        lambda: open_store(store),
        lambda: check_chunks(open_store(store, check_files=False)),
        lambda: run_verify(str(store), samples=0),
    ):
        with pytest.raises(StoreCorruptError, match="--overwrite") as caught:
            check()
        assert expected in str(caught.value), str(caught.value)
    exc = loader_detects(store, in_ram=False)
    assert exc is not None and expected in str(exc)


def set_in(path: Path, keys: tuple[str | int, ...], value: object) -> None:
    doc = json.loads(path.read_text())
    node = doc
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    path.write_text(json.dumps(doc, indent=2))


TAMPERING = {  # (array, keys into its zarr.json, new value)
    "shape": ("hidden/1", ("shape", 0), 1 << 20),
    "dtype": ("labels", ("data_type",), "int32"),
    "fill value": ("token_ids", ("fill_value",), 101),
    "codec": ("hidden/0", ("codecs", 0, "configuration", "codecs", 1, "configuration", "clevel"),
              9),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(TAMPERING))
def test_changed_array_metadata_is_reported_by_verify(
    pristine: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    from stages.cli import main

    name, keys, value = TAMPERING[kind]
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    set_in(store / name / "zarr.json", keys, value)
    with pytest.raises(StoreCorruptError) as caught:
        run_verify(str(store), samples=0)
    message = str(caught.value)
    assert "the metadata of 1 array(s) differs" in message, message
    assert f"array {name!r}: {name}/zarr.json has sha256" in message
    assert main(["verify", str(store), "--samples", "0"]) == 2
    assert "StoreCorruptError" in caplog.text and f"array {name!r}" in caplog.text
    with pytest.raises(StoreCorruptError, match=f"array '{name}'"):
        open_store(store)  # cheap enough to check on every open


def test_verify_says_when_metadata_hashes_were_not_recorded(
    pristine: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store written before the hashes existed still opens and verifies, and the report says
    its metadata could not be checked."""
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    assert check_array_metadata(open_store(store))["recorded"] is True
    meta_file = store / "zarr.json"
    doc = json.loads(meta_file.read_text())
    del doc["attributes"]["sidecache"]["integrity"]
    meta_file.write_text(json.dumps(doc))
    set_in(store / "labels" / "zarr.json", ("attributes",), {"note": "not checked"})
    report = run_verify(str(store), samples=0)
    assert report["metadata"] == {"recorded": False, "arrays": None, "changed": []}
    assert report["checksums"]["damaged"] == []
    assert "no metadata hashes recorded" in caplog.text


def test_verify_cli_reports_a_flipped_byte(pristine: Path, tmp_path: Path, caplog) -> None:
    from stages.cli import main

    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    path = store / "hidden" / "1" / "c" / "0" / "0"
    blob = bytearray(path.read_bytes())
    blob[7] ^= 0x10
    path.write_bytes(bytes(blob))
    assert main(["verify", str(store), "--samples", "0"]) == 2
    assert "StoreCorruptError" in caplog.text and "chunk (0, 0)" in caplog.text
    assert "hidden/1/c/0/0" in caplog.text
    shutil.rmtree(store)
    shutil.copytree(pristine, store)
    report = run_verify(str(store), samples=4, device="cpu")
    assert report["checksums"]["damaged"] == [] and report["mismatches"] == []
