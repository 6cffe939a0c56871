"""Generate argparse options from a frozen config dataclass (one source of truth per verb)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _base_type(tp):
    if isinstance(tp, str):
        tp = eval(tp, {"str": str, "int": int, "float": float, "bool": bool, "None": None})  # noqa: S307
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and args:
        return args[0]
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        opt = "--" + f.name.replace("_", "-")
        tp = _base_type(f.type)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        help_ = f.metadata.get("help", "")
        if tp is bool:
            # default None: an option not given leaves the config file's (or dataclass's) value.
            parser.add_argument(
                opt, action=argparse.BooleanOptionalAction, default=None, help=f"{help_} (default: {f.default})"
            )
        else:
            if not required:
                help_ += f" (default: {f.default})"
            parser.add_argument(
                opt,
                type=tp,
                default=None,
                required=False,
                help=help_ + (" [required]" if required else ""),
                choices=f.metadata.get("choices"),
            )


def config_from_args(cls, ns: argparse.Namespace, base: dict | None = None, source: str | None = None, **extra):
    """Fields from a config file (`base`, read from `source`), overridden by the options given on the command line.

    Errors are ValueErrors naming the field (and the file), shown by the CLI as one line.
    """
    values = dict(base or {})
    where = f"{source}: " if source else ""
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name, None)
        if v is not None:
            values[f.name] = v
    values.update(extra)
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{where}unknown config field(s): {', '.join(sorted(unknown))}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values
    ]
    if missing:
        raise ValueError("missing required option(s): " + ", ".join("--" + m.replace("_", "-") for m in missing))
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        field_name = str(e).split(" ", 1)[0]
        from_file = field_name in (base or {}) and getattr(ns, field_name, None) is None
        raise ValueError(f"{where if from_file else ''}invalid configuration: {e}") from e
