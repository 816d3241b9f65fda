"""Stage two's data loader: whole chunks off the store, shuffled by blocks, prefetched.

Samples are grouped into *blocks* of consecutive samples covering about one stored chunk of rows.
Each epoch visits the blocks in a permutation seeded by ``(seed, epoch)``, a *round* of
``shuffle_blocks`` blocks at a time: the samples of a round (plus the few left over from the
previous round) are shuffled and cut into batches; a sample's rows always stay together.

Rows stay in the stored dtype (bfloat16 bits as uint16, int8 with its scales ...) until a batch is
collated; only the batch is decoded to float32, so memory follows the stored bytes. Two background
threads do the work: a *reader* fetches the next round while the current one is consumed (the
blocks of a round are read in store order, consecutive blocks as one range, so a chunk shared by
two neighbouring blocks is decompressed once), and a *batcher* shuffles, gathers and decodes
batches. When the stored rows fit ``ram_budget`` bytes they are read once and kept in memory and
the same rounds are served from RAM, so both modes give the same batches in the same order.

Memory when streaming: every stored row the loader keeps counts against one :class:`ByteBudget`
of ``pool_bytes``: the round being batched, the rounds read ahead, rows of not-yet-read blocks
kept from a shared chunk (the *edge cache*, which only uses room nobody else needs) and the
leftover samples carried into the next round (a reserve of the ``batch_size - 1`` longest
samples). A round holds at most half of ``pool_bytes`` (so one round fits beside the next), which
is all that decides the shuffle. The held bytes never exceed ``held_bound`` = ``pool_bytes``,
unless a single round plus the reserve is bigger (a budget smaller than two blocks): then that
round is read alone. Not counted: one chunk of one layer being decoded, and batch-sized buffers
(the stored rows of the batch being collated and the decoded batches in the prefetch queue).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from pipeline.budget import ByteBudget, ReadAccount, Rows, Stopped, nbytes
from pipeline.sidenets.base import SideBatch
from storage import STORED_DTYPES, StoreReader, decode_rows, itemsize

log = logging.getLogger(__name__)
_END = object()  # end of the stream in a queue


class _Sample(NamedTuple):
    sample: int
    rows: np.ndarray  # (n, L, D) stored dtype
    scales: np.ndarray | None  # (n, L) for int8
    own: bool  # a copy of its own, not a view into a round's buffer


class StoreLoader:
    def __init__(
        self,
        reader: StoreReader,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        ram_budget: int = 4 << 30,
        shuffle_blocks: int = 16,
        pool_bytes: int = 512 << 20,
        prefetch: int = 4,  # batches collated ahead of the one in use
        pin_memory: bool = False,  # collate into page-locked memory (for async copies to a GPU)
        samples: np.ndarray | None = None,  # serve only these sample ids (None: all)
    ):
        self.reader, self.batch_size, self.shuffle, self.seed = reader, batch_size, shuffle, seed
        lay = reader.layout
        self.layers = list(reader.layout.layers)
        self.offsets = reader.offsets
        self.labels = reader.labels
        self.segments = row_segments(reader)  # (n_rows,) int8 of a sentence-pair store, or None
        self.prefetch, self.pin_memory = prefetch, pin_memory
        # blocks follow the token axis (= the row axis of an ``all`` store), so a single-position
        # store of the same data gets the same blocks and hence the same batches
        starts = reader.token_offsets[:-1] // lay.chunk_rows
        cuts = np.flatnonzero(np.diff(starts)) + 1
        self.blocks = np.split(np.arange(lay.n_samples), cuts)  # consecutive samples
        # a subset (a held-out split of the store): blocks are still read whole, and only the
        # kept samples join the pool
        self.keep: np.ndarray | None = None
        self.n_samples = int(lay.n_samples)
        if samples is not None:
            self.keep = np.zeros(lay.n_samples, dtype=bool)
            self.keep[np.asarray(samples, dtype=np.int64)] = True
            self.n_samples = int(self.keep.sum())
        firsts = np.array([int(b[0]) for b in self.blocks], dtype=np.int64)
        lasts = np.array([int(b[-1]) for b in self.blocks], dtype=np.int64)
        self._bounds = np.stack([self.offsets[firsts], self.offsets[lasts + 1]], 1)  # rows [a, b)
        self.row_bytes = len(self.layers) * (lay.hidden_size * itemsize(lay.dtype) + 4 * self._int8)
        # a round: at most ``shuffle_blocks`` blocks and half the budget of stored rows (a
        # token-axis block of a wider or deeper backbone counts for more)
        block_bytes = lay.chunk_rows * self.row_bytes
        self.shuffle_blocks = max(1, min(shuffle_blocks, pool_bytes // 2 // max(1, block_bytes)))
        self.pool_bytes, self._n_rows = pool_bytes, lay.n_rows
        longest = np.sort(np.diff(self.offsets))[::-1]
        self.reserve = self.row_bytes * int(longest[: batch_size - 1].sum())  # leftovers
        biggest = np.sort(self._bounds[:, 1] - self._bounds[:, 0])[::-1]
        round_max = self.row_bytes * int(biggest[: self.shuffle_blocks].sum())
        self.held_bound = max(pool_bytes, self.reserve + round_max)
        self.held_peak = 0  # most stored bytes held at once while streaming, over all epochs
        stored = lay.n_rows * self.row_bytes
        self.in_ram = stored <= ram_budget
        self._ram: Rows | None = None
        if self.in_ram:
            self._ram = self._read_span(0, lay.n_rows)
        log.info(
            "loader: %d samples in %d blocks, %d blocks per shuffle round, %s (%.1f MB stored)",
            self.n_samples, len(self.blocks), self.shuffle_blocks,
            "in RAM" if self.in_ram else f"streaming within {self.held_bound / 1e6:.0f} MB",
            stored / 1e6,
        )  # fmt: skip

    def __len__(self) -> int:
        return -(-self.n_samples // self.batch_size)

    def _kept(self, block: np.ndarray) -> np.ndarray:
        return block if self.keep is None else block[self.keep[block]]

    @property
    def _int8(self) -> bool:
        return self.reader.layout.dtype == "int8"

    # -- reading ---------------------------------------------------------------------------------
    def _empty(self, n: int) -> Rows:
        lay = self.reader.layout
        rows = np.empty((n, len(self.layers), lay.hidden_size), STORED_DTYPES[lay.dtype])
        return rows, np.empty((n, len(self.layers)), np.float32) if self._int8 else None

    def _read_span(self, a: int, b: int) -> Rows:
        """Stored rows ``[a, b)`` of every layer: ``(b - a, L, D)`` in the stored dtype."""
        if self._ram is not None:
            rows, scales = self._ram
            return rows[a:b], None if scales is None else scales[a:b]
        rows, scales = self._empty(b - a)
        for j, layer in enumerate(self.layers):
            self.reader.raw_rows(layer, a, b, out=rows[:, j])
            if scales is not None:
                self.reader.raw_scales(layer, a, b, out=scales[:, j])
        return rows, scales

    def _read_round(self, ids: list[int], st: ReadAccount) -> Iterator[tuple[int, Rows]]:
        """The blocks of one round, each as ``(block id, its stored rows)``; blocks with
        consecutive ids are read as one range (a *run*)."""
        ids = sorted(ids)
        cut = [0, *(k for k in range(1, len(ids)) if ids[k] != ids[k - 1] + 1), len(ids)]
        for lo, hi in itertools.pairwise(cut):
            run = ids[lo:hi]
            base, stop = int(self._bounds[run[0], 0]), int(self._bounds[run[-1], 1])
            rows, scales = self._read_run(base, stop, run[0], run[-1], st)
            for i in run:
                a, b = (int(x) - base for x in self._bounds[i])
                yield i, (rows[a:b], None if scales is None else scales[a:b])

    def _read_run(self, a: int, b: int, first: int, last: int, st: ReadAccount) -> Rows:
        """Stored rows ``[a, b)`` of blocks ``first..last``: what the edge cache holds of them,
        the rest off the store. The run's bytes are taken from the budget first; the cached
        edges count for the run meanwhile (so they cannot be evicted) and are not used when the
        run would have to exceed the budget to copy them."""
        st.done.update(range(first, last + 1))
        if self._ram is not None:
            return self._read_span(a, b)
        head, tail = st.pop_edge(("head", first)), st.pop_edge(("tail", last))
        pinned = nbytes(head) + nbytes(tail)
        need = (b - a) * self.row_bytes
        if not st.take(need, over=pinned == 0):
            st.unpin(pinned)  # too big for the budget beside its edges: decode those again
            head = tail = None
            pinned = 0
            st.take(need)
        rows, scales = self._empty(b - a)
        start, stop = a, b
        if head is not None:
            start = a + _copy_into((rows, scales), 0, head, 0, len(head[0]))
        if tail is not None:
            stop = max(start, b - len(tail[0]))
            _copy_into((rows, scales), stop - a, tail, stop - (b - len(tail[0])), b - stop)
        del head, tail
        st.unpin(pinned)
        if start < stop:
            self._read_store((rows, scales), a, start, stop, first, last, st)
        return rows, scales

    def _read_store(self, own: Rows, a: int, start: int, stop: int, first: int, last: int,
                    st: ReadAccount) -> None:  # fmt: skip
        """Rows ``[start, stop)`` into ``own`` (whose row 0 is row ``a``), chunk by chunk. A
        chunk is decoded whole anyway: where its other rows belong to the neighbouring block and
        that block is not read yet, they go to the edge cache if the budget has room."""
        chunk = self.reader.layout.chunk_rows
        targets: list[tuple[Rows, int, int, int]] = [(own, a, start, stop)]  # rows, row 0, [lo, hi)
        edges: list[tuple[tuple[str, int], Rows]] = []
        n_blocks = len(self.blocks)
        if start == a and first > 0 and first - 1 not in st.done:  # the end of the previous block
            lo = max(start // chunk * chunk, int(self._bounds[first - 1, 0]))
            if lo < start and st.keep_edge((start - lo) * self.row_bytes):
                edges.append((("tail", first - 1), self._empty(start - lo)))
                targets.append((edges[-1][1], lo, lo, start))
        if stop == a + len(own[0]) and last + 1 < n_blocks and last + 1 not in st.done:
            hi = min(-(-stop // chunk) * chunk, int(self._bounds[last + 1, 1]), self._n_rows)
            if hi > stop and st.keep_edge((hi - stop) * self.row_bytes):  # the next block's start
                edges.append((("head", last + 1), self._empty(hi - stop)))
                targets.append((edges[-1][1], stop, stop, hi))
        lo, hi = min(t[2] for t in targets), max(t[3] for t in targets)
        for j, layer in enumerate(self.layers):
            for c in range(lo // chunk * chunk, hi, chunk):  # one chunk of one layer at a time
                pa, pb = max(c, lo), min(c + chunk, hi)
                inside = [t for t in targets if t[2] <= pa and pb <= t[3]]
                if inside:
                    (x, _), base = inside[0][0], inside[0][1]
                    self.reader.raw_rows(layer, pa, pb, out=x[pa - base : pb - base, j])
                else:
                    _scatter(self.reader.raw_rows(layer, pa, pb), pa, targets, j, 0)
            if self._int8:
                _scatter(self.reader.raw_scales(layer, lo, hi), lo, targets, j, 1)
        for key, rows in edges:
            st.put_edge(key, rows)

    # -- one epoch -------------------------------------------------------------------------------
    def plan(self, epoch: int) -> list[tuple[list[int], list[np.ndarray]]]:
        """The batches of one epoch, deterministic in ``(seed, epoch)`` and independent of the
        stored values: per round, its blocks (in the permutation's order) and the batches (sample
        ids, in batch order) cut once its samples joined the pool. Every loader of a store (this
        one streaming or in RAM, :class:`pipeline.resident.ResidentLoader` on a GPU) serves
        exactly these batches."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.blocks)
        order = rng.permutation(n).tolist() if self.shuffle else list(range(n))
        rounds = [order[k : k + self.shuffle_blocks] for k in range(0, n, self.shuffle_blocks)]
        pool = np.empty(0, dtype=np.int64)
        out = []
        for r, ids in enumerate(rounds):
            pool = np.concatenate([pool, *(self._kept(self.blocks[i]) for i in ids)])
            if self.shuffle:
                pool = pool[rng.permutation(len(pool))]
            last, cuts = r == len(rounds) - 1, []
            while len(pool) >= self.batch_size or (last and len(pool)):
                cuts.append(pool[: self.batch_size])
                pool = pool[self.batch_size :]
            out.append((ids, cuts))
        return out

    def epoch(self, epoch: int) -> Iterator[SideBatch]:
        """Batches of one epoch (:meth:`plan`)."""
        plan = self.plan(epoch)
        rounds = [ids for ids, _ in plan]
        budget = None if self.in_ram else ByteBudget(self.pool_bytes, self.reserve)
        blocks: queue.Queue[Any] = queue.Queue(maxsize=self.shuffle_blocks)
        batches: queue.Queue[Any] = queue.Queue()
        # a batch is collated only when a slot is free, and a slot frees when a batch is taken:
        # ``prefetch`` batches ahead of the one in use, none waiting half-built for the queue
        slots = threading.Semaphore(self.prefetch)
        stop = threading.Event()
        workers = [
            threading.Thread(target=self._reader, args=(rounds, budget, blocks, stop),
                             daemon=True),
            threading.Thread(target=self._batcher,
                             args=(plan, budget, blocks, batches, slots, stop), daemon=True),
        ]  # fmt: skip
        for w in workers:
            w.start()
        try:
            while (item := batches.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                slots.release()
                yield item
        finally:
            stop.set()
            for w in workers:  # they stop within one queue timeout
                w.join()
            if budget is not None:
                self.held_peak = max(self.held_peak, budget.peak)

    def _reader(self, rounds: list[list[int]], budget: ByteBudget | None, out: queue.Queue[Any],
                stop: threading.Event) -> None:  # fmt: skip
        def work() -> None:
            st = ReadAccount(budget, stop)
            try:
                for r, ids in enumerate(rounds):
                    st.round = r
                    if not self._send_round(ids, st, out, stop):
                        return
            except Stopped:
                return
            _put(out, _END, stop)

        _guard(work, out, stop)

    def _send_round(self, ids: list[int], st: ReadAccount, out: queue.Queue[Any],
                    stop: threading.Event) -> bool:  # fmt: skip
        # a function of its own: no reference to the round's last block outlives it
        return all(_put(out, item, stop) for item in self._read_round(ids, st))

    def _batcher(self, plan: list[tuple[list[int], list[np.ndarray]]],
                 budget: ByteBudget | None, blocks: queue.Queue[Any], out: queue.Queue[Any],
                 slots: threading.Semaphore, stop: threading.Event) -> None:  # fmt: skip
        def work() -> None:
            pool: dict[int, _Sample] = {}
            for r, (ids, cuts) in enumerate(plan):
                got = _collect(len(ids), blocks, stop)
                if got is None:
                    return
                pool.update((x.sample, x) for x in self._samples(ids, got))
                for samples in cuts:
                    if not _acquire(slots, stop):
                        return
                    if not _put(out, self._collate([pool.pop(int(s)) for s in samples]), stop):
                        return
                if budget is not None:  # give the round back once nothing points into it
                    pool = {x.sample: x for x in _detach(list(pool.values()), budget)}
                    budget.give(r)
            _put(out, _END, stop)

        _guard(work, out, stop)

    def _samples(self, ids: list[int], got: dict[int, Rows]) -> list[_Sample]:
        """The samples of a round's blocks, in the permutation's order (whatever order the
        blocks were read in), as views of the blocks' rows."""
        out = []
        for i in ids:
            rows, scales = got.pop(i)
            first, last = int(self.blocks[i][0]), int(self.blocks[i][-1])
            offs = self.offsets[first : last + 2] - self.offsets[first]
            out += [
                _Sample(int(s), rows[offs[k] : offs[k + 1]],
                        None if scales is None else scales[offs[k] : offs[k + 1]], False)
                for k, s in enumerate(self.blocks[i]) if self.keep is None or self.keep[s]
            ]  # fmt: skip
        return out

    def _collate(self, items: list[_Sample]) -> SideBatch:
        samples = np.array([s.sample for s in items], dtype=np.int64)
        raw = np.concatenate([s.rows for s in items])  # (R, L, D) stored dtype
        scales = None
        if items[0].scales is not None:
            scales = np.concatenate([s.scales for s in items if s.scales is not None])  # (R, L)
        r, n_layers, d = raw.shape
        hidden = decode_rows(
            raw.reshape(r * n_layers, d),
            self.reader.layout.dtype,
            None if scales is None else scales.reshape(r * n_layers),
        ).reshape(r, n_layers, d)
        sizes = [len(s.rows) for s in items]
        segments = None
        if self.segments is not None:
            offs = self.offsets
            segments = torch.from_numpy(
                np.concatenate([self.segments[offs[s] : offs[s + 1]] for s in samples])
            )
        batch = SideBatch(
            hidden=torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32)),
            lengths=torch.tensor(sizes, dtype=torch.int64),
            labels=torch.from_numpy(self.labels[samples]),
            samples=torch.from_numpy(samples),
            longest=max(sizes),
            segments=segments,
        )
        # on the loader's thread, so the training loop's copy to the GPU does not wait for it
        return batch.pinned() if self.pin_memory else batch


