"""Writers' claims on a store, so two stage-one processes never interleave their writes.

Claims are small JSON files (pid, host, start time) in the folder ``STORE.claims`` beside the
store (beside, not inside: ``--overwrite`` deletes the store but must keep the claim of the
process doing it). A claim file is created exclusively (``O_CREAT | O_EXCL`` locally, a
conditional put on S3), then the other claims are checked for conflicts:

* ``whole``            a run over the whole store: conflicts with every other claim;
* ``shard-I-of-N``     a shard worker: conflicts with ``whole``, with the same slot, and with
                       shard workers of another ``N`` (their shards would overlap);
* ``meta``             held for a moment while the store is created or finalised; others wait.

A claim whose process is dead (same host, pid gone) is stale and is removed. A conflict raises
:class:`StoreBusyError`; when two processes start at the same instant both may refuse, never
both proceed. :func:`others_alive` lists the claims of other live writers: a resumed writer
removes the temporary files left in the store only when there are none.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from storage.errors import StoreBusyError
from storage.location import Location, locate

log = logging.getLogger(__name__)
SUFFIX = ".claims"
WHOLE = "whole"
META = "meta"


def shard_slot(index: int, count: int) -> str:
    return f"shard-{index}-of-{count}"


def _parse_shard(slot: str) -> tuple[int, int] | None:
    parts = slot.split("-")
    if len(parts) == 4 and parts[0] == "shard" and parts[2] == "of":
        return int(parts[1]), int(parts[3])
    return None


def conflicts(mine: str, other: str) -> bool:
    """Whether claim ``other`` forbids holding claim ``mine`` at the same time."""
    if META in (mine, other):
        return mine == other
    if mine == other or WHOLE in (mine, other):
        return True
    a, b = _parse_shard(mine), _parse_shard(other)
    return a is None or b is None or a[1] != b[1]


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}


def _alive(info: dict[str, Any]) -> bool:
    """False only when the claim's process is certainly gone (same host, no such pid)."""
    if info.get("host") != socket.gethostname():
        return True  # cannot tell for another machine: assume it is still working
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True


def _describe(store: str, slot: str, info: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("since", 0))))
    return (
        f"{store} is being written by another stage-one process (claim {slot!r}: pid "
        f"{info.get('pid')} on host {info.get('host')}, since {since})"
    )


def _read(folder: Location, name: str) -> dict[str, Any] | None:
    raw = folder.read_file(name)
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return {}  # being written right now (or torn): treat as alive, unknown owner
    return info if isinstance(info, dict) else {}


def _take(folder: Location, store: str, slot: str) -> None:
    """Create ``slot`` exclusively (clearing a stale holder once) or raise StoreBusyError."""
    payload = json.dumps(_me()).encode()
    for _ in range(2):
        if folder.create_exclusive(slot, payload):
            return
        info = _read(folder, slot)
        if info is None or (info and not _alive(info)):
            log.warning("removing the stale claim %r of %s (process %s is gone)", slot, store,
                        (info or {}).get("pid"))  # fmt: skip
            folder.delete_file(slot)
            continue
        raise StoreBusyError(
            _describe(store, slot, info) + "; wait for it to finish or stop it (a claim left by "
            f"a crashed process on another host is removed with: rm {folder}/{slot})"
        )
    raise StoreBusyError(f"could not claim {store} ({slot}): the claim keeps reappearing")


def acquire(store: str | Location, slot: str) -> Location:
    """Claim ``slot`` of ``store``; returns the claims folder. Raises StoreBusyError."""
    loc = locate(store)
    folder = loc.sibling(SUFFIX)
    _take(folder, str(loc), slot)
    for other in folder.list_files():
        if other == slot or not conflicts(slot, other):
            continue
        info = _read(folder, other)
        if info is None:
            continue
        if info and not _alive(info):
            log.warning("removing the stale claim %r of %s", other, loc)
            folder.delete_file(other)
            continue
        release(folder, slot)
        hint = (
            "shard workers of one store must all use the same N in --shard I/N"
            if _parse_shard(slot) and _parse_shard(other)
            else "wait for it to finish or stop it first"
        )
        raise StoreBusyError(_describe(str(loc), other, info) + f"; refusing {slot!r}: {hint}")
    return folder


def others_alive(store: str | Location) -> list[str]:
    """Slots of the claims on ``store`` held by other processes that may still be running.

    This process's own claims and those of processes certainly gone (same host, no such pid)
    are left out; a claim that cannot be read (being written, or torn) counts as alive. The
    writer removes a killed writer's temporary files only when this is empty.
    """
    folder = locate(store).sibling(SUFFIX)
    me = (os.getpid(), socket.gethostname())
    busy = []
    for slot in folder.list_files():
        info = _read(folder, slot)
        if info is None or (info and (info.get("pid"), info.get("host")) == me):
            continue
        if info and not _alive(info):
            continue
        busy.append(slot)
    return busy


def release(folder: Location, slot: str) -> None:
    folder.delete_file(slot)
    folder.remove_if_empty()


@contextmanager
def claim(store: str | Location, slot: str) -> Iterator[None]:
    """Hold ``slot`` of ``store`` for the duration of the block."""
    folder = acquire(store, slot)
    try:
        yield
    finally:
        release(folder, slot)


@contextmanager
def meta_lock(store: str | Location, timeout: float = 600.0) -> Iterator[None]:
    """Exclusive, short-lived: creating or finalising the store. Waits for another holder."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            folder = acquire(store, META)
            break
        except StoreBusyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        yield
    finally:
        release(folder, META)
