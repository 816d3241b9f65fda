"""Side networks of your own, named by import path: ``--sidenet mypkg.heads.MyHead[:key=value]``.

A kind with a dot in it is ``MODULE.CLASS``: the module is imported (from ``sys.path``, and from
the current directory when it is not found there, as ``python -m`` would), and the class must be
a ``torch.nn.Module`` subclass built as ``CLASS(info, **kwargs)``, ``info`` being the train
store's :class:`~pipeline.sidenets.base.StoreInfo`. Its ``forward(batch)`` takes a
:class:`~pipeline.sidenets.base.SideBatch` and returns a ``(B, C)`` tensor: one row per sample,
``C = info.num_outputs`` columns (logits, or one regression value).

Spec keys other than the training keys (:class:`pipeline.sidenets.TrainSettings`) are the
constructor's keyword parameters. Each value is cast to the parameter's annotated type
(``bool``, ``int``, ``float``, ``str``, or one of them ``| None``, where ``none`` gives None),
else to its default's type, else kept as the text. Keys the constructor does not name are
refused unless it takes ``**kwargs``. A freshly built network runs once on a two-sample probe
batch of zeros, in ``eval()`` mode, without gradients and without drawing random numbers, so an
output of the wrong shape is refused before any data is read.

Everything that goes wrong here raises :class:`SideNetError` (``sidecache`` exits with 2).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import types
import typing
from typing import Any

import torch
from torch import nn

from pipeline.errors import ConfigError, SidecacheError
from pipeline.sidenets.base import SideBatch, StoreInfo

SIMPLE: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}
TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")
PARAMETER = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class SideNetError(ConfigError):
    """A side network named by import path cannot be imported, built or used as one."""


def is_import_path(kind: str) -> bool:
    """Whether a spec's kind names a class by import path (built-in kinds have no dot)."""
    return "." in kind


def default_name(kind: str) -> str:
    """A network's folder name when its spec sets no ``name=``: the class name, lower-cased."""
    return kind.rpartition(".")[2].lower()


def resolve(path: str, spec: str) -> type[nn.Module]:
    """The ``nn.Module`` subclass ``path`` (``MODULE.CLASS``) names."""
    module_name, _, attr = path.rpartition(".")
    if not all(part.isidentifier() for part in path.split(".")):
        raise SideNetError(
            f"--sidenet {spec!r}: {path!r} is not an import path; expected MODULE.CLASS such as "
            "mypkg.heads.MyHead (or a built-in kind: read, lst, linear, mlp)"
        )
    module = _import(module_name, spec)
    try:
        obj = getattr(module, attr)
    except AttributeError:
        found = sorted(n for n, v in vars(module).items() if _is_module_class(v))
        raise SideNetError(
            f"--sidenet {spec!r}: module {module_name!r} has no attribute {attr!r}; its "
            f"nn.Module classes are {found}"
        ) from None
    if not _is_module_class(obj):
        raise SideNetError(
            f"--sidenet {spec!r}: {path} is {_describe(obj)}; expected a torch.nn.Module "
            "subclass built as CLASS(info, **kwargs)"
        )
    return typing.cast(type[nn.Module], obj)


def _is_module_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def _describe(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__name__}, not an nn.Module subclass"
    return f"a {type(obj).__name__}"


def _import(name: str, spec: str) -> types.ModuleType:
    """``name`` imported; when it (or a package above it) is not on ``sys.path``, the current
    directory is searched too (appended to ``sys.path``, as ``python -m`` would find it)."""
    for attempt in range(2):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            ours = name == missing or name.startswith(missing + ".")
            cwd = os.getcwd()
            if ours and attempt == 0 and cwd not in sys.path and "" not in sys.path:
                sys.path.append(cwd)
                importlib.invalidate_caches()
                continue
            where = "" if not ours else f" (searched sys.path and the current directory {cwd})"
            raise SideNetError(
                f"--sidenet {spec!r}: cannot import module {name!r}: no module named "
                f"{missing!r}{where}; install it or run from the folder that holds it"
            ) from exc
        except Exception as exc:  # the user's module failed while being imported
            raise SideNetError(
                f"--sidenet {spec!r}: importing module {name!r} failed with "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    raise AssertionError("unreachable")


class Params:
    """What ``cls``'s constructor takes after the store info: named parameters, their types,
    the required ones, and whether it takes ``**kwargs``."""

    def __init__(self, cls: type[nn.Module], spec: str):
        self.cls, self.spec = cls, spec
        try:
            sig = inspect.signature(cls, eval_str=True)
        except Exception:  # an annotation that does not evaluate: read the strings
            try:
                sig = inspect.signature(cls)
            except (TypeError, ValueError) as exc:
                raise SideNetError(f"--sidenet {spec!r}: cannot read the signature of "
                                   f"{cls.__name__}: {exc}") from exc  # fmt: skip
        params = list(sig.parameters.values())
        if not params or params[0].kind in (*PARAMETER[1:], inspect.Parameter.VAR_KEYWORD):
            raise SideNetError(
                f"--sidenet {spec!r}: {cls.__name__}{sig} takes no positional argument; "
                "expected __init__(self, info: StoreInfo, **your keys)"
            )
        rest = params[1:] if params[0].kind != inspect.Parameter.VAR_POSITIONAL else params
        self.named = {p.name: p for p in rest if p.kind in PARAMETER}
        self.any_key = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in rest)
        self.required = [p.name for p in self.named.values() if p.default is p.empty]

    def cast(self, key: str, value: str) -> Any:
        """``value`` for the constructor's parameter ``key``."""
        if key not in self.named:
            if self.any_key:
                return value
            raise SideNetError(
                f"--sidenet {self.spec!r}: unknown key {key!r}; {self.cls.__name__} takes "
                f"{sorted(self.named)} and the training keys"
            )
        kind, optional = _value_type(self.named[key])
        if optional and value.lower() in ("none", "null"):
            return None
        if kind is None:
            return value
        try:
            return _cast(value, kind)
        except ValueError:
            raise SideNetError(
                f"--sidenet {self.spec!r}: {key}={value!r} is not a {kind.__name__} (the type "
                f"of {self.cls.__name__}'s parameter {key})"
            ) from None

    def check_required(self, given: dict[str, Any]) -> None:
        missing = [k for k in self.required if k not in given]
        if missing:
            raise SideNetError(
                f"--sidenet {self.spec!r}: {self.cls.__name__} needs "
                f"{', '.join(f'{k}=...' for k in missing)} (parameters without a default)"
            )


