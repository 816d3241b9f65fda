"""Your own training loop on a store: ``StoreDataset`` serves ``sidecache train``'s batches.

    python examples/own_loop.py STORE [--sidenet SPEC] [--batch-size 32] [--seed 0] [--epochs 1]

Trains one side network for one epoch and prints its mean training loss. On CPU, for the same
store, spec, batch size, seed and ``--epochs`` (the schedule spans every epoch), the loss equals
bit for bit the first epoch's ``train_loss`` that ``sidecache train`` records in
``OUT/<name>/history.csv`` (with as many torch threads as ``--threads``; tested), because
everything that decides it is the same:

* the batches: :class:`pipeline.dataset.StoreDataset` builds stage two's own loader;
* the initial weights: ``torch.manual_seed(seed)`` right before ``build``, as stage two does;
* the optimiser and schedule: :mod:`pipeline.optim`'s AdamW and warmup/linear decay (bit for
  bit ``torch.optim.AdamW`` and ``LambdaLR`` on CPU);
* the dropout masks: torch's generator continues from the build, as a network's own stream
  does in stage two; the DataLoader gets a generator of its own, because otherwise it draws a
  number from the global one each time it is iterated;
* the loss: each batch's mean loss weighted by its samples, summed in float64.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

from pipeline.dataset import StoreDataset
from pipeline.optim import AdamW, WarmupDecay, schedule
from pipeline.sidenets import build, loss_fn, parse_spec


def first_epoch_loss(store: str, spec: str, batch_size: int | None = None,
                     seed: int | None = None, epochs: int = 1) -> float:  # fmt: skip
    """Batch size and seed: ``sidecache train``'s defaults when None."""
    ds, side = StoreDataset(store, batch_size, seed=seed), parse_spec(spec)
    torch.manual_seed(side.train.seed or ds.config.seed)
    model = build(side, ds.info).train()
    opt = AdamW(model.parameters(), lr=side.train.lr, weight_decay=side.train.weight_decay)
    sched = WarmupDecay(opt, schedule(epochs * len(ds), side.train.warmup))
    total, count = torch.zeros((), dtype=torch.float64), 0
    for batch in DataLoader(ds, batch_size=None, generator=torch.Generator()):
        loss = loss_fn(ds.info, model(batch), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        n = len(batch.lengths)
        total, count = total + loss.detach().double() * n, count + n
    return float(total) / count


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--sidenet", default="examples.attention_pool.AttentionPool")
    p.add_argument("--batch-size", type=int, help="as for sidecache train (default 32)")
    p.add_argument("--seed", type=int, help="as for sidecache train (default 0)")
    p.add_argument("--epochs", type=int, default=1, help="epochs the schedule spans")
    a = p.parse_args(argv)
    print(first_epoch_loss(a.store, a.sidenet, a.batch_size, a.seed, a.epochs))


if __name__ == "__main__":
    main()
