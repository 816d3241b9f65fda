"""Shard I/O micro-benchmark: zarr's own path vs ``storage.shardfile`` for one shard of every layer
of a store, and the codecs' compression / decompression speed on those rows (CPU-seconds of this
process; run it on an otherwise idle machine).

    .venv/bin/python -m benchmarks.shard_io STORE [--repeats 3]

Writes go to a temporary folder: for each codec, one sharded array per stored layer, the store's
first shard written once through ``array[a:b] = rows`` and once through ``ShardFile.write``
(medians of ``--repeats``); reads take the same shard back whole. Also reported: the cost of the
first touch of freshly allocated memory (the writer reuses its shard buffers because of it), and
the speed of the two crc32c implementations on one layer's shard.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import crc32c
import google_crc32c  # zarr's own choice, for comparison
import numcodecs
import numpy as np
import zarr

from storage import open_store
from storage.codecs import compressors_for, parse_codec
from storage.shardfile import ShardFile, _compressor


def cpu(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return statistics.median(times)


def measure(name: str, data: list[np.ndarray], chunk: int, shard: int, repeats: int) -> str:
    """One table row: codec speed on the shard's chunks, then zarr vs shardfile write and read."""
    rows, width = data[0].shape
    raw_mb = sum(x.nbytes for x in data) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        arrays = [
            group.create_array(
                f"h{j}",
                shape=(rows, width),
                dtype=data[0].dtype,
                chunks=(chunk, width),
                shards=(shard, width),
                fill_value=0,
                config={"write_empty_chunks": True},
                compressors=compressors_for(parse_codec(name), str(data[0].dtype)),
            )
            for j in range(len(data))
        ]
        files = [ShardFile.of(a, Path(tmp) / a.path) for a in arrays]
        codec = _compressor(arrays[0].metadata.codecs[0].codecs[1])
        pieces = [
            np.ascontiguousarray(x[k : k + chunk]) for x in data for k in range(0, rows, chunk)
        ]
        encoded = [codec.encode(c) for c in pieces]
        ratio = raw_mb * 1e6 / sum(len(e) for e in encoded)
        enc = cpu(lambda: [codec.encode(c) for c in pieces], repeats)
        dec = cpu(lambda: [codec.decode(e) for e in encoded], repeats)

        def zarr_write() -> None:
            for a, x in zip(arrays, data, strict=True):
                a[0:rows] = x

        def file_write() -> None:
            for f, x in zip(files, data, strict=True):
                assert f is not None
                f.write(0, x)

        def file_read() -> None:
            out = np.empty_like(data[0])
            for f in files:
                assert f is not None
                f.read(0, rows, out)

        z_w, f_w = cpu(zarr_write, repeats), cpu(file_write, repeats)
        z_r = cpu(lambda: [np.asarray(a[0:rows]) for a in arrays], repeats)
        f_r = cpu(file_read, repeats)
    return (f"| {name} | {ratio:.3f}× | {raw_mb / enc:,.0f} | {raw_mb / dec:,.0f} | "
            f"{z_w:.2f} | {f_w:.2f} | {z_r:.2f} | {f_r:.2f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store")
    p.add_argument("--codecs", default="blosc-lz4:5,blosc-zstd:3,blosc-zstd:1")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    numcodecs.blosc.use_threads = False  # as in stage one's writer and the loader's threads
    reader = open_store(args.store)
    lay = reader.layout
    rows = min(lay.shard_rows, lay.n_rows)
    data = [reader.raw_rows(layer, 0, rows) for layer in lay.layers]
    raw_mb = sum(x.nbytes for x in data) / 1e6
    print(f"store {args.store}: one shard = {rows} rows x {len(data)} layers = {raw_mb:.0f} MB raw")
    print("| codec | ratio | compress MB/CPU-s | decompress MB/CPU-s | zarr write CPU-s "
          "| shardfile write CPU-s | zarr read CPU-s | shardfile read CPU-s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.codecs.split(","):
        print(measure(name, data, lay.chunk_rows, lay.shard_rows, args.repeats))
    blob = np.ascontiguousarray(data[0]).tobytes()
    for name, crc in (("crc32c", crc32c.crc32c), ("google_crc32c", google_crc32c.value)):
        seconds = cpu(lambda crc=crc: crc(blob), args.repeats)
        print(f"\n{name} over one layer's shard ({len(blob) / 1e6:.0f} MB): "
              f"{len(blob) / seconds / 1e9:.1f} GB/CPU-s", end="")  # fmt: skip
    print(" (shardfile uses crc32c; zarr google_crc32c)")
    size = 256 << 20
    touch = []
    for _ in range(3):
        started = time.process_time()
        block = np.empty(size, np.uint8)
        block[::4096] = 1
        touch.append(time.process_time() - started)
        del block
    print(f"\nfirst touch of 256 MB fresh memory, CPU-s per pass (first, later): "
          f"{touch[0]:.3f}, {touch[1]:.3f}, {touch[2]:.3f} "
          f"({1e3 * touch[0] / 256:.2f} / {1e3 * touch[2] / 256:.2f} ms per MB)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
