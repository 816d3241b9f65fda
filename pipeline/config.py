"""Settings declared once: a config dataclass's fields carry their default, help and flag.

A command's options are a dataclass whose fields are declared with :func:`setting`. From it
:func:`add_flags` builds the argparse flags (``--field-name``), :func:`from_args` builds the
config from the parsed flags, and :func:`check_settings` checks a mapping (a ``params.yaml``
section) against the fields' type hints. Each setting has one default and one help text,
whether it is set on the command line, in ``params.yaml`` or in code.

Flags follow the field: a bool whose default is False is a ``store_true`` switch, one whose
default is True is turned off by ``--no-field-name`` (or the ``flag`` given); a field without a
default is a required flag; ``append`` collects a repeatable flag into a list; ``parse`` turns
the flag's text into the value (a :class:`ConfigError` it raises becomes argparse's message).
"""

from __future__ import annotations

import argparse
import copy
import functools
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from pipeline.errors import ConfigError

T = TypeVar("T")
KEY = "sidecache.setting"


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()  # a fallback not given (dataclasses.MISSING would mean "no default")


class ParamsError(ConfigError):
    """A mapping of settings (``params.yaml`` or a section of it) is missing, malformed, or
    names something that does not exist."""


@dataclass(frozen=True)
class Setting:
    """How one config field is offered on the command line (see :func:`setting`)."""

    help: str
    flag: str | None = None
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None
    choices: tuple[Any, ...] | None = None
    append: bool = False
    hidden: bool = False
    fallback: Any = UNSET


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
    choices: Iterable[Any] | None = None,
    append: bool = False,
    hidden: bool = False,
    fallback: Any = UNSET,
) -> Any:
    """A dataclass field with its default and how the command line offers it.

    ``default``: the field's default (a list or dict is copied for each instance); leave it out
    for a field the constructor requires. ``fallback``: for such a required field (callers pass
    it by position), the value a user who does not set it gets on the command line and in
    ``params.yaml``. ``flag``: the flag's name where it is not ``--field-name``; ``metavar``,
    ``choices``: as argparse's; ``parse``: one flag value's text -> the value; ``append``: a
    repeatable flag; ``hidden``: a flag left out of ``-h``.
    """
    meta = {
        KEY: Setting(
            help=help,
            flag=flag,
            metavar=metavar,
            parse=parse,
            choices=None if choices is None else tuple(choices),
            append=append,
            hidden=hidden,
            fallback=fallback,
        )
    }
    if isinstance(default, list | dict | set):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=meta)
    return field(default=default, metadata=meta)


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """The evaluated type hints of ``cls``'s fields (``int | None``, ``list[str]``, ...)."""
    return get_type_hints(cls)


def setting_of(f: Field[Any]) -> Setting | None:
    found = f.metadata.get(KEY)
    return found if isinstance(found, Setting) else None


def default_of(cls: type, name: str) -> Any:
    """What ``name`` of ``cls`` is when nobody sets it: its default, else its ``fallback``;
    ``dataclasses.MISSING`` for a setting that must be given."""
    f = {f.name: f for f in fields(cls)}[name]
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    s = setting_of(f)
    return MISSING if s is None or s.fallback is UNSET else copy.deepcopy(s.fallback)


def defaults(cls: type, keys: Iterable[str]) -> dict[str, Any]:
    """``{key: default_of(cls, key)}``; every key must have a default or a fallback."""
    found = {key: default_of(cls, key) for key in keys}
    missing = [key for key, value in found.items() if value is MISSING]
    if missing:
        raise TypeError(f"{cls.__name__}: no default for {', '.join(missing)}")
    return found


# -- command line ---------------------------------------------------------------------------


def flag_name(f: Field[Any], s: Setting, default: Any) -> str:
    if s.flag is not None:
        return s.flag
    stem = f.name.replace("_", "-")
    return f"--no-{stem}" if default is True else f"--{stem}"


def dest_of(f: Field[Any], s: Setting, default: Any) -> str:
    """The namespace attribute of the flag: argparse's own (``--no-progress`` -> no_progress)."""
    return flag_name(f, s, default).lstrip("-").replace("-", "_")


def inverted(hint: Any, default: Any) -> bool:
    """A bool setting that is on unless its ``--no-...`` flag is given."""
    return hint is bool and default is True


