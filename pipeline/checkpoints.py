"""What stage two writes per side network, and how an interrupted run picks up again.

``OUT/<name>/best.pt`` (config, weights, the train store's identity), ``last.pt`` (that plus the
optimiser, schedule, random-number streams and history, for resuming), ``metrics.json`` and
``history.csv``. Every file is written atomically, and every tensor in a checkpoint is on the
CPU, so a checkpoint written on a GPU loads on a machine without one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from typing import TYPE_CHECKING, Any

import torch

from pipeline import rng
from pipeline.errors import ConfigError
from pipeline.memory import peak_memory
from pipeline.sidenets import StoreInfo
from storage import atomic_path, write_text_atomic

if TYPE_CHECKING:
    from pipeline.train import Member

log = logging.getLogger(__name__)


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples) moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def checkpoint(m: Member, info: StoreInfo, identity: dict[str, Any], full: bool) -> dict[str, Any]:
    state: dict[str, Any] = {
        "kind": m.spec.kind,
        "spec": m.spec.text,
        "model_config": m.spec.model_config(),
        "train_settings": dataclasses.asdict(m.spec.train),
        "store_info": info.to_json(),
        "store_identity": identity,
        "state_dict": m.model.state_dict(),
        "epoch": m.epochs_done,
        "eval_batch_size": m.eval_batch,
    }
    if full:
        state.update(
            optim=m.optim.state_dict(), sched=m.sched.state_dict(), rng=m.rng, history=m.history,
            best=m.best, best_epoch=m.best_epoch, bad_epochs=m.bad_epochs, stopped=m.stopped,
            seconds=m.seconds, device_type=m.device.type, best_valid=m.best_valid,
            valid_fraction=m.valid_fraction,
        )  # fmt: skip
    return to_cpu(state)


def save(state: dict[str, Any], path: Any) -> None:
    """``torch.save`` whole or not at all (serialised in memory, then one atomic write)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def resume(m: Member, identity: dict[str, Any]) -> None:
    """Load ``last.pt`` into ``m`` if there is one: weights, optimiser moments (onto the
    parameters' device), schedule, random-number streams and history."""
    path = m.folder / "last.pt"
    if not path.is_file():
        return
    state = torch.load(path, map_location="cpu", weights_only=False)
    now = dataclasses.asdict(m.spec.train)
    saved = state.get("train_settings") or now
    now, saved = ({k: v for k, v in d.items() if k != "name"} for d in (now, saved))  # a label
    same_net = (state["kind"], state.get("model_config")) == (m.spec.kind, m.spec.model_config())
    if state["store_identity"] != identity or not (state["spec"] == m.spec.text or (
            same_net and saved == now)):  # fmt: skip
        raise ConfigError(
            f"{m.folder} holds a run of {state['spec']!r} on another store; choose another --out "
            "or delete that folder"
        )
    changed = {k: saved[k] for k in now if k in saved and saved[k] != now[k]}
    if changed:  # the same spec, under another default (lr was 1e-3 before it became 3e-3)
        was = ",".join(f"{k}={v}" for k, v in changed.items())
        asks = ", ".join(f"{k}={now[k]}" for k in changed)
        raise ConfigError(
            f"{path} was trained with {was} and {m.spec.text!r} now means {asks} (a default "
            f"changed): resume with {was} added to the spec, or delete that folder to train "
            "from the start"
        )
    held = state.get("valid_fraction", 0.0)
    if held != m.valid_fraction:
        raise ConfigError(
            f"{path} was trained with --valid-fraction {held} and this run asks for "
            f"{m.valid_fraction}: its history chose epochs on other samples. Resume with "
            f"--valid-fraction {held}, or delete that folder to train from the start"
        )
    written_on = state.get("device_type", "cpu")
    if written_on != m.device.type:
        raise ConfigError(
            f"{path} was written training on {written_on} and this run is on {m.device.type}: "
            f"its dropout streams cannot carry over. Resume with --device {written_on}, or "
            "delete that folder to train from the start"
        )
    m.model.load_state_dict(state["state_dict"])
    m.optim.load_state_dict(state["optim"])
    m.sched.load_state_dict(state["sched"])
    m.rng, m.history, m.best = _rng_state(state["rng"]), state["history"], state["best"]
    m.best_valid = state.get("best_valid")
    m.best_epoch, m.bad_epochs, m.stopped = (
        state["best_epoch"],
        state["bad_epochs"],
        state["stopped"],
    )
    m.epochs_done, m.seconds = state["epoch"], state["seconds"]
    log.info("%s: resuming after epoch %d", m.name, m.epochs_done)


def _rng_state(saved: Any) -> rng.RngState:
    """A checkpoint's random-number state (older ones hold the CPU state alone)."""
    return (saved, None) if isinstance(saved, torch.Tensor) else (saved[0], saved[1])


def save_best(m: Member, info: StoreInfo, identity: dict[str, Any]) -> None:
    save(checkpoint(m, info, identity, full=False), m.folder / "best.pt")


def write_outputs(m: Member, info: StoreInfo, identity: dict[str, Any], finished: bool,
                  loaders: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """``last.pt``, ``metrics.json`` and ``history.csv`` of ``m`` as it stands; returns the
    metrics."""
    save(checkpoint(m, info, identity, full=True), m.folder / "last.pt")
    result = {
        "name": m.name,
        "spec": m.spec.text,
        "kind": m.spec.kind,
        "eval": eval_summary(m),
        "train_loss": m.history[-1]["train_loss"] if m.history else None,
        "epochs": m.epochs_done,
        "stopped_early": m.stopped,
        "finished": finished,
        "trainable_params": m.params,
        "wall_time_s": round(m.seconds, 3),
        "memory": peak_memory(m.device),
        "torch_threads": torch.get_num_threads(),
        "micro_rows": m.micro_rows,
    }
    if m.valid_fraction:
        result["valid"] = valid_summary(m)
    if loaders is not None:  # the streaming loaders' memory, once the run is over
        result["loader_memory"] = loaders
    write_text_atomic(m.folder / "metrics.json", json.dumps(result, indent=2))
    keys = sorted(m.history[0]["eval"]) if m.history else []
    held = sorted(m.history[0].get("valid", {})) if m.history else []
    with atomic_path(m.folder / "history.csv") as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "train_loss", *keys, *(f"valid_{k}" for k in held)])
        for h in m.history:
            w.writerow([h["epoch"], h["train_loss"], *(h["eval"][k] for k in keys),
                        *(h["valid"][k] for k in held)])  # fmt: skip
    return result


def eval_summary(m: Member) -> dict[str, Any]:
    """``metrics.json``'s ``eval``: the scores at the chosen epoch (``best``: chosen on the
    held-out validation samples with ``--valid-fraction``, else on eval itself), after the last
    epoch, and, when the choice was on validation, the best eval epoch too (eval choosing its
    own epoch, as GLUE papers report dev)."""
    out: dict[str, Any] = {
        "best": m.best,
        "final": m.history[-1]["eval"] if m.history else None,
        "best_epoch": m.best_epoch,
        "chosen_on": "valid" if m.valid_fraction else "eval",
    }
    if m.valid_fraction and m.history:
        top = max(m.history, key=lambda h: h["eval"]["score"])  # the first of equals
        out["best_on_eval"], out["best_on_eval_epoch"] = top["eval"], top["epoch"]
    return out


def valid_summary(m: Member) -> dict[str, Any]:
    """``metrics.json``'s ``valid``: the held-out share and its scores at the chosen epoch."""
    return {
        "fraction": m.valid_fraction,
        "best": m.best_valid,
        "final": m.history[-1].get("valid") if m.history else None,
    }
