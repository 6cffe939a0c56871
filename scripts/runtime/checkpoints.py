"""Checkpoint paths and identities, shared by the cache builder, the trainer and `eval`.

    local_checkpoint("runs/s0", "--student")   # local folder, or a clear error
    checkpoint_identity("runs/s0")             # hashes of config.json and the weight files

A checkpoint path that looks local is never sent to a model hub: a mistyped folder
fails at once instead of after a remote lookup. Identities live here, not beside the
code that loads teachers, so that the student side compares them without that code.
Runs no model.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this cache; the message names it."""


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
            raise CheckpointError(
                f"{option} {path}: the folder has no config.json; "
                "give a Hugging Face checkpoint folder (save_pretrained)"
            )
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
        raise CheckpointError(
            f"{option} {path}: no such folder here, and no model of that name in the local "
            "Hugging Face cache (deltakd does not download checkpoints)"
        )
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
