"""Side networks, registered by name: ``read``, ``lst``, ``linear``, ``mlp``.

A spec is ``KIND[:key=value,...]``. Keys that are fields of the kind's config dataclass size the
network; ``lr``, ``weight_decay``, ``warmup``, ``patience``, ``seed``, ``precision`` and ``name``
are training settings (see :class:`TrainSettings`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError, StoreMismatchError
from pipeline.sidenets.base import SideBatch, StoreInfo, loss_fn
from pipeline.sidenets.lst import Lst, LstConfig
from pipeline.sidenets.precision import PRECISIONS, Autocast
from pipeline.sidenets.probes import Probe, ProbeConfig
from pipeline.sidenets.read import Read, ReadConfig


@dataclass(frozen=True)
class Kind:
    config: type
    build: Callable[[StoreInfo, Any], nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)


REGISTRY: dict[str, Kind] = {
    "read": Kind(ReadConfig, Read),
    "lst": Kind(LstConfig, Lst),
    "linear": Kind(ProbeConfig, Probe),
    "mlp": Kind(ProbeConfig, Probe, {"hidden": 256, "mix": True}),
}


@dataclass
class TrainSettings:
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.06  # fraction of all steps
    patience: int = 0  # epochs without improvement before stopping; 0 = never stop early
    seed: int = 0
    precision: str = "float32"  # or bfloat16: computed under autocast (pipeline.sidenets.precision)
    name: str = ""


@dataclass
class SideSpec:
    kind: str
    model: dict[str, Any]
    train: TrainSettings
    text: str

    def config(self) -> Any:
        return REGISTRY[self.kind].config(**self.model)


def cast_value(value: str, like: Any, key: str, spec: str, flag: str = "--sidenet") -> Any:
    """``value`` as the type of the default ``like``; a named error for ``flag``'s ``spec``."""
    try:
        if isinstance(like, bool):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        return type(like)(value)
    except ValueError:
        raise ConfigError(
            f"{flag} {spec!r}: {key}={value!r} is not a {type(like).__name__}"
        ) from None


def parse_spec(text: str) -> SideSpec:
    """``read:hidden=128,lr=1e-3`` -> :class:`SideSpec`; unknown kinds or keys are refused."""
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in REGISTRY:
        raise ConfigError(f"unknown side network {kind!r} in --sidenet {text!r}: expected one of "
                          f"{', '.join(REGISTRY)}")  # fmt: skip
    entry = REGISTRY[kind]
    model_defaults = {f.name: f.default for f in dataclasses.fields(entry.config)}
    model_defaults.update(entry.defaults)
    train = TrainSettings()
    model = dict(entry.defaults)
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--sidenet {text!r}: expected key=value, found {item!r}")
        if key in model_defaults:
            model[key] = cast_value(value, model_defaults[key], key, text)
        elif hasattr(train, key):
            setattr(train, key, cast_value(value, getattr(train, key), key, text))
        else:
            keys = sorted([*model_defaults, *vars(train)])
            raise ConfigError(f"--sidenet {text!r}: unknown key {key!r}; {kind} takes {keys}")
    if train.precision not in PRECISIONS:
        raise ConfigError(f"--sidenet {text!r}: precision must be one of {', '.join(PRECISIONS)}; "
                          f"found {train.precision!r}")  # fmt: skip
    return SideSpec(kind, model, train, text)


def init_from_store(net: nn.Module, read: Callable[[str], np.ndarray] | None) -> None:
    """Give a freshly built ``net`` the initial weights it takes from its train store (LST's
    pruned backbone copy, ``lst:init=pruned``). ``read`` reads one of the store's small arrays
    (``StoreReader.extra``); ``None`` when there is no store, which such a network refuses.
    Side networks name the arrays (``store_arrays()``) and never open a store themselves;
    checkpoints restore these weights, so evaluate and predict never call this."""
    inner: Any = net.net if isinstance(net, Autocast) else net
    names: list[str] = inner.store_arrays() if hasattr(inner, "store_arrays") else []
    if not names:
        return
    if read is None:
        raise StoreMismatchError(
            f"{type(inner).__name__} initialises from arrays of its train store "
            f"({names[0]}, ...) and there is no store here; train it from a store"
        )
    inner.init_from_store({name: read(name) for name in names})


def build(spec: SideSpec, info: StoreInfo) -> nn.Module:
    """The side network of ``spec``; wrapped in :class:`Autocast` unless it computes in float32,
    so training, evaluation and prediction all compute alike."""
    net = REGISTRY[spec.kind].build(info, spec.config())
    dtype = PRECISIONS[spec.train.precision]
    return net if dtype == torch.float32 else Autocast(net, dtype)


__all__ = ["REGISTRY", "SideBatch", "SideSpec", "StoreInfo", "TrainSettings", "build",
           "init_from_store", "loss_fn", "parse_spec"]  # fmt: skip
