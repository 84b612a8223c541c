"""One config mechanism for every stage: defaults, then environment variables, then CLI flags.

Each stage declares a dataclass whose fields are *knobs* (`knob(...)`): a default, the spec's
environment variable, a help text and a validity range. `resolve()` layers the three sources and
validates; an unknown or out-of-range value is a `ConfigError` that names the knob.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

from next_speed.core.errors import ConfigError

# Seeds go to torch.manual_seed, numpy and faiss: 32 bits is what all of them accept.
SEED_MAX = 2**32 - 1
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def knob(
    default: Any,
    *,
    env: str | None = None,
    help: str = "",
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    flag: str | None = None,
) -> Any:
    """Declare a config field with its environment variable, help text and valid range."""
    meta = {"env": env, "help": help, "choices": choices, "min": min, "max": max, "flag": flag}
    return dataclasses.field(default=default, metadata=meta)


# Knobs many stages share, declared once: the same variable means the same thing everywhere.
def seed_knob(what: str = "random seed") -> Any:
    """SEED; `what` says what it seeds in this stage."""
    return knob(0, env="SEED", min=0, max=SEED_MAX, help=what)


def device_knob() -> Any:
    return knob("auto", env="DEVICE", help="auto, cpu, cuda, cuda:N or mps")


def deterministic_knob() -> Any:
    return knob(True, env="DETERMINISTIC", help="deterministic torch kernels")


def _base_type(tp: Any) -> tuple[type, bool]:
    """Return (scalar type, optional?) for an annotation like `int`, `str | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse(value: Any, tp: type, optional: bool, name: str) -> Any:
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in {"", "none"}):
        if optional:
            return None
        raise ConfigError(f"{name} must be set")
    if isinstance(value, bool) and tp is not bool:
        raise ConfigError(f"{name}={value!r} is not valid: expected {_KIND.get(tp, tp.__name__)}")
    if isinstance(value, tp):
        return _finite(value, name)
    if tp is int and isinstance(value, float):
        raise ConfigError(f"{name}={value!r} is not valid: expected an integer")
    s = str(value).strip()
    try:
        if tp is bool:
            if s.lower() in _TRUE:
                return True
            if s.lower() in _FALSE:
                return False
            raise ValueError
        if tp is int:
            return int(s)
        if tp is float:
            return _finite(float(s), name)
        return tp(s)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not valid: expected {_KIND.get(tp, tp.__name__)}") from None


_KIND = {bool: "0 or 1", int: "an integer", float: "a number"}


def _finite(v: Any, name: str) -> Any:
    """NaN passes every range check (each comparison is false) and infinity breaks later: refuse both here."""
    if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(f"{name}={v!r} is not valid: expected a finite number")
    return v


def knob_name(f: dataclasses.Field) -> str:
    """The name users see for a field: its environment variable, else its CLI flag."""
    return f.metadata.get("env") or flag_name(f)


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def fields_of(cls: type) -> list[tuple[dataclasses.Field, type, bool]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _base_type(hints[f.name])
        out.append((f, tp, optional))
    return out


def validate(cfg: Any, field_names: bool = False) -> Any:
    """Check every knob's range and choices, then the config's own `check()` for cross-knob rules.
    Errors name the environment variable, or the field when `field_names` (per-call parameters)."""
    for f, _tp, optional in fields_of(type(cfg)):
        v = getattr(cfg, f.name)
        name = f.name if field_names else knob_name(f)
        if v is None:
            if not optional:
                raise ConfigError(f"{name} must be set")
            continue
        m = f.metadata
        _finite(v, name)
        if m.get("choices") is not None and v not in m["choices"]:
            raise ConfigError(f"{name}={v!r} is not valid: choose one of {', '.join(map(str, m['choices']))}")
        if m.get("min") is not None and v < m["min"]:
            raise ConfigError(f"{name}={v!r} is too small: it must be at least {m['min']}")
        if m.get("max") is not None and v > m["max"]:
            raise ConfigError(f"{name}={v!r} is too large: it must be at most {m['max']}")
    check = getattr(cfg, "check", None)
    if callable(check):
        check()
    return cfg


def resolve(
    cls: type,
    cli: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
) -> Any:
    """Build a validated `cls`: defaults < `base` (a preset) < environment < `cli` (field -> value).

    The set of knobs that were given explicitly (not defaults) is kept on the result as
    `cfg._explicit`, so a stage can tell "left at default" from "asked for".
    """
    environ = os.environ if environ is None else environ
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    known = {f.name for f, _, _ in fields_of(cls)}
    for source in (base or {}), cli:
        unknown = sorted(set(source) - known)
        if unknown:
            valid = ", ".join(sorted(known))
            raise ConfigError(f"unknown option {unknown[0]!r} for {cls.__name__}; valid options: {valid}")
    values: dict[str, Any] = {}
    explicit: set[str] = set()
    for f, tp, optional in fields_of(cls):
        name = knob_name(f)
        raw: Any = dataclasses.MISSING
        if base and f.name in base:
            raw = base[f.name]
        env = f.metadata.get("env")
        if env and env in environ:
            raw = environ[env]
            explicit.add(f.name)
        if f.name in cli:
            raw = cli[f.name]
            explicit.add(f.name)
        if raw is dataclasses.MISSING:
            continue
        values[f.name] = _parse(raw, tp, optional, name)
    cfg = cls(**values)
    object.__setattr__(cfg, "_explicit", frozenset(explicit))
    return validate(cfg)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--flag` per knob of `cls` (values stay strings; `resolve` parses them)."""
    for f, tp, _optional in fields_of(cls):
        m = f.metadata
        env = f" [env {m['env']}]" if m.get("env") else ""
        default = f.default if f.default is not dataclasses.MISSING else None
        helptext = f"{m.get('help', '')} (default: {default}){env}".strip()
        # a bare boolean flag (`--force`) means on; `--force 0` still says off
        extra = {"nargs": "?", "const": "1"} if tp is bool else {}
        parser.add_argument(
            flag_name(f), dest=f.name, default=None, metavar=tp.__name__.upper(), help=helptext, **extra
        )


def from_namespace(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(ns, f.name) for f, _, _ in fields_of(cls) if getattr(ns, f.name, None) is not None}


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain JSON-able values (what goes into metadata)."""
    return {f.name: getattr(cfg, f.name) for f, _, _ in fields_of(type(cfg))}


def describe(cls: type) -> list[dict[str, Any]]:
    """Knob table for docs: name, env, flag, default, help."""
    rows = []
    for f, tp, _ in fields_of(cls):
        rows.append(
            {
                "field": f.name,
                "env": f.metadata.get("env"),
                "flag": flag_name(f),
                "default": f.default,
                "type": tp.__name__,
                "help": f.metadata.get("help", ""),
            }
        )
    return rows