def _optional_base(hint: Any) -> Any:
    """``int | None`` -> ``int``; anything else as it is."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _argtype(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` for argparse: its :class:`ConfigError` message becomes the flag's error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _with_default(text: str, default: Any) -> str:
    """``-h`` shows the default where the help text does not already say it."""
    if text == argparse.SUPPRESS or "default" in text or default is None or default == []:
        return text
    shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
    return f"{text} (default {shown.replace('%', '%%')})"


def _flag_options(cls: type, f: Field[Any], s: Setting) -> dict[str, Any]:
    hint, default = type_hints(cls)[f.name], default_of(cls, f.name)
    kw: dict[str, Any] = {"help": argparse.SUPPRESS if s.hidden else s.help}
    kw["dest"] = dest_of(f, s, default)
    if hint is bool:
        if default is MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: a bool setting needs a default")
        kw["action"] = "store_true"
        return kw
    if default is MISSING:
        kw["required"] = True
    else:
        kw["default"] = default
        kw["help"] = _with_default(kw["help"], default)
    base = _optional_base(hint)
    if s.append:
        kw["action"] = "append"
        base = get_args(base)[0] if get_origin(base) is list else base
    if s.parse is not None:
        kw["type"] = _argtype(s.parse)
    elif base in (str, int, float):
        kw["type"] = base
    else:
        raise TypeError(f"{cls.__name__}.{f.name}: a {hint} setting needs parse=")
    if s.metavar is not None:
        kw["metavar"] = s.metavar
    if s.choices is not None:
        kw["choices"] = s.choices
    return kw


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    skip: Iterable[str] = (),
) -> None:
    """One flag per field of ``cls`` (a dataclass field of dataclass type: that class's flags),
    but those named in ``skip``."""
    skipped = set(skip)
    for f in fields(cls):
        if f.name in skipped:
            continue
        s, hint = setting_of(f), type_hints(cls)[f.name]
        if s is None:
            if not (isinstance(hint, type) and is_dataclass(hint)):
                raise TypeError(f"{cls.__name__}.{f.name} is not declared with setting(...)")
            add_flags(parser, hint, skipped)
            continue
        parser.add_argument(flag_name(f, s, default_of(cls, f.name)), **_flag_options(cls, f, s))


def from_args(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """``cls`` from the flags :func:`add_flags` added; ``given`` values win, and a field whose
    flag was skipped keeps its default."""
    values: dict[str, Any] = {}
    klass: Any = cls  # any dataclass
    for f in fields(klass):
        s, hint, default = setting_of(f), type_hints(klass)[f.name], default_of(klass, f.name)
        if f.name in given:
            values[f.name] = given[f.name]
        elif s is None and isinstance(hint, type) and is_dataclass(hint):
            values[f.name] = from_args(hint, args)
        elif s is not None and hasattr(args, dest := dest_of(f, s, default)):
            value = getattr(args, dest)
            values[f.name] = not value if inverted(hint, default) else value
    return cls(**values)


# -- mappings (params.yaml) -----------------------------------------------------------------


def conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as YAML loads it) is of type ``hint``: an int is no bool, a float may
    be an int, ``X | None`` takes null, lists and dicts are checked item by item."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items()
        )
    if isinstance(hint, type):
        return isinstance(value, hint)
    raise TypeError(f"cannot check a value against {hint!r}")


def describe(hint: Any) -> str:
    """``int | None`` -> ``int or null``; ``dict[str, str]`` -> ``dict[str, str]``."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        named = [describe(a) for a in args if a is not type(None)]
        return " or ".join(named + (["null"] if type(None) in args else []))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(describe(a) for a in args)}]"
    return str(getattr(hint, "__name__", hint))


def check_settings(
    cls: type | tuple[type, ...],
    mapping: Any,
    where: str,
    keys: Iterable[str] | None = None,
    source: str = "",
) -> dict[str, Any]:
    """``mapping`` checked against the fields of ``cls`` (or of several classes, the first that
    has a key declaring it), only ``keys`` of them if given: every key known, every value of its
    field's type, ``None`` only where the type takes it. ``where`` names the section
    (``cache``), ``source`` the file; :class:`ParamsError` names the key, the expected type and
    the value found. Returns the mapping as a dict."""
    at = f"{source}: " if source else ""
    if not isinstance(mapping, Mapping):
        raise ParamsError(
            f"{at}`{where}` must be a mapping of settings, found {type(mapping).__name__} "
            f"{mapping!r}"
        )
    owner: dict[str, type] = {}
    for c in reversed(cls if isinstance(cls, tuple) else (cls,)):
        owner.update({f.name: c for f in fields(c)})
    known = list(owner) if keys is None else list(keys)
    unknown = sorted(str(k) for k in mapping if k not in known)
    if unknown:
        raise ParamsError(
            f"{at}unknown key(s) {', '.join(unknown)} in `{where}`; expected some of "
            f"{', '.join(known)}"
        )
    for key, value in mapping.items():
        hint = type_hints(owner[key])[key]
        if not conforms(value, hint):
            default = default_of(owner[key], key)
            like = "" if default is MISSING or default is None else f" (like {default!r})"
            raise ParamsError(
                f"{at}`{where}.{key}` must be {describe(hint)}{like}, found "
                f"{type(value).__name__} {value!r}"
            )
    return dict(mapping)


def int_list(text: str) -> list[int]:
    """``0,1,2`` -> ``[0, 1, 2]`` (a flag's comma list); at least one integer."""
    try:
        found = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        found = []
    if not found:
        raise ConfigError(f"expected a comma list of integers, e.g. 0,1,2; found {text!r}")
    return found
