"""``--pairs separate``: the two sentences of a pair run through the backbone as sequences of
their own, as a bi-encoder (MiniLM, sentence-transformers models) is used.

With ``--pairs joint`` (the default) a pair is one sequence, ``[CLS] A [SEP] B [SEP]``, with the
backbone's segment ids. With ``separate`` the backbone sees ``[CLS] A [SEP]`` and
``[CLS] B [SEP]`` as two sequences (each truncated to the max length on its own, positions from
0, segment ids all 0 as a tokenizer gives them for a single text), and the store keeps both:
sample ``i``'s rows are sentence A's rows followed by sentence B's, and ``token_type_ids`` marks
each row's sentence (0: A, 1: B), so stage two's ``pool=pair`` finds the two sentences.

Inside stage one, ``verify`` and ``predict`` each sentence is a *piece*: piece ``2i`` is sample
``i``'s first sentence and piece ``2i + 1`` its second, consecutive in token order. The batch
plan runs over pieces, so each piece is its own sequence in a batch, and writing each piece's
rows at its token offsets gives exactly the concatenated rows of the samples.

A store records the mode as ``identity.extraction.pairs = "separate"``; stores without the key
are joint.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipeline.data import TextData
from pipeline.errors import ConfigError, DataSpecError, StoreSchemaError
from pipeline.tokens import Tokenized

log = logging.getLogger(__name__)
PAIRS = ("auto", "joint", "separate")
SEPARATE = "separate"


class PairsError(ConfigError):
    """``--pairs separate`` asked of data or settings it cannot apply to: a dataset without a
    second sentence, or a single stored position per sample."""


def check_pairs(pairs: str, positions: str) -> None:
    """Refuse an unknown ``--pairs`` mode, and ``separate`` with single-position stores."""
    if pairs not in PAIRS:
        raise PairsError(f"--pairs must be one of {', '.join(PAIRS)}; found {pairs!r}")
    if pairs == SEPARATE and positions != "all":
        raise PairsError(
            f"--pairs separate stores every token of both sentences so that stage two can pool "
            f"each one (pool=pair); --positions {positions} would keep one vector of the first "
            "sentence only. Use --positions all with --pairs separate, or --pairs joint"
        )


def resolve(pairs: str, data: TextData, pooling: str, positions: str) -> str:
    """``--pairs auto`` (the default): ``separate`` for sentence pairs read by a sentence
    encoder (a backbone whose own pooling is the mean over tokens, as sentence-transformers
    models such as MiniLM: it was trained on sentences embedded alone) with every token stored;
    ``joint`` otherwise. On MRPC with MiniLM separate encoding gave LST, READ and the linear
    probe 1.4-2.5 more dev accuracy points (BENCHMARKS.md, "Side networks against
    fine-tuning"). ``joint`` and ``separate`` are kept as given."""
    if pairs != "auto":
        return pairs
    bi_encoder = pooling == "mean" and positions == "all"
    return SEPARATE if data.pairs is not None and bi_encoder else "joint"


def check_pair_data(data: TextData) -> None:
    """Refuse ``--pairs separate`` on a dataset of single texts."""
    if data.pairs is None:
        raise PairsError(
            f"--pairs separate encodes the two sentences of each pair on their own, but "
            f"{data.spec} ({data.split}) has one text per sample; expected a sentence-pair task "
            "(MRPC, QQP, MNLI, ... or --text-pair-column). Drop --pairs separate for this data"
        )


def mode(identity: dict[str, Any]) -> str:
    """A store's (or a trained run's recorded store's) pair mode: ``joint`` or ``separate``."""
    return str(identity.get("extraction", {}).get("pairs", "joint"))


def tokenize_separate(
    tokenizer: Any, data: TextData, max_length: int, step: int = 4096
) -> Tokenized:
    """Tokenise each sentence of every pair alone, truncated to ``max_length`` on its own; sample
    ``i``'s tokens are its first sentence's then its second's, and ``type_ids`` marks them 0 and
    1 (the segments stage two pools by, not the ids the backbone is given: see :func:`pieces`)."""
    check_pair_data(data)
    assert data.pairs is not None
    first, cut_a = _alone(tokenizer, data.texts, max_length, step, data, "first")
    second, cut_b = _alone(tokenizer, data.pairs, max_length, step, data, "second")
    truncated = int((cut_a | cut_b).sum())
    if truncated:
        log.warning(
            "%d of %d pairs had a sentence longer than %d tokens, truncated on its own "
            "(flag --max-length)", truncated, len(data), max_length,
        )  # fmt: skip
    ids, types, lengths = [], [], []
    for a, b in zip(first, second, strict=True):
        ids += [a, b]
        types += [np.zeros(len(a), np.int8), np.ones(len(b), np.int8)]
        lengths.append(len(a) + len(b))
    return Tokenized(
        ids=np.concatenate(ids),
        type_ids=np.concatenate(types),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        n_truncated=truncated,
    )


def _alone(tokenizer: Any, texts: list[str], max_length: int, step: int, data: TextData,
           which: str) -> tuple[list[np.ndarray], np.ndarray]:  # fmt: skip
    """Each text tokenised as a single sequence; and which of them were truncated."""
    seqs: list[np.ndarray] = []
    cut = np.zeros(len(texts), dtype=bool)
    for start in range(0, len(texts), step):
        part = texts[start : start + step]
        enc = tokenizer(part, truncation=True, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=False)  # fmt: skip
        for j, seq in enumerate(enc["input_ids"]):
            if not seq:
                raise DataSpecError(
                    f"the {which} sentence of sample {start + j} of {data.spec} ({data.split}) "
                    "tokenizes to zero tokens; remove pairs with an empty sentence from the data"
                )
            seqs.append(np.asarray(seq, dtype=np.int32))
        at_limit = [j for j, s in enumerate(enc["input_ids"]) if len(s) >= max_length]
        if at_limit:
            full = tokenizer([part[j] for j in at_limit], truncation=False,
                             return_attention_mask=False, verbose=False)["input_ids"]  # fmt: skip
            for j, s in zip(at_limit, full, strict=True):
                cut[start + j] = len(s) > max_length
    return seqs, cut


def piece_offsets(tok: Tokenized) -> np.ndarray:
    """``(2 N + 1,)`` token offsets of the pieces of a separate-pairs :class:`Tokenized` (from
    its segment ids): piece ``2i`` is sample ``i``'s first sentence, ``2i + 1`` its second.
    Raises :class:`StoreSchemaError` unless every sample is a non-empty run of segment 0
    followed by a non-empty run of segment 1."""
    if tok.type_ids is None:
        raise StoreSchemaError(
            "a --pairs separate store must hold token_type_ids (each token's sentence); this one "
            "has none: re-create it with sidecache cache --pairs separate"
        )
    starts, lengths = tok.offsets[:-1], tok.lengths
    n_first = np.add.reduceat((tok.type_ids == 0).astype(np.int64), starts) if len(starts) else (
        np.zeros(0, np.int64))  # fmt: skip
    out = np.empty(2 * len(starts) + 1, dtype=np.int64)
    out[0::2], out[1::2] = tok.offsets, starts + n_first
    expected = np.repeat(np.tile(np.array([0, 1], np.int8), len(starts)), np.diff(out))
    if (lengths < 2).any() or (n_first < 1).any() or (n_first >= lengths).any() or (
        not np.array_equal(expected, tok.type_ids)
    ):  # fmt: skip
        raise StoreSchemaError(
            "the segment ids of a --pairs separate store must mark each sample's first sentence "
            "0 and then its second 1, both non-empty; found another pattern (damaged "
            "token_type_ids?): re-create the store"
        )
    return out


def pieces(tok: Tokenized, with_types: bool) -> Tokenized:
    """What the backbone is given for a separate-pairs :class:`Tokenized`: every sentence a
    sequence of its own (the same token ids, :func:`piece_offsets`), with segment ids all 0 where
    the backbone takes them (as its tokenizer gives them for a single text) and none where not."""
    offsets = piece_offsets(tok)
    types = np.zeros(len(tok.ids), dtype=np.int8) if with_types else None
    return Tokenized(ids=tok.ids, type_ids=types, offsets=offsets, n_truncated=tok.n_truncated)


def join_rows(rows: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Rows of consecutive pieces ``[A0, B0, A1, B1, ...]`` -> per sample, A's rows then B's, and
    the rows' segments (0 for A, 1 for B)."""
    if len(rows) % 2:
        raise ConfigError(
            f"--pairs separate gives two sequences per sample (first sentence, second sentence); "
            f"found an odd number of sequences ({len(rows)})"
        )
    joined = [np.concatenate([a, b]) for a, b in zip(rows[0::2], rows[1::2], strict=True)]
    segments = [
        np.concatenate([np.zeros(len(a), np.int8), np.ones(len(b), np.int8)])
        for a, b in zip(rows[0::2], rows[1::2], strict=True)
    ]
    return joined, segments
