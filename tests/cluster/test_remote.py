"""Stores on an S3-compatible server (moto's real HTTP server on loopback), ``memory://`` and
``file://`` URLs: written by stage one, read back bit for bit, verified, trained from."""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.train import TrainConfig, run_train
from pipeline.verify import run_verify
from storage import WHOLE, ConfigError, StoreBusyError, claim, locate, open_store
from tests.conftest import small_cache
from tests.pipeline.test_cache import assert_same_store

# s3fs keeps one aiohttp session per (async) filesystem instance and never closes it; the
# fixture collects them at teardown, where the "unclosed session" notice is expected
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*ClientSession:pytest.PytestUnraisableExceptionWarning"
)
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "sidecache-test",
    "AWS_SECRET_ACCESS_KEY": "sidecache-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A moto S3 server on a free loopback port with bucket ``sidecache``; the credentials and
    endpoint are in the environment, where s3fs/botocore find them (as they would AWS's)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in [*CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("sidecache")
    try:
        yield "s3://sidecache"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        gc.collect()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def metrics(out: Path) -> dict[str, object]:
    return {p.parent.name: json.loads(p.read_text())["eval"] for p in out.glob("*/metrics.json")}


def test_a_small_store_on_s3_is_bit_exact_and_verifies(s3, model_dir, glue_dir, tmp_path):
    model, data = model_dir("bert"), f"glue:{glue_dir}"
    url = f"{s3}/small"
    assert small_cache(model, data, url, limit=24)["complete"]
    small_cache(model, data, tmp_path / "small", limit=24)
    assert_same_store(tmp_path / "small", url)
    assert run_verify(url, samples=4, device="cpu")["mismatches"] == []
    assert small_cache(model, data, url, limit=24)["complete"]  # a rerun finds it complete


@pytest.mark.slow  # ~110 s on the shared 2-core machine: every chunk is an HTTP request
def test_stage_one_to_s3_reads_back_bit_exact_verifies_and_trains(
    s3, model_dir, glue_dir, tmp_path
):
    model, data = model_dir("bert"), f"glue:{glue_dir}"
    train, dev = f"{s3}/sst2-train", f"{s3}/sst2-dev"
    summary = small_cache(model, data, train)
    assert summary["complete"] and summary["shards"] > 1 and summary["bytes_on_disk"] > 0
    small_cache(model, data, dev, split="dev")
    small_cache(model, data, tmp_path / "train")
    small_cache(model, data, tmp_path / "dev", split="dev")

    assert_same_store(tmp_path / "train", train)  # every array equal, metadata equal
    remote = open_store(train)
    assert remote.summary()["bytes_on_disk"] == open_store(tmp_path / "train").bytes_on_disk()
    report = run_verify(train, samples=remote.layout.n_samples, device="cpu")
    assert report["exact"] and report["mismatches"] == []

    specs = ["linear", "read:hidden=16"]
    for where, out in (((train, dev), "s3"), ((tmp_path / "train", tmp_path / "dev"), "local")):
        run_train(TrainConfig(train=str(where[0]), eval=str(where[1]), specs=specs, epochs=2,
                              out=str(tmp_path / out), progress=False))  # fmt: skip
    assert metrics(tmp_path / "s3") == metrics(tmp_path / "local") != {}


def test_claims_work_on_s3(s3, model_dir, glue_dir):
    target = f"{s3}/claimed"
    with claim(target, WHOLE):
        with pytest.raises(StoreBusyError, match="another stage-one process"):
            small_cache(model_dir("bert"), f"glue:{glue_dir}", target)
        with pytest.raises(StoreBusyError), claim(target, "shard-0-of-2"):
            pass
    assert locate(target).sibling(".claims").list_files() == []


def test_memory_and_file_urls(model_dir, glue_dir, tmp_path):
    model, data = model_dir("bert"), f"glue:{glue_dir}"
    small_cache(model, data, tmp_path / "ref")
    small_cache(model, data, "memory://sidecache-test/store")
    small_cache(model, data, f"file://{tmp_path}/viafile")
    assert_same_store(tmp_path / "ref", "memory://sidecache-test/store")  # type: ignore[arg-type]
    assert_same_store(tmp_path / "ref", tmp_path / "viafile")
    reader = open_store("memory://sidecache-test/store")
    assert np.array_equal(
        reader.raw_rows(0, 0, 10), open_store(tmp_path / "ref").raw_rows(0, 0, 10)
    )


def test_credentials_in_a_url_are_refused_and_not_echoed():
    with pytest.raises(ConfigError, match="environment") as err:
        locate("s3://AKIAXXXX:hunter2@bucket/store")
    assert "hunter2" not in str(err.value) and "AKIAXXXX" not in str(err.value)
