"""Strict checks of configuration values and checkpoint inputs, shared by every verb.

    check_fields(cfg, {"lr": (">=0",), "max_steps": (">=1",)})   # in a config's __post_init__
    local_checkpoint("runs/s0", "--student")                     # local folder, or a clear error

Every field is checked against its dataclass annotation (an int field refuses 2.5 and
True, a bool field refuses the string "false", every float must be finite), then
against its range rules; the error names the field and its option. A checkpoint path
that looks local is never sent to a model hub: a mistyped folder fails at once instead
of after a remote lookup. Checkpoint identities (hashes of config and weights) are
computed here so that the student side can compare them without the teacher code.
Runs no model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import types
import typing
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this cache; the message names it."""


_OPS = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}


def _option(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def _types(annotation) -> tuple[tuple, bool]:
    """(allowed base types, None allowed) of a field annotation (strings as `from __future__` leaves them)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"str": str, "int": int, "float": float, "bool": bool, "None": None,  # noqa: S307
                                       "tuple": tuple, "list": list, "dict": dict})
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


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def looks_local(path: str) -> bool:
    """A path no model hub id can be: absolute, ./ ../ ~, two or more slashes, or a folder that exists."""
    if path.startswith(("/", ".", "~")) or "\\" in path or path.endswith("/") or path.count("/") > 1:
        return True
    if not _HUB_ID.fullmatch(path):
        return True
    first = path.split("/")[0]
    return "/" in path and Path(first).is_dir()


def local_checkpoint(path: str | None, option: str) -> str | None:
    """Refuse a checkpoint path that is neither a local folder nor a model already in the local hub cache."""
    if path is None:
        return None
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        if not (p / "config.json").exists():
            raise CheckpointError(f"{option} {path}: the folder has no config.json; "
                                    "give a Hugging Face checkpoint folder (save_pretrained)")
        return path
    if p.exists():
        raise CheckpointError(f"{option} {path} is a file; give a Hugging Face checkpoint folder")
    if looks_local(path):
        raise CheckpointError(f"{option} {path}: no such folder")
    try:  # a hub id: accept it only when it is already in the local cache (deltakd never downloads)
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
    except Exception:  # an id the hub library itself refuses
        cached = None
    if not isinstance(cached, str):
        raise CheckpointError(f"{option} {path}: no such folder here, and no model of that name in the local "
                                "Hugging Face cache (deltakd does not download checkpoints)")
    return path


def checkpoint_identity(path: str | Path) -> dict:
    """Identity of a local Hugging Face checkpoint: hashes of its config and weight files."""
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: not a Hugging Face checkpoint folder (no config.json)")
    weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise CheckpointError(f"{path}: no weight files (*.safetensors or *.bin)")
    h = hashlib.sha256()
    for p in weights:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return {
        "path": str(path.resolve()),
        "config_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest(),
        "weights_sha256": h.hexdigest(),
    }