def row_segments(reader: StoreReader) -> np.ndarray | None:
    """Each stored row's segment (``token_type_ids``) as int8, when the store is a sentence-pair
    task cached with ``--positions all`` by a backbone that takes segment ids (its rows are then
    its tokens, so row ``r``'s segment is token ``r``'s); None otherwise."""
    lay = reader.layout
    pairs = bool(reader.identity.get("dataset", {}).get("pairs", False))
    if lay.positions != "all" or not lay.has_token_type_ids or not pairs:
        return None
    if not np.array_equal(reader.offsets, reader.token_offsets):  # rows are not the tokens
        return None
    return np.asarray(reader.read("token_type_ids"), dtype=np.int8)


def _copy_into(dest: Rows, at: int, src: Rows, a: int, n: int) -> int:
    """``src`` rows ``[a, a + n)`` into ``dest`` from row ``at``; returns ``n``."""
    dest[0][at : at + n] = src[0][a : a + n]
    if dest[1] is not None and src[1] is not None:
        dest[1][at : at + n] = src[1][a : a + n]
    return n


def _scatter(piece: np.ndarray, at: int, targets: list[tuple[Rows, int, int, int]], layer: int,
             k: int) -> None:  # fmt: skip
    """Rows ``[at, at + len(piece))`` of one layer (``k`` = 0: rows, 1: scales) into each target
    ``(rows, its row 0, lo, hi)`` where they fall into ``[lo, hi)``."""
    for arrays, base, lo, hi in targets:
        a, b = max(at, lo), min(at + len(piece), hi)
        dest = arrays[k]
        if a < b and dest is not None:
            dest[a - base : b - base, layer] = piece[a - at : b - at]


