"""Online methods by name: a spec is ``KIND[:key=value,...]`` like stage two's ``--sidenet``.

``full``, ``lora`` and ``meft`` take their own sizes (:class:`FullConfig`, :class:`LoraConfig`,
:class:`MeftConfig`); ``read`` and ``lst`` take exactly stage two's keys. Every kind takes the
training keys ``lr weight_decay warmup patience seed name`` (:class:`TrainSettings`); the default
learning rate depends on the kind (full fine-tuning needs a small one). ``precision`` is a side
network's (``read:precision=bfloat16``); ``full``, ``lora`` and ``meft`` compute in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from pipeline.backbone import Backbone
from pipeline.errors import ConfigError
from pipeline.online.finetune import FullConfig, LoraConfig, build_full, build_lora
from pipeline.online.meft import MeftConfig, build_meft
from pipeline.sidenets import REGISTRY as SIDENETS
from pipeline.sidenets import SideSpec, TrainSettings, cast_value, parse_spec


@dataclass(frozen=True)
class OnlineKind:
    config: type
    build: Callable[[Backbone, Any, int], nn.Module]
    lr: float


KINDS: dict[str, OnlineKind] = {
    "full": OnlineKind(FullConfig, build_full, 2e-5),
    "lora": OnlineKind(LoraConfig, build_lora, 5e-4),
    "meft": OnlineKind(MeftConfig, build_meft, 5e-4),
}
SIDE_KINDS = ("read", "lst")


def is_side(spec: SideSpec) -> bool:
    return spec.kind in SIDE_KINDS


def parse_method(text: str) -> SideSpec:
    """``lora:r=8,lr=5e-4`` -> :class:`SideSpec` (kind, sizes, training settings, text)."""
    kind = text.partition(":")[0].strip().lower()
    if kind in SIDE_KINDS:
        return parse_spec(text)
    if kind not in KINDS:
        known = [*KINDS, *SIDE_KINDS]
        hint = " (probes need no backbone: train them from a store)" if kind in SIDENETS else ""
        raise ConfigError(
            f"unknown online method {kind!r} in {text!r}: expected one of {known}" + hint
        )
    entry = KINDS[kind]
    defaults = {f.name: f.default for f in dataclasses.fields(entry.config)}
    model: dict[str, Any] = {}
    train = TrainSettings(lr=entry.lr)
    for item in filter(None, (x.strip() for x in text.partition(":")[2].split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"method {text!r}: expected key=value, found {item!r}")
        if key in defaults:
            model[key] = cast_value(value, defaults[key], key, text, "method")
        elif hasattr(train, key):
            setattr(train, key, cast_value(value, getattr(train, key), key, text, "method"))
        else:
            raise ConfigError(
                f"method {text!r}: unknown key {key!r}; {kind} takes "
                f"{sorted([*defaults, *vars(train)])}"
            )
    if train.precision != "float32":
        raise ConfigError(f"method {text!r}: precision applies to the side networks (read, lst); "
                          f"{kind} computes in float32, so drop precision=")  # fmt: skip
    return SideSpec(kind, model, train, text)


def build_online(spec: SideSpec, bb: Backbone, outputs: int) -> nn.Module:
    """The trainable module of ``full``/``lora``/``meft`` (its forward takes a TokenBatch)."""
    entry = KINDS[spec.kind]
    return entry.build(bb, entry.config(**spec.model), outputs)
