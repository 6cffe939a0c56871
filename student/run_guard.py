"""What `train(cfg)` checks before it touches a run folder, and how it stops on a signal.

    @guarded          # on train(cfg): lock, inputs, finished run, cache identity, graceful stop
    def train(cfg): ...

- `--student` / `--student-base-online` must be local folders (or models already in
  the local hub cache): a mistyped path fails at once, never after a hub lookup.
- Delta-KD terms (P1/P2/P3) assume that the cache's student-base arrays (πS0) come from
  the very checkpoint being trained; another checkpoint gets a loud warning, or an
  error with `--strict`.
- A run folder whose `final/` was written with the same settings is finished: the
  re-run says so and changes nothing.
- A resume needs the same cache, not only the same path: the sha256 of the cache's
  manifest is kept in `RUN/cache_identity.json` and a rebuilt cache is refused.
- SIGTERM / Ctrl-C: the loop saves a checkpoint at the next step boundary and stops
  (see deltakd.runtime.stop); the same command resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
from pathlib import Path

from deltakd.cache.format.reader import CacheReader
from deltakd.cache.format.schema import MANIFEST
from deltakd.runtime.checkpoints import checkpoint_identity, local_checkpoint
from deltakd.runtime.lock import folder_lock
from deltakd.runtime.stop import graceful_stop
from deltakd.student.checkpointing import resume_differences

IDENTITY_FILE = "cache_identity.json"


def manifest_sha256(reader: CacheReader) -> str:
    return hashlib.sha256((reader.root / MANIFEST).read_bytes()).hexdigest()


def _same_checkpoint(a: dict, b_path: str) -> bool:
    """`a` is a recorded identity; the config is compared first so that a different model costs no weight hashing."""
    cfg = Path(b_path) / "config.json"
    if not cfg.is_file() or hashlib.sha256(cfg.read_bytes()).hexdigest() != a.get("config_sha256"):
        return False
    return checkpoint_identity(b_path)["weights_sha256"] == a.get("weights_sha256")


def check_student_base(cfg, reader: CacheReader) -> None:
    """Loud warning (error with --strict) when πS0 does not come from the student being trained."""
    spec = cfg.loss_spec()
    if not spec.needs_student_base:
        return
    if cfg.student_base_online:
        same, base = (
            Path(cfg.student_base_online).resolve() == Path(cfg.student).resolve()
            or _same_checkpoint(checkpoint_identity(cfg.student_base_online), cfg.student),
            cfg.student_base_online,
        )
    elif reader.has_student:
        rec = reader.manifest["student"]["checkpoint"]
        same, base = _same_checkpoint(rec, cfg.student), rec.get("path", "?")
    else:
        return  # check_student refuses this case with what to do
    if same:
        return
    terms = "/".join(t.upper() for t in spec.active if t in ("p1", "p2", "p3"))
    msg = (
        f"the student {cfg.student} is not the checkpoint the student-base log-probs come from ({base}); "
        f"the Delta-KD terms ({terms}) assume that piS0 is the student's own start, so their target is off. "
        f"Train that checkpoint, or run `deltakd cache add-student --cache {cfg.cache} --student-base {cfg.student}`, "
        f"or pass --student-base-online {cfg.student}"
    )
    if getattr(cfg, "strict", False):
        raise ValueError(msg)
    bar = "!" * 78
    print(f"{bar}\ndeltakd: WARNING: {msg} (--strict makes this an error)\n{bar}", file=sys.stderr, flush=True)


def finished_result(cfg) -> dict | None:
    """The last evaluation of a finished run with the same settings, else None."""
    final = Path(cfg.out) / "final" / "train_config.json"
    if cfg.dry_run or not final.is_file():
        return None
    saved = json.loads(final.read_text())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = {k: v for k, v in saved.items() if k in dataclasses.asdict(cfg)}
    if resume_differences(config, saved.get("world_size"), cfg, world):
        return None  # other settings: the resume check explains the refusal
    evals = []
    metrics = Path(cfg.out) / "metrics.jsonl"
    if metrics.is_file():
        evals = [json.loads(l) for l in metrics.read_text().splitlines() if '"eval_' in l]
    return (evals[-1] if evals else {}) | {"already_finished": True}


def check_cache_identity(cfg, reader: CacheReader) -> None:
    """Refuse to resume from a cache other than the one the run started with; record it for a new run."""
    if cfg.dry_run:
        return
    out, now = Path(cfg.out), manifest_sha256(reader)
    rec_path = out / IDENTITY_FILE
    has_ckpt = any(p.is_dir() and not p.name.endswith(".partial") for p in (out / "checkpoints").glob("step-*"))
    if has_ckpt and rec_path.is_file():
        rec = json.loads(rec_path.read_text())
        if rec.get("manifest_sha256") != now:
            raise ValueError(
                f"{out} holds a run trained from another cache: the manifest of {cfg.cache} changed since "
                f"the run started (rebuilt, or student arrays added or replaced); use another --out folder, "
                "or the cache the run started with"
            )
        return
    if int(os.environ.get("RANK", "0")) == 0:
        out.mkdir(parents=True, exist_ok=True)
        where = str(reader.root) if "://" in str(cfg.cache) else str(Path(cfg.cache).resolve())
        rec_path.write_text(json.dumps({"cache": where, "manifest_sha256": now}) + "\n")


def guarded(train_fn):
    """Wrap `train(cfg)` with the checks above, the run folder's lock and graceful stops."""

    @functools.wraps(train_fn)
    def inner(cfg):
        reader = CacheReader(cfg.cache)
        local_checkpoint(cfg.student, "--student")
        local_checkpoint(cfg.student_base_online, "--student-base-online")
        if int(os.environ.get("RANK", "0")) != 0:
            return _run(train_fn, cfg, reader)
        with folder_lock(cfg.out, "train"):
            return _run(train_fn, cfg, reader)

    return inner


def _run(train_fn, cfg, reader):
    done = finished_result(cfg)
    if done is not None:
        return done
    check_student_base(cfg, reader)
    check_cache_identity(cfg, reader)
    with graceful_stop("train", at="boundary"):
        return train_fn(cfg)
