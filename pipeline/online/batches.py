"""Token batches for online training: the batch a method sees, the training order, the eval plan.

Training order: each epoch a permutation seeded by ``(seed, epoch)``, cut into "mega-batches"
of ``group`` batches that are each sorted by length before being cut into batches, whose order
is shuffled again. This is the usual length grouping of online fine-tuning: batches stay random
but pad little, so the online baselines do not pay for padding the cache does not store. With
``group=1`` it is a plain random order. Every epoch has ``ceil(N / batch_size)`` batches, like
stage two's loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.extract import DeviceBatch, make_batch
from pipeline.tokens import BATCH_COST, PlanSettings, Tokenized, plan_batches


@dataclass
class TokenBatch:
    """A padded batch of token ids and its labels; what ``full``/``lora``/``meft`` consume."""

    ids: DeviceBatch
    labels: torch.Tensor  # (B,) int64 class ids or float32 targets

    @property
    def lengths(self) -> torch.Tensor:  # (B,)
        return self.ids.lengths


def token_batch(
    tok: Tokenized, labels: np.ndarray, samples: np.ndarray, device: torch.device
) -> TokenBatch:
    return TokenBatch(
        make_batch(tok, samples, device), torch.from_numpy(labels[samples]).to(device)
    )


def grouped_order(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group: int = 50
) -> Iterator[np.ndarray]:
    """Sample indices of every training batch of one epoch (see the module docstring)."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    batches: list[np.ndarray] = []
    mega = batch_size * max(1, group)
    for start in range(0, len(perm), mega):
        part = perm[start : start + mega]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    for k in rng.permutation(len(batches)):
        yield batches[k]


def eval_plan(lengths: np.ndarray, token_budget: int = 4096) -> list[np.ndarray]:
    """Evaluation batches: length-sorted under a padded-token budget, cut as in stage one."""
    settings = PlanSettings(token_budget, 256, int(lengths.sum()) + 1, batch_cost=BATCH_COST)
    return plan_batches(lengths, lengths, settings)
