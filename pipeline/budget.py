"""A byte budget shared by threads: a counting semaphore over bytes with a high-water mark.

:class:`pipeline.loader.StoreLoader` counts every stored row it keeps while streaming against one
:class:`ByteBudget`; ``tests/pipeline/test_loader_memory.py`` checks its bound on real stores.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

Rows = tuple[np.ndarray, np.ndarray | None]  # stored rows (n, L, D), int8 scales (n, L) or None


class Stopped(Exception):
    """The consumer went away while a worker waited for the budget (``stop`` was set)."""


class ByteBudget:
    """The stored bytes a streaming loader holds, shared by its reader and batcher threads: a
    counting semaphore over bytes that records its high-water mark (``peak``).

    Holders: *rounds* (numbered in reading order; the reader takes a run's bytes before reading
    it, the batcher gives the round back once its batches are out), the *edge cache* (optional
    rows: kept only when they fit, evicted first when a round needs room) and the batcher's
    *leftovers*, for which rounds and cache leave ``reserve`` bytes free. A round that does not
    fit waits for the earlier rounds to be given back; once nothing else is held it is admitted
    whatever its size, so one block bigger than the budget cannot deadlock. Hence at most
    ``limit`` bytes are held, or one round plus the leftovers when that alone is more."""

    def __init__(self, limit: int, reserve: int = 0):
        self.limit, self.reserve = limit, reserve
        self.rounds: dict[int, int] = {}
        self.cache = self.leftovers = self.peak = 0
        self._cond = threading.Condition()  # re-entrant: ``evict`` gives cache bytes back

    @property
    def held(self) -> int:
        return sum(self.rounds.values()) + self.cache + self.leftovers

    def _fits(self, n: int) -> bool:
        return sum(self.rounds.values()) + self.cache + self.reserve + n <= self.limit

    def _note(self) -> None:
        self.peak = max(self.peak, self.held)

    def take(self, rnd: int, n: int, stop: threading.Event, evict: Callable[[], bool],
             over: bool = True) -> bool:  # fmt: skip
        """Add ``n`` bytes to round ``rnd``: at once if they fit, else after evicting cache rows
        (``evict`` drops the oldest, False when none is left) and waiting for earlier rounds to
        be given back; then, if they still do not fit, anyway when ``over`` (False without
        taking anything otherwise). Raises :class:`Stopped` when ``stop`` is set meanwhile."""
        with self._cond:
            while not self._fits(n):
                if self.cache and evict():
                    continue
                if not any(r < rnd for r in self.rounds):
                    if not over:
                        return False
                    break
                if stop.is_set():
                    raise Stopped
                self._cond.wait(0.05)
            self.rounds[rnd] = self.rounds.get(rnd, 0) + n
            self._note()
            return True

    def give(self, rnd: int) -> None:
        """Round ``rnd`` is done: all its bytes are free."""
        with self._cond:
            self.rounds.pop(rnd, None)
            self._cond.notify_all()

    def keep(self, n: int) -> bool:
        """Hold ``n`` bytes of optional cache rows if they fit."""
        with self._cond:
            if not self._fits(n):
                return False
            self.cache += n
            self._note()
            return True

    def drop(self, n: int) -> None:
        with self._cond:
            self.cache -= n
            self._cond.notify_all()

    def pin(self, rnd: int, n: int) -> None:
        """Cache rows about to be used by round ``rnd`` count for it (no longer evictable)."""
        with self._cond:
            self.cache -= n
            self.rounds[rnd] = self.rounds.get(rnd, 0) + n

    def unpin(self, rnd: int, n: int) -> None:
        with self._cond:
            self.rounds[rnd] -= n
            self._cond.notify_all()

    def set_leftovers(self, n: int) -> None:
        with self._cond:
            self.leftovers = n
            self._note()
            self._cond.notify_all()


class ReadAccount:
    """The reader's side of a :class:`ByteBudget` through one epoch: the round it is reading, the
    blocks read so far and the *edge cache* (rows of blocks not read yet that were decoded with a
    neighbour, keyed ``("head" | "tail", block)``, oldest first) with its bytes in the budget."""

    def __init__(self, budget: ByteBudget | None, stop: threading.Event):
        self.budget, self.stop, self.round = budget, stop, 0
        self.done: set[int] = set()
        self.edges: dict[tuple[str, int], Rows] = {}  # ("head" | "tail", block) -> rows

    @property
    def _budget(self) -> ByteBudget:
        assert self.budget is not None, "only a streaming loader reads through the budget"
        return self.budget

    def take(self, n: int, over: bool = True) -> bool:
        return self._budget.take(self.round, n, self.stop, self.evict, over)

    def evict(self) -> bool:
        if not self.edges:
            return False
        self._budget.drop(nbytes(self.edges.pop(next(iter(self.edges)))))
        return True

    def keep_edge(self, n: int) -> bool:
        return self._budget.keep(n)

    def put_edge(self, key: tuple[str, int], rows: Rows) -> None:
        self.edges[key] = rows

    def pop_edge(self, key: tuple[str, int]) -> Rows | None:
        rows = self.edges.pop(key, None)
        if rows is not None:
            self._budget.pin(self.round, nbytes(rows))
        return rows

    def unpin(self, n: int) -> None:
        if n:
            self._budget.unpin(self.round, n)


def nbytes(rows: Rows | None) -> int:
    if rows is None:
        return 0
    return rows[0].nbytes + (0 if rows[1] is None else rows[1].nbytes)
