"""Stage one's messages when something stands in the way: a store begun with other settings
(and what resumes it), a disk that is full, read-only or not ours to write."""

from __future__ import annotations

import errno
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.storeplan import row_bytes, shard_bytes_estimate
from storage import DiskFullError, Layout, StoreExistsError, StoreWriteError, locate, open_store

# the flags that fix the batch plan, by the key a store records each under (identity.extraction)
PLAN_FLAGS = {
    "token_budget": "--token-budget",
    "max_batch": "--max-batch",
    "batch_cost": "--batch-cost",
    "window_rows": "--window-mb",
}


# a store's recorded CPU numerics, and the variables that reproduce them (torch's vector
# instructions can be lowered, never raised, on a given CPU; MKL's mode is read at its first call)
NUMERICS_ENV = {"cpu_capability": "ATEN_CPU_CAPABILITY", "mkl": "MKL_CBWR"}


def resume_hint(exc: StoreExistsError, layout: Layout) -> StoreExistsError:
    """``exc`` plus what resumes the existing store, when it differs from this run only in how
    the batches are planned (as after a default changed between versions: the flags) or in the
    CPU numerics it was begun with (another machine, another MKL mode: the environment)."""
    plan = {f"identity.extraction.{name}" for name in PLAN_FLAGS}
    numerics = {f"identity.extraction.numerics.{name}" for name in NUMERICS_ENV}
    if not exc.differences or any(
        key not in plan | numerics or (key in numerics and was is None)  # no MKL: no variable
        for key, was, _ in exc.differences
    ):
        return exc
    flags, env = [], []
    for key, was, _ in exc.differences:
        name = key.rpartition(".")[2]
        if key in numerics:  # torch's variable takes lower case (avx2); MKL's default is unset
            value = str(was).lower() if name == "cpu_capability" else was
            value = "" if value == "OFF" else value
            env.append(f"{NUMERICS_ENV[name]}={shlex.quote(str(value))}")
        elif name == "window_rows":  # exactly this many rows again (whole shards already)
            flags.append(f"--window-mb {int(was) * row_bytes(layout) / (1 << 20)!r}")
        else:
            flags.append(f"{PLAN_FLAGS[name]} {'fill' if was is None else was}")
    how = []
    if flags:
        how.append(f"run the same command with {' '.join(flags)} (the settings it was written "
                   "with)")  # fmt: skip
    if env:
        how.append(f"run it with {' '.join(env)} in the environment (the numerics it was begun "
                   "with), on a CPU that has them")  # fmt: skip
    return StoreExistsError(f"{exc}. To resume or reuse it instead, {'; and '.join(how)}",
                            exc.differences)  # fmt: skip


def _shards_on_disk(path: str, layout: Layout) -> int:
    try:
        arr: Any = open_store(path, allow_incomplete=True).group["progress"]
        progress = np.asarray(arr[...])
    except Exception:  # the store may not even have its metadata yet
        return 0
    return int(np.isfinite(progress).all(axis=(1, 2)).sum())


def free_bytes(path: str) -> int | None:
    if locate(path).is_remote:
        return None
    for folder in (Path(path), *Path(path).absolute().parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return None


def check_writable(path: str) -> None:
    """Refuse a local ``--out`` whose nearest existing folder cannot be written (read-only file
    system, no permission) before anything is claimed or computed."""
    if "://" in path:
        return
    folder = next((f for f in (Path(path), *Path(path).absolute().parents) if f.exists()), None)
    if folder is None or os.access(folder, os.W_OK):
        return
    code = errno.EROFS if os.statvfs(folder).f_flag & os.ST_RDONLY else errno.EACCES
    raise StoreWriteError(
        f"cannot write the store at {path}: {folder} is not writable ({os.strerror(code)}); "
        "expected a writable folder: choose another --out or fix its permissions"
    )


def _size(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def write_failure(exc: OSError, path: str, layout: Layout) -> StoreWriteError:
    """Turn an ``OSError`` raised while writing the store into a named, actionable error."""
    done = _shards_on_disk(path, layout)
    todo = layout.n_shards - done
    free = free_bytes(path)
    free_text = "unknown" if free is None else _size(free)
    kept = f"the {done} of {layout.n_shards} shards already on disk are kept and the store stays "
    kept += "incomplete; re-run the same command to resume"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        need = todo * shard_bytes_estimate(layout)
        return DiskFullError(
            f"the disk holding {path} is full ({exc.strerror}, writing {exc.filename or path}): "
            f"about {_size(need)} was still to be written ({todo} shards) and {free_text} "
            f"is free. Free at least that much space (or choose another --out); {kept}"
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreWriteError(
            f"cannot write the store at {path}: {exc.strerror} ({exc.filename or path}); expected "
            f"a writable folder: choose another --out or fix its permissions; {kept}"
        )
    return StoreWriteError(f"writing the store at {path} failed: {exc}; {kept}")
