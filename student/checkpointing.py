"""Training checkpoints (exact resume) and the final Hugging Face export.

    RUN/checkpoints/step-000100/   model.safetensors, optimizer.pt, rng.pt, state.json
    RUN/final/                     save_pretrained (safetensors) + tokenizer + train_config.json

A checkpoint is written aside and renamed into place, so a kill during a save
leaves the previous checkpoint as the newest complete one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

# Fields that may change between a run and its resume without changing the result.
RESUME_FREE = {"out", "device", "log_every", "save_every", "eval_every", "eval_batches", "dry_run"}
KEEP = 2


def _ckpt_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def find_resume(out, cfg) -> Path | None:
    d = _ckpt_dir(out)
    if not d.is_dir():
        return None
    done = sorted(p for p in d.glob("step-*") if p.is_dir() and not p.name.endswith(".partial"))
    if not done:
        return None
    saved = json.loads((done[-1] / "state.json").read_text())["config"]
    now = dataclasses.asdict(cfg)
    diff = sorted(k for k in set(saved) | set(now) if k not in RESUME_FREE and saved.get(k) != now.get(k))
    if diff:
        raise ValueError(f"{out} holds a run with other settings ({', '.join(diff)}); "
                         "use another --out folder to start a new run, or the same settings to resume")
    return done[-1]


def save_training_state(tr) -> None:
    from safetensors.torch import save_file

    if tr.rank != 0:
        return
    d = _ckpt_dir(tr.out)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step-{tr.step:06d}"
    if final.exists():
        return
    part = final.with_name(final.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tr.model.state_dict().items()}, str(part / "model.safetensors"))
    torch.save(tr.opt.state_dict(), part / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, part / "rng.pt")
    (part / "state.json").write_text(json.dumps(
        {"step": tr.step, "loader": tr.loader_state, "config": dataclasses.asdict(tr.cfg)}, indent=1))
    os.replace(part, final)
    for old in sorted(p for p in d.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def load_training_state(path: Path, tr) -> tuple[int, dict]:
    from safetensors.torch import load_file

    tr.model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(tr.device)))
    tr.opt.load_state_dict(torch.load(path / "optimizer.pt", map_location=tr.device, weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    st = json.loads((path / "state.json").read_text())
    return int(st["step"]), st["loader"]


def save_final(tr) -> Path:
    out = tr.out / "final"
    part = tr.out / "final.partial"
    shutil.rmtree(part, ignore_errors=True)
    tr.model.save_pretrained(str(part), safe_serialization=True)
    tr.tok.save_pretrained(str(part))
    shutil.copy(tr.out / "train_config.json", part / "train_config.json")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(part, out)
    return out