def _value_type(p: inspect.Parameter) -> tuple[type | None, bool]:
    """The simple type of parameter ``p`` (annotation first, then its default's type) and
    whether the annotation allows None."""
    ann = p.annotation
    if isinstance(ann, str):  # an annotation that did not evaluate: its names
        names = [x.strip() for x in ann.split("|")]
        optional = "None" in names
        simple = [SIMPLE[n] for n in names if n in SIMPLE]
    else:
        members = typing.get_args(ann) if typing.get_args(ann) else (ann,)
        optional = type(None) in members or ann is typing.Any
        simple = [m for m in members if m in SIMPLE.values()]
    if len(simple) == 1:
        return simple[0], optional
    default = p.default
    if default is not p.empty and type(default) in SIMPLE.values():
        return type(default), optional or default is None
    return None, optional or default is None


def _cast(value: str, kind: type) -> Any:
    if kind is bool:
        if value.lower() not in (*TRUE, *FALSE):
            raise ValueError(value)
        return value.lower() in TRUE
    return kind(value)


def construct(cls: type[nn.Module], info: StoreInfo, kwargs: dict[str, Any],
              spec: str) -> nn.Module:  # fmt: skip
    """``cls(info, **kwargs)``, checked on a probe batch (:func:`probe`)."""
    try:
        net = cls(info, **kwargs)
    except SidecacheError:
        raise
    except (TypeError, ValueError) as exc:
        args = ", ".join(["info", *(f"{k}={v!r}" for k, v in kwargs.items())])
        raise SideNetError(
            f"--sidenet {spec!r}: {cls.__name__}({args}) failed: {type(exc).__name__}: {exc}"
        ) from exc
    probe(net, info, spec)
    return net


def probe_batch(info: StoreInfo) -> SideBatch:
    """Two samples of zeros in ``info``'s layout (2 and 1 rows when the store holds every
    position, else 1 each)."""
    lengths = [2, 1] if info.positions == "all" else [1, 1]
    regression = info.task["type"] == "regression"
    return SideBatch(
        hidden=torch.zeros((sum(lengths), len(info.layers), info.hidden_size)),
        lengths=torch.tensor(lengths, dtype=torch.int64),
        labels=torch.zeros(2, dtype=torch.float32 if regression else torch.int64),
        samples=torch.arange(2),
        longest=max(lengths),
    )


def probe(net: nn.Module, info: StoreInfo, spec: str) -> None:
    """Run ``net`` once on :func:`probe_batch` (eval mode, no gradients, the random-number
    generators untouched) and refuse any output but a ``(2, num_outputs)`` tensor."""
    name, batch, was_training = type(net).__name__, probe_batch(info), net.training
    want = (len(batch.lengths), info.num_outputs)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            net.eval()
            out = net(batch)
    except SidecacheError:
        raise
    except Exception as exc:
        raise SideNetError(f"--sidenet {spec!r}: {name}.forward failed on a probe batch of "
                           f"{want[0]} samples: {type(exc).__name__}: {exc}") from exc  # fmt: skip
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise SideNetError(f"--sidenet {spec!r}: {name}.forward returned a "
                           f"{type(out).__name__}; expected a (B, C) tensor")  # fmt: skip
    if tuple(out.shape) != want:
        raise SideNetError(
            f"--sidenet {spec!r}: {name}.forward returned shape {tuple(out.shape)} for a batch "
            f"of {want[0]} samples; expected (B, C) = {want}: one row per sample, one column per "
            f"output (info.num_outputs = {info.num_outputs})"
        )
