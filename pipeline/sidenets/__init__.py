"""Side networks, registered by name: ``read``, ``lst``, ``linear``, ``mlp``; or your own, named by
import path (``mypkg.heads.MyHead``, :mod:`pipeline.sidenets.custom`).

A spec is ``KIND[:key=value,...]``. Keys that are fields of the kind's config dataclass (for your
own class: its constructor's parameters) size the network; ``lr``, ``weight_decay``, ``warmup``,
``patience``, ``seed``, ``precision`` and ``name`` are training settings (see
:class:`TrainSettings`). What a network is given: :class:`StoreInfo` when it is built,
:class:`SideBatch` per forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError, StoreCorruptError, StoreMismatchError
from pipeline.sidenets import custom
from pipeline.sidenets.base import SideBatch, StoreInfo, loss_fn
from pipeline.sidenets.custom import SideNetError
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
    # the learning rate held-out samples chose for most kinds and tasks (BENCHMARKS.md, "Side
    # networks against fine-tuning")
    lr: float = 3e-3
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

    @property
    def is_custom(self) -> bool:
        """Whether ``kind`` is an import path (``mypkg.heads.MyHead``), not a registered kind."""
        return custom.is_import_path(self.kind)

    @property
    def default_name(self) -> str:
        """The network's name when the spec sets no ``name=``: the kind, or for a class named by
        import path its name lower-cased."""
        return custom.default_name(self.kind) if self.is_custom else self.kind

    def config(self) -> Any:
        """The registered kind's config dataclass (for a class named by import path, see
        :meth:`model_config`)."""
        return REGISTRY[self.kind].config(**self.model)

    def model_config(self) -> dict[str, Any]:
        """What sizes the network, as checkpoints record it: the config dataclass's fields, or
        the keyword arguments a class named by import path is built with."""
        return dict(self.model) if self.is_custom else dataclasses.asdict(self.config())


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
    kind = kind.strip()
    if custom.is_import_path(kind):
        return parse_custom(kind, rest, text)
    kind = kind.lower()
    if kind not in REGISTRY:
        raise ConfigError(f"unknown side network {kind!r} in --sidenet {text!r}: expected one of "
                          f"{', '.join(REGISTRY)} or an import path MODULE.CLASS")  # fmt: skip
    entry = REGISTRY[kind]
    model_defaults = {f.name: f.default for f in dataclasses.fields(entry.config)}
    model_defaults.update(entry.defaults)
    train = TrainSettings()
    model = dict(entry.defaults)
    for key, value in spec_items(rest, text):
        if key in model_defaults:
            model[key] = cast_value(value, model_defaults[key], key, text)
        elif hasattr(train, key):
            setattr(train, key, cast_value(value, getattr(train, key), key, text))
        else:
            keys = sorted([*model_defaults, *vars(train)])
            raise ConfigError(f"--sidenet {text!r}: unknown key {key!r}; {kind} takes {keys}")
    check_precision(train, text)
    return SideSpec(kind, model, train, text)


def parse_custom(kind: str, rest: str, text: str) -> SideSpec:
    """A spec whose kind is an import path: training keys go to :class:`TrainSettings`, the
    others to the class's constructor, typed by its signature (:class:`custom.Params`)."""
    params = custom.Params(custom.resolve(kind, text), text)
    train, model = TrainSettings(), {}
    for key, value in spec_items(rest, text):
        if hasattr(train, key):
            try:
                setattr(train, key, cast_value(value, getattr(train, key), key, text))
            except ConfigError as exc:
                raise SideNetError(str(exc)) from None
        else:
            model[key] = params.cast(key, value)
    params.check_required(model)
    check_precision(train, text)
    return SideSpec(kind, model, train, text)


def spec_items(rest: str, text: str) -> list[tuple[str, str]]:
    """The ``key=value`` pairs after a spec's kind."""
    items = []
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--sidenet {text!r}: expected key=value, found {item!r}")
        items.append((key, value))
    return items


def check_precision(train: TrainSettings, text: str) -> None:
    if train.precision not in PRECISIONS:
        raise ConfigError(f"--sidenet {text!r}: precision must be one of {', '.join(PRECISIONS)}; "
                          f"found {train.precision!r}")  # fmt: skip


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
    arrays = {}
    for name in names:
        try:
            arrays[name] = read(name)
        except (KeyError, StoreCorruptError) as exc:  # a missing array
            raise StoreMismatchError(
                f"{type(inner).__name__} initialises from the train store's {name}, which it "
                f"lacks ({exc}): the store was cached before that array was stored. Re-run "
                "stage one with the same flags and --overwrite"
            ) from exc
    inner.init_from_store(arrays)


def build(spec: SideSpec, info: StoreInfo) -> nn.Module:
    """The side network of ``spec``; wrapped in :class:`Autocast` unless it computes in float32,
    so training, evaluation and prediction all compute alike. A class named by import path is
    built as ``CLASS(info, **spec.model)`` and checked on a probe batch
    (:func:`custom.construct`)."""
    if spec.is_custom:
        net = custom.construct(custom.resolve(spec.kind, spec.text), info, spec.model, spec.text)
    else:
        net = REGISTRY[spec.kind].build(info, spec.config())
    dtype = PRECISIONS[spec.train.precision]
    return net if dtype == torch.float32 else Autocast(net, dtype)


__all__ = ["REGISTRY", "SideBatch", "SideNetError", "SideSpec", "StoreInfo", "TrainSettings",
           "build", "init_from_store", "loss_fn", "parse_spec"]  # fmt: skip
