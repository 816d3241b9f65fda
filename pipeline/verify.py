"""``sidecache verify``: check the arrays' metadata and every chunk's crc32c, then re-run the
recorded backbone on random samples and compare with the store.

The metadata pass compares each array's ``zarr.json`` with the sha256 recorded when the store
was finalised, so a changed shape, data type, fill value or codec (which the chunks' checksums
cannot see) is reported, naming the array; a store written before the hashes existed is reported
as "not recorded" and still checked chunk by chunk.

The checksum pass reads every chunk of every array (whole shard files at a time; a file that
fails is re-read chunk by chunk to name the damaged chunks) and checks that every chunk file is
on disk and non-empty (zarr would serve zeros for a missing one): of every array in a store whose
every chunk was written (``integrity.all_chunks_written``), else of the arrays that never hold an
all-zero chunk (hidden states, scales, progress, offsets, token ids). Shard files hold their
chunks back to back followed by an index that carries its own crc32c, with no padding, so every
byte of a store's chunk files is covered by a checksum.

The batches are re-planned from the stored token lengths and the recorded plan settings, so each
checked sample is recomputed inside exactly the batch it was stored from; in a ``--pairs
separate`` store each sentence of a pair is its own sequence (:mod:`pipeline.pairs`), found from
the stored segment ids, and is recomputed alone, as stage one ran it. On the device type the
store was written on, with the same CPU numerics (vector instructions, MKL mode) and MKL strict,
float32, float16 and bfloat16 (and int8) rows must match bit for bit; elsewhere they are
compared with a tolerance and the report says why.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from pipeline.backbone import cpu_numerics, gpu_numerics, load_backbone, thread_invariant
from pipeline.errors import StoreCorruptError, StoreMismatchError, VerifyError
from pipeline.extract import encode, forward_rows, make_batch
from pipeline.pairs import SEPARATE, mode, piece_offsets, pieces
from pipeline.tokens import PlanSettings, Tokenized, plan_batches
from storage import StoreReader, decode_rows, open_store

log = logging.getLogger(__name__)


def stored_tokens(reader: StoreReader) -> Tokenized:
    ids, types = reader.all_tokens()
    return Tokenized(ids=ids, type_ids=types, offsets=reader.token_offsets)


def stored_plan(reader: StoreReader, tok: Tokenized) -> list[np.ndarray]:
    ex = reader.identity["extraction"]
    settings = PlanSettings.from_extraction(ex)
    return plan_batches(tok.lengths, np.diff(reader.offsets), settings)


def stored_sequences(
    reader: StoreReader, tok: Tokenized, takes_token_type_ids: bool
) -> tuple[Tokenized, np.ndarray, list[np.ndarray]]:
    """What stage one ran through the backbone, from the stored tokens: the sequences, the
    sample each belongs to, and the batches (of sequences). Sequences are the samples, or in a
    ``--pairs separate`` store each sentence of a pair (:mod:`pipeline.pairs`)."""
    if mode(reader.identity) != SEPARATE:
        return tok, np.arange(reader.layout.n_samples), stored_plan(reader, tok)
    seqs = pieces(tok, takes_token_type_ids)
    if not np.array_equal(reader.offsets, tok.offsets):
        raise StoreCorruptError(f"{reader.path}: a --pairs separate store's rows must be its "
                                "tokens (offsets == token_offsets); they differ")  # fmt: skip
    settings = PlanSettings.from_extraction(reader.identity["extraction"])
    owner = np.repeat(np.arange(reader.layout.n_samples), 2)
    return seqs, owner, plan_batches(seqs.lengths, np.diff(piece_offsets(tok)), settings)


def check_backbone_identity(
    reader: StoreReader, found: dict[str, Any], tokenizer: dict[str, Any]
) -> None:
    want = reader.identity["backbone"]
    for key in ("config_hash", "weights_hash"):
        if want[key] != found[key]:
            raise StoreMismatchError(
                f"{reader.path} was written by backbone {want['name']!r} with {key} "
                f"{want[key][:12]}..., but the loaded backbone has {found[key][:12]}...; pass the "
                "same --backbone (and --revision) that wrote the store"
            )
    if reader.identity["tokenizer"]["hash"] != tokenizer["hash"]:
        raise StoreMismatchError(f"{reader.path}: the tokenizer differs from the one that wrote it")


# Where a recomputation cannot match bit for bit (another device type, other numerics), a
# sample's layer passes when its largest difference from the stored vectors is at most this
# share of the stored vectors' RMS. Stage one on CUDA runs under bfloat16 autocast: against a
# float32 CPU recomputation, the differences are those of bfloat16 arithmetic through the
# layers (gpu_check's `verify` phase measures them: `max_error_in_rms` per layer).
TOLERANCE = 0.1


def off_by(stored: np.ndarray, fresh: np.ndarray) -> float:
    """The largest absolute difference of ``fresh`` from ``stored``, in units of the RMS of
    ``stored``."""
    rms = float(np.sqrt(np.mean(np.square(stored, dtype=np.float64))))
    return float(np.abs(stored - fresh).max()) / max(rms, 1e-12)


def inexact_reason(extraction: dict[str, Any], device: torch.device) -> str | None:
    """Why a recomputation on ``device`` here cannot be expected to match the store bit for bit
    (``extraction`` is the store's recorded identity), or ``None`` when it must: the same device
    type, and the same recorded numerics (CPU: vector instructions and a strict MKL mode; GPU:
    model, CUDA, cuDNN, torch, TF32)."""
    device_type = device.type
    if extraction["device"] != device_type:
        return f"store written on {extraction['device']}, verifying on {device_type}"
    if device_type != "cpu":
        now = gpu_numerics(device)
        if extraction.get("numerics") != now:
            recorded = extraction.get("numerics")
            return f"store written with GPU numerics {recorded}, verifying with {now}"
        return None
    now = cpu_numerics()
    if extraction.get("numerics") != now:
        return f"store written with CPU numerics {extraction.get('numerics')}, verifying with {now}"
    if not thread_invariant(now):
        return f"MKL computes in mode {now['mkl']}, not strict, so results depend on thread count"
    return None


def check_array_metadata(reader: StoreReader) -> dict[str, Any]:
    """Compare every array's ``zarr.json`` with the sha256 recorded at finalisation; raise
    :class:`StoreCorruptError` naming every array whose metadata changed, went missing or was
    added since. A store without recorded hashes passes with ``recorded: false`` (and a
    warning)."""
    problems = reader.metadata_problems()
    if problems is None:
        log.warning("%s: no metadata hashes recorded (written by an older sidecache): the "
                    "arrays' zarr.json files cannot be checked; re-create the store with "
                    "--overwrite to record them", reader.path)  # fmt: skip
        return {"recorded": False, "arrays": None, "changed": []}
    report = {"recorded": True, "arrays": len(reader.meta["integrity"]["metadata_sha256"]),
              "changed": problems}  # fmt: skip
    if problems:
        raise StoreCorruptError(
            f"{reader.path}: the metadata of {len(problems)} array(s) differs from what was "
            f"recorded at finalisation: {'; '.join(problems[:10])}; the chunks were not checked "
            "(they may no longer mean what zarr.json says): restore the zarr.json files from a "
            "copy, or re-create the store with 'sidecache cache ... --overwrite'"
        )
    log.info("metadata: the zarr.json of all %d arrays matches its recorded sha256",
             report["arrays"])  # fmt: skip
    return report


def check_chunks(reader: StoreReader) -> dict[str, Any]:
    """Read every chunk of every array; raise :class:`StoreCorruptError` listing every damaged
    or missing chunk (array, chunk, file)."""
    damaged: list[str] = []
    chunks = files = 0
    for name, (length, per_chunk, per_file) in reader.arrays().items():
        chunks += -(-length // per_chunk)
        for start in range(0, length, per_file):
            files += 1
            try:
                reader.read(name, slice(start, min(start + per_file, length)))
            except StoreCorruptError as exc:
                damaged.append(str(exc).removeprefix(f"{reader.path}: "))
    report = {"arrays": len(reader.arrays()), "files": files, "chunks": chunks, "damaged": damaged}
    if damaged:
        raise StoreCorruptError(
            f"{reader.path}: {len(damaged)} of {files} chunk files failed their checks: "
            + " | ".join(damaged[:10])
        )
    log.info("checksums: %d chunks in %d files of %d arrays are intact", chunks, files,
             report["arrays"])  # fmt: skip
    return report


def run_verify(
    path: str,
    samples: int = 8,
    device: str = "auto",
    seed: int = 0,
    backbone: str | None = None,
    *,
    checksums: bool = True,
) -> dict[str, Any]:
    """Check the arrays' metadata, every chunk (unless ``checksums`` is false), then recompute
    ``samples`` random samples (none when ``samples`` is 0); raise :class:`StoreCorruptError`
    on changed metadata or a damaged chunk and :class:`VerifyError` on any difference."""
    reader = open_store(path, check_files=False)  # the checks below list every problem
    meta_report = check_array_metadata(reader)
    chunk_report = check_chunks(reader) if checksums else None
    if samples <= 0:
        return {"store": path, "metadata": meta_report, "checksums": chunk_report,
                "samples_checked": 0}  # fmt: skip
    ident = reader.identity
    bb = load_backbone(backbone or ident["backbone"]["name"], device, ident["backbone"]["revision"])
    check_backbone_identity(reader, bb.identity, bb.tokenizer_identity)
    lay = reader.layout
    why_inexact = inexact_reason(ident["extraction"], bb.device)
    exact = why_inexact is None
    if not exact:
        log.warning("%s: comparing with a tolerance", why_inexact)
    tok = stored_tokens(reader)
    # sequences the backbone ran: the samples, or the sentences of --pairs separate
    seqs, sample_of, batches = stored_sequences(reader, tok, bb.takes_token_type_ids)
    row_offsets = reader.offsets if seqs is tok else seqs.offsets  # rows = tokens when separate
    batch_of = np.empty(len(sample_of), dtype=np.int64)
    for i, b in enumerate(batches):
        batch_of[b] = i
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(lay.n_samples, size=min(samples, lay.n_samples), replace=False))
    picked = np.isin(sample_of, chosen)  # the sequences of the chosen samples
    problems: list[str] = []
    max_err = {layer: 0.0 for layer in lay.layers}
    max_rel = {layer: 0.0 for layer in lay.layers}
    for bi in sorted(set(batch_of[picked].tolist())):
        batch = make_batch(seqs, batches[bi], bb.device)
        rows = forward_rows(bb, batch, lay.layers, lay.positions)
        per = np.diff(row_offsets)[batches[bi]]
        bounds = np.concatenate([[0], np.cumsum(per)])
        for pos, seq in enumerate(batches[bi].tolist()):
            if not picked[seq]:
                continue
            sample = int(sample_of[seq])
            what = f"sample {sample}" if seqs is tok else (
                f"sample {sample} ({('first', 'second')[seq % 2]} sentence)")  # fmt: skip
            start, stop = int(row_offsets[seq]), int(row_offsets[seq + 1])
            for j, layer in enumerate(lay.layers):
                fresh = rows[j][bounds[pos] : bounds[pos + 1]]
                data, scale = encode(fresh, lay.dtype)
                stored = reader.raw_rows(layer, start, stop)
                decoded = reader.rows(layer, start, stop)
                err = float(np.abs(decoded - fresh.cpu().numpy()).max())
                max_err[layer] = max(max_err[layer], err)
                same = np.array_equal(stored, data)
                if scale is not None:
                    same = same and np.array_equal(reader.raw_scales(layer, start, stop), scale)
                if exact and not same:
                    problems.append(f"{what} layer {layer}")
                elif not exact:
                    off = off_by(decoded, decode_rows(data, lay.dtype, scale))
                    max_rel[layer] = max(max_rel[layer], off)
                    if off > TOLERANCE:
                        problems.append(f"{what} layer {layer} (off by {off:.3g} RMS)")
    report = {
        "store": path,
        "metadata": meta_report,
        "checksums": chunk_report,
        "samples_checked": len(chosen),
        "exact": exact,
        "inexact_reason": why_inexact,
        "mismatches": problems,
        "max_abs_error_vs_float32": {str(k): v for k, v in max_err.items()},
        "max_error_in_rms": None if exact else {str(k): v for k, v in max_rel.items()},
        "tolerance_in_rms": None if exact else TOLERANCE,
    }
    if problems:
        raise VerifyError(
            f"{path}: {len(problems)} stored vectors differ from a fresh forward pass: "
            + ", ".join(problems[:10])
        )
    return report
