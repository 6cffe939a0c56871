"""Strict checks of configuration values, shared by every verb.

    check_fields(cfg, {"lr": (">=0",), "max_steps": (">=1",)})   # in a config's __post_init__

Every field is checked against its dataclass annotation (an int field refuses 2.5 and
True, a bool field refuses the string "false", every float must be finite), then
against its range rules; the error names the field and its option.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing

_OPS = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}


def _option(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def _types(annotation) -> tuple[tuple, bool]:
    """(allowed base types, None allowed) of a field annotation (strings as `from __future__` leaves them)."""
    if isinstance(annotation, str):
        annotation = eval(
            annotation,
            {
                "str": str,
                "int": int,
                "float": float,
                "bool": bool,
                "None": None,  # noqa: S307
                "tuple": tuple,
                "list": list,
                "dict": dict,
            },
        )
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(a for a in args if a is not type(None)), type(None) in args
    return (typing.get_origin(annotation) or annotation,), False


def _describe(v) -> str:
    return f"the string {v!r}" if isinstance(v, str) else repr(v)


def check_fields(cfg, rules: dict[str, tuple[str, ...]] | None = None) -> None:
    """Type-check every field of a (frozen) dataclass instance and apply the range rules.

    int values given to float fields become floats (TOML `lr = 1`); nothing else is coerced.
    """
    rules = rules or {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        allowed, optional = _types(f.type)
        if v is None:
            if optional:
                continue
            raise ValueError(f"{_option(f.name)} must be set")
        if bool in allowed:
            if not isinstance(v, bool):
                raise ValueError(f"{_option(f.name)} must be true or false, got {_describe(v)}")
        elif int in allowed and float not in allowed:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{_option(f.name)} must be a whole number, got {_describe(v)}")
        elif float in allowed:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{_option(f.name)} must be a number, got {_describe(v)}")
            if not math.isfinite(v):
                raise ValueError(f"{_option(f.name)} must be a finite number, got {v}")
            if isinstance(v, int):
                object.__setattr__(cfg, f.name, float(v))
        elif str in allowed:
            if not isinstance(v, str):
                raise ValueError(f"{_option(f.name)} must be text, got {_describe(v)}")
        for rule in rules.get(f.name, ()):
            op, bound = re.fullmatch(r"(>=|<=|>|<)(-?[\d.e+-]+)", rule).groups()
            if not _OPS[op](float(getattr(cfg, f.name)), float(bound)):
                raise ValueError(f"{_option(f.name)} must be {op} {bound}, got {getattr(cfg, f.name)}")
