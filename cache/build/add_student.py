"""Add (or replace) the student-base arrays of a finished cache without running the teachers.

    deltakd cache add-student --cache CACHE --student-base S0

The student runs over the cached token ids and is scored at the cached support ids.
While it runs, the manifest says "no student"; a killed run resumes shard by shard.

What it cannot provide: the Delta-KD target's exact tails (`tail_star`) and, for a
union support, the new student's own top ids and the target's top ids in the
support; both need the teachers at the same positions. P1/P3 trained from such a
cache use the product-formula tail (see FORMAT.md); rebuild with the student base
for exact targets.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from deltakd.cache.build.builder import (
    CacheBuildConfig,
    Sequence,
    commit_student_shard,
    load_stage,
    run_phases,
    stops_cleanly,
)
from deltakd.cache.build.forward import load_tokenizer, output_rows
from deltakd.cache.format import schema, store
from deltakd.cache.format.records import tokenizer_identity
from deltakd.runtime.checkpoints import CheckpointError, checkpoint_identity
from deltakd.runtime.config import check_fields
from deltakd.runtime.lock import locked


@dataclass(frozen=True)
class AddStudentConfig:
    cache: str = field(metadata={"help": "a finished cache folder"})
    student_base: str = field(metadata={"help": "student before distillation (local Hugging Face checkpoint)"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    chunk_rows: int = field(default=1024, metadata={"help": "supervised rows projected to the vocabulary at once"})
    model_dtype: str = field(default="float32", metadata={"help": "dtype the student runs in"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N"})

    def __post_init__(self):
        check_fields(self, {"batch_size": (">=1",), "chunk_rows": (">=1",)})
        if self.model_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--model-dtype {self.model_dtype!r}: use float32, bfloat16 or float16")


def cached_sequences(root: Path, name: str) -> list[Sequence]:
    a = schema.read_group(root / schema.TEACHER_DIR / name, ["tokens", "loss_mask", "seq_offsets", "example_ids"])
    off = a["seq_offsets"]
    return [
        Sequence(
            int(a["example_ids"][i]),
            a["tokens"][off[i] : off[i + 1]].astype(int).tolist(),
            a["loss_mask"][off[i] : off[i + 1]].astype(int).tolist(),
        )
        for i in range(len(off) - 1)
    ]


@locked(lambda cfg: cfg.cache, "cache add-student", option="--cache", create=False)
@stops_cleanly("cache add-student", lambda cfg: store.cache_root(cfg.cache))
def add_student(cfg: AddStudentConfig) -> dict:
    root = store.cache_root(cfg.cache)
    mpath = root / schema.MANIFEST
    if not mpath.exists():
        raise schema.CacheFormatError(f"{root}: no {schema.MANIFEST}; finish `deltakd cache build` first")
    manifest = json.loads(mpath.read_text())
    tok = load_tokenizer(cfg.student_base)
    tid = tokenizer_identity(tok)
    if tid["sha256"] != manifest["tokenizer"]["sha256"]:
        raise CheckpointError(
            f"the tokenizer of {cfg.student_base} differs from the one the cache was built with "
            f"(vocabulary {tid['vocab_size']} vs {manifest['tokenizer']['vocab_size']}, or special tokens)"
        )
    if output_rows(cfg.student_base) < manifest["vocab_size"]:
        raise CheckpointError(
            f"{cfg.student_base}: fewer output rows than the cache's vocabulary ({manifest['vocab_size']})"
        )
    ident = checkpoint_identity(cfg.student_base)
    if manifest.get("tail_proposal", "teacher") != "teacher" and not (
        manifest.get("student") and _same_student(manifest["student"]["checkpoint"], ident)
    ):
        # The drawn ids' importance weights are the build's π*, which holds its student base: another one
        # would give every forward KL and P3 wrong weights.
        raise schema.CacheFormatError(
            f"{root}: its tail samples were drawn using the Delta-KD target of its own student base "
            f"(--tail-proposal {manifest['tail_proposal']}), so a new student base cannot reweight them; build a "
            "new cache with "
            f"--student-base {cfg.student_base}, or one with --tail-proposal teacher, which takes add-student"
        )
    same = lambda m: bool(m) and _same_student(m, ident)  # noqa: E731
    sdir = root / schema.STUDENT_DIR
    names = [s["name"] for s in manifest["shards"]]
    if (
        manifest.get("student")
        and same(manifest["student"]["checkpoint"])
        and all(schema.is_committed(sdir / n) for n in names)
    ):
        # The cache holds this student already (with the build's exact target tails, when it had them):
        # rewriting the manifest would announce fewer arrays than the groups hold.
        print(
            f"deltakd: {root} already holds the student-base arrays of {cfg.student_base}; nothing to do",
            file=sys.stderr,
        )
        return manifest
    if manifest.get("support") == "union" or (manifest.get("student") or {}).get("alphas"):
        print(
            f"deltakd: note: {root} was built with {manifest.get('support')} support; add-student scores "
            f"{cfg.student_base} on the ids already there but cannot add its own top ids or the Delta-KD target's, "
            "nor the exact target tails (they need the teachers at the same positions): P1/P3 will use the "
            "product-formula tail. Rebuild with --student-base for exact targets.",
            file=sys.stderr,
        )
    if manifest.get("student") and (not same(manifest["student"]["checkpoint"]) or manifest["student"].get("alphas")):
        # Announce "no student" first, so a crash below never leaves a manifest that names one
        # student over arrays of another, or exact target tails over groups without them.
        manifest["student"] = None
        schema.write_json_atomic(mpath, manifest)
    schema.clean_partials(root)
    # Staged results of an interrupted run may come from another student: redo them.
    for st in store.local_stage(root).glob("*/s0.npz"):
        st.unlink()
    sdir.mkdir(exist_ok=True)
    for n in names:  # arrays of another student are dropped, this student's are kept (resume)
        meta = sdir / n / schema.SHARD_META
        if not meta.exists():
            continue
        own = json.loads(meta.read_text())
        # A group with the build's exact target tails cannot stay beside groups without them:
        # the manifest announces tail_star for every group or for none.
        if not same(own.get("student_base")) or any(r.startswith("tail_star/") for r in own.get("checksums", {})):
            schema.uncommit_group(sdir / n)
            store.rmtree(sdir / n)
    todo = [n for n in names if not schema.is_committed(sdir / n)]
    shards = {n: cached_sequences(root, n) for n in todo}
    bcfg = CacheBuildConfig(
        teacher_ft="",
        teacher_base="",
        data="",
        out=str(root),
        top_k=manifest["k"],
        support="topk",
        mode="sequential",
        tail_samples=0,
        batch_size=cfg.batch_size,
        chunk_rows=cfg.chunk_rows,
        dtype=manifest["value_dtype"],
        model_dtype=cfg.model_dtype,
        device=cfg.device,
    )
    timings = run_phases(
        root, todo, shards, {"s0": cfg.student_base}, bcfg, manifest["vocab_size"], tok.pad_token_id or 0, rank=0
    )
    for n in todo:
        commit_student_shard(root, n, load_stage(root, n, "s0"), manifest["value_dtype"], ident)
    store.rmtree(store.local_stage(root))  # a finished cache has no stage
    metas = [json.loads((sdir / n / schema.SHARD_META).read_text()) for n in names]
    manifest["student"] = {
        "checkpoint": ident,
        "alphas": [],
        "shards": [{k: v for k, v in m.items() if k != "student_base"} for m in metas],
    }
    manifest.setdefault("summary", {})["add_student"] = timings
    schema.write_json_atomic(mpath, manifest)
    return manifest


def _same_student(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "path"} == {k: v for k, v in b.items() if k != "path"}