def _detach(pool: list[_Sample], budget: ByteBudget) -> list[_Sample]:
    """Leftovers of a round as copies of their own (counted in the budget's reserve), so that no
    view keeps the round's buffers alive once it is given back."""
    budget.set_leftovers(sum(nbytes((s.rows, s.scales)) for s in pool))
    return [
        s if s.own else _Sample(s.sample, s.rows.copy(),
                                None if s.scales is None else s.scales.copy(), True)
        for s in pool
    ]  # fmt: skip


def _collect(n: int, blocks: queue.Queue[Any], stop: threading.Event) -> dict[int, Rows] | None:
    """The next ``n`` blocks off the queue (one round), or None when the stream ended."""
    got: dict[int, Rows] = {}
    while len(got) < n:
        item = _get(blocks, stop)
        if item is None:
            return None
        got[item[0]] = item[1]
    return got


def _acquire(slots: threading.Semaphore, stop: threading.Event) -> bool:
    """Take a slot unless the consumer went away; False when it did."""
    while not stop.is_set():
        if slots.acquire(timeout=0.05):
            return True
    return False


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer went away; False when it did."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue[Any], stop: threading.Event) -> Any:
    """Next item, or None when the consumer went away or the producer ended or failed."""
    while not stop.is_set():
        try:
            item = q.get(timeout=0.05)
        except queue.Empty:
            continue
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item
    return None


def _guard(work: Callable[[], None], out: queue.Queue[Any], stop: threading.Event) -> None:
    """Run a worker; hand any failure down the stream to the consumer."""
    try:
        work()
    except BaseException as exc:
        _put(out, exc, stop)
