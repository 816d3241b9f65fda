"""``sidecache bench``: cached side networks and online baselines, side by side, on one task.

Every measured unit runs in a fresh subprocess (``python -m pipeline.bench.worker JOB.json``),
so the peak memory of one method never mixes with another's:

* ``idle`` — the worker with torch imported and nothing run: the memory baseline (run first and
  last; the smaller peak is used);
* ``cache`` — stage one over the train and eval splits (once; a fresh store every bench run);
* ``cached`` — stage two for one side network and one seed (``sidecache train`` with one spec);
* ``online`` — :func:`pipeline.online.run_online` for one method and one seed.

Methods are run interleaved (seed by seed, the method order rotated each seed) so that a change
of machine load hits every method alike. Per run the worker reports wall time and CPU-seconds
(its own user + system time) from the start of the job, after the interpreter and torch are
loaded; peak memory (CPU: ``VmHWM`` of ``/proc/self/status``, the peak resident set; GPU:
``torch.cuda.max_memory_allocated``); GPU energy from NVML when ``pynvml`` and a GPU are there,
else ``unavailable``. The parent also records the CPU time the *other* processes of the machine
used during each run (``/proc/stat``), to say how loaded the machine was.

The table: score mean ± std over seeds (best epoch and final epoch), trainable parameters, median
peak memory above idle, wall time and CPU-seconds; for cached methods the one-off stage-one cost
separately and amortised over every side network trained from that store in this bench run.

With ``--valid-fraction F`` every run holds out the same share of the training samples and
chooses its best epoch on them; the table then gives dev at that epoch, the held-out score, and
dev at the epoch dev itself picks (for comparison with papers), and per family of methods that
differ only in ``lr=`` the learning rate chosen on the held-out samples
(:mod:`pipeline.bench.select`), in ``bench.json``'s ``chosen`` and ``bench.md``.
"""

from pipeline.bench.config import DEFAULT_METHODS, BenchConfig, split_method
from pipeline.bench.report import summarise, to_markdown
from pipeline.bench.runner import plan_jobs, run_bench
from pipeline.bench.select import choose, lr_family

__all__ = [
    "DEFAULT_METHODS",
    "BenchConfig",
    "choose",
    "lr_family",
    "plan_jobs",
    "run_bench",
    "split_method",
    "summarise",
    "to_markdown",
]
