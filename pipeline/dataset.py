"""A store as a PyTorch dataset: the batches ``sidecache train`` trains on, for a loop of your own.

:class:`StoreDataset` is a :class:`torch.utils.data.IterableDataset` of
:class:`~pipeline.sidenets.SideBatch` es, one epoch per iteration::

    ds = StoreDataset("stores/sst2-train", batch_size=32, seed=0)
    loader = DataLoader(ds, batch_size=None)  # the dataset batches; DataLoader adds nothing
    for epoch in range(3):
        ds.set_epoch(epoch)
        for batch in loader:
            loss = loss_fn(ds.info, model(batch), batch.labels)

For the same store, batch size, seed, epoch and memory settings it yields exactly the batches
``sidecache train`` trains on, in the same order: it builds its loader with the function
``sidecache train`` builds its own with (:func:`pipeline.train.store_loaders`), from a
:class:`~pipeline.settings.TrainConfig` whose unset fields keep their defaults. Batches are
shuffled by blocks of consecutive samples (:mod:`pipeline.loader`); which batches an epoch has
depends on ``(seed, epoch)`` and on ``pool_mb`` (the shuffle window), not on whether the store
is held in RAM, streamed, or (``device="cuda"``) resident on the GPU.

The loader reads and decodes in two background threads of its own, so ``num_workers=0`` is the
setting to use. ``num_workers=N`` works but gains nothing: each worker process builds a loader of
its own (pass the store by path), reads the whole epoch and yields every N-th batch, so the
DataLoader still delivers every batch once, in order.

Random numbers: the dataset draws none from torch; a ``DataLoader`` draws one number from torch's
global generator each time it is iterated unless it is given a ``generator`` of its own, which
shifts any dropout masks drawn afterwards (``examples/own_loop.py`` passes one, so its dropout
matches ``sidecache train``'s).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.errors import ConfigError
from pipeline.settings import TrainConfig
from pipeline.sidenets import SideBatch, StoreInfo
from pipeline.train import LoaderUse, store_loaders
from storage import StoreReader, open_store


class StoreDataset(IterableDataset[SideBatch]):
    """The training batches of ``store`` for one epoch (:meth:`set_epoch`), as
    ``sidecache train --batch-size batch_size --seed seed`` reads them.

    ``store``: a store's path or URL, or an open :class:`storage.StoreReader`. ``batch_size``,
    ``seed``, ``ram_budget_mb``, ``pool_mb``, ``low_memory`` and ``device_budget_mb`` mean what
    the ``sidecache train`` flags of the same names mean, with the same defaults when left None
    (:class:`~pipeline.settings.TrainConfig`). ``shuffle=False``: every sample in store order (as
    evaluation reads a store). ``device``: where the batches are; on ``cuda`` the store is held
    on the GPU when it fits ``device_budget_mb``, else read on the host into pinned memory and
    copied per batch. ``info`` describes the store (what side networks are built from);
    ``len()`` is the number of batches per epoch.
    """

    def __init__(
        self,
        store: str | Path | StoreReader,
        batch_size: int | None = None,
        *,
        seed: int | None = None,
        shuffle: bool = True,
        epoch: int = 0,
        ram_budget_mb: int | None = None,
        pool_mb: int | None = None,
        low_memory: bool | None = None,
        device: str | torch.device = "cpu",
        device_budget_mb: int | None = None,
    ):
        super().__init__()
        self.store = store if isinstance(store, StoreReader) else str(store)
        given: dict[str, Any] = {
            "batch_size": batch_size, "seed": seed, "ram_budget_mb": ram_budget_mb,
            "pool_mb": pool_mb, "low_memory": low_memory, "device_budget_mb": device_budget_mb,
        }  # fmt: skip
        self.config = TrainConfig(
            train="", eval="", specs=[], epochs=1, out="",
            **{k: v for k, v in given.items() if v is not None},
        )  # fmt: skip
        if self.config.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1; found {self.config.batch_size}")
        self.shuffle, self.epoch = shuffle, epoch
        self.device = torch.device(device)
        reader = self._reader()
        self.info = StoreInfo.from_meta(reader.meta)
        self.n_samples = int(reader.layout.n_samples)
        self._loader: Any = None

    def _reader(self) -> StoreReader:
        return self.store if isinstance(self.store, StoreReader) else open_store(self.store)

    @property
    def loader(self) -> Any:
        """The :class:`~pipeline.loader.StoreLoader` (or, on CUDA,
        :class:`~pipeline.resident.ResidentLoader`) serving the batches: built on first use, by
        the function ``sidecache train`` builds its loaders with."""
        if self._loader is None:
            stores = [LoaderUse(self._reader(), self.config.batch_size, self.shuffle)]
            self._loader = store_loaders(self.config, stores, self.device)[0]
        return self._loader

    def set_epoch(self, epoch: int) -> None:
        """Iterate over epoch ``epoch``'s batches from now on (they differ per epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n_samples // self.config.batch_size)

    def __iter__(self) -> Iterator[SideBatch]:
        worker = get_worker_info()
        step, first = (1, 0) if worker is None else (worker.num_workers, worker.id)
        for i, batch in enumerate(self.loader.epoch(self.epoch)):
            if i % step == first:
                yield batch.to(self.device)

    def __getstate__(self) -> dict[str, Any]:
        """What a DataLoader worker process gets: no loader (threads do not cross processes);
        each worker builds its own."""
        return {**self.__dict__, "_loader": None}
