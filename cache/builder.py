"""Build a teacher cache: each checkpoint runs once over the data; shards commit atomically.

    deltakd cache build --teacher-ft FT --teacher-base BASE [--student-base S0] \
        --data train.jsonl --out CACHE
    torchrun --nproc_per_node N -m deltakd.cli cache build ...   # ranks split the shards

Plan: records are tokenised and grouped, in file order, into shards of about
`shard_tokens` tokens; shard j belongs to rank j % world, so the content does not
depend on the number of ranks. Checkpoints run one after another (only one model in
memory); each phase leaves its per-shard results in `stage/<shard>/` so that a killed
build resumes from the last finished phase of each shard.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import dist, schema
from .forward import (CheckpointError, checkpoint_identity, load_model, load_tokenizer, logit_chunks,
                      output_rows, support_values, supervised_hidden)
from .records import data_sha256, encode_record, loss_mask_for, read_records, tokenizer_identity


@dataclass(frozen=True)
class CacheBuildConfig:
    teacher_ft: str = field(metadata={"help": "teacher after SFT (local Hugging Face checkpoint folder)"})
    teacher_base: str = field(metadata={"help": "the same teacher before SFT"})
    data: str = field(metadata={"help": "JSONL with prompt/response fields or chat messages"})
    out: str = field(metadata={"help": "cache folder to create or resume"})
    student_base: str | None = field(default=None, metadata={"help": "student before distillation (optional; see `cache add-student`)"})
    top_k: int = field(default=64, metadata={"help": "teacher ids kept per supervised position"})
    max_length: int = field(default=1024, metadata={"help": "tokens per sequence; longer records are truncated and counted"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    chunk_rows: int = field(default=1024, metadata={"help": "supervised rows projected to the vocabulary at once (memory peak)"})
    shard_tokens: int = field(default=65536, metadata={"help": "tokens per shard (unit of commit, resume and reading)"})
    dtype: str = field(default="float16", metadata={"help": "stored value dtype: float16, bfloat16 or float32"})
    model_dtype: str = field(default="float32", metadata={"help": "dtype the checkpoints run in (bfloat16 on accelerators)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda (one GPU per rank under torchrun) or cuda:N"})

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError("--top-k must be at least 1")
        if self.max_length < 2:
            raise ValueError("--max-length must be at least 2")
        if min(self.batch_size, self.chunk_rows, self.shard_tokens) < 1:
            raise ValueError("--batch-size, --chunk-rows and --shard-tokens must be positive")
        schema.storage_dtype(self.dtype)
        if self.model_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--model-dtype {self.model_dtype!r}: use float32, bfloat16 or float16")


@dataclass
class Sequence:
    example_id: int
    tokens: list[int]
    loss_mask: list[int]


@dataclass
class Plan:
    shards: list[list[Sequence]]
    n_truncated: int


def plan_shards(records, tokenizer, max_length: int, shard_tokens: int) -> Plan:
    shards, cur, cur_tokens, n_trunc = [], [], 0, 0
    for rec in records:
        ids, plen, truncated = encode_record(tokenizer, rec, max_length)
        n_trunc += truncated
        cur.append(Sequence(rec.example_id, ids, loss_mask_for(len(ids), plen)))
        cur_tokens += len(ids)
        if cur_tokens >= shard_tokens:
            shards.append(cur)
            cur, cur_tokens = [], 0
    if cur:
        shards.append(cur)
    return Plan(shards, n_trunc)


def check_checkpoints(paths: dict[str, str]):
    """Refuse, before loading any weights, tokenizers or vocabularies that do not line up."""
    toks = {role: load_tokenizer(p) for role, p in paths.items()}
    ids = {role: tokenizer_identity(t) for role, t in toks.items()}
    ref_role = next(iter(paths))
    for role, ident in ids.items():
        if ident["sha256"] != ids[ref_role]["sha256"]:
            raise CheckpointError(
                f"the tokenizers of {role} ({paths[role]}) and {ref_role} ({paths[ref_role]}) differ "
                f"(vocabulary {ident['vocab_size']} vs {ids[ref_role]['vocab_size']}, or special tokens / chat "
                "template): a cache needs one tokenizer shared by all checkpoints")
    vocab = ids[ref_role]["vocab_size"]
    for role, p in paths.items():
        rows = output_rows(p)
        if rows < vocab:
            raise CheckpointError(
                f"{role} ({p}) has {rows} output rows but its tokenizer has {vocab} tokens: "
                "the model cannot score every token")
    return toks[ref_role], ids[ref_role]


def build_identity(cfg: CacheBuildConfig, tok_id: dict, plan: Plan) -> dict:
    """What makes two builds produce the same cache; a resume must match it exactly."""
    roles = {"teacher_ft": cfg.teacher_ft, "teacher_base": cfg.teacher_base}
    ident = {
        "format": schema.FORMAT_NAME, "format_version": schema.FORMAT_VERSION, "support": "topk",
        "checkpoints": {r: checkpoint_identity(p) for r, p in roles.items()},
        "tokenizer": tok_id,
        "data": {"path": str(Path(cfg.data).resolve()), "sha256": data_sha256(cfg.data)},
        "k": cfg.top_k, "value_dtype": cfg.dtype, "model_dtype": cfg.model_dtype,
        "max_length": cfg.max_length, "shard_tokens": cfg.shard_tokens,
        "n_shards": len(plan.shards), "n_truncated": plan.n_truncated,
    }
    if cfg.student_base:
        ident["student_base"] = checkpoint_identity(cfg.student_base)
    return ident


def _same_identity(a: dict, b: dict) -> list[str]:
    """Keys whose values differ, ignoring paths (a moved checkpoint or data file is the same one)."""
    import copy

    def strip(d):
        d = copy.deepcopy(d)
        for c in list(d.get("checkpoints", {}).values()) + [d.get("student_base") or {}, d.get("data") or {}]:
            c.pop("path", None)
        return d

    sa, sb = strip(a), strip(b)
    return sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))


# ---------------------------------------------------------------- phases
PHASES = ("ft", "base", "s0")


def _stage(root: Path, name: str) -> Path:
    return root / "stage" / name


def _save_stage(path: Path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _batches(seqs: list[Sequence], batch_size: int):
    """Batches of sequence indices, sorted by length so that padding stays small."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].tokens))
    for s in range(0, len(order), batch_size):
        yield order[s:s + batch_size]


def run_phase(model, phase: str, seqs: list[Sequence], ids_by_seq, cfg: CacheBuildConfig, vocab: int, pad_id: int, bar):
    """One checkpoint over one shard. Returns per-sequence dicts of float32/int arrays."""
    out: list[dict | None] = [None] * len(seqs)
    device = next(model.parameters()).device
    for batch in _batches(seqs, cfg.batch_size):
        L = max(len(seqs[i].tokens) for i in batch)
        inp = torch.full((len(batch), L), pad_id, dtype=torch.long)
        att = torch.zeros((len(batch), L), dtype=torch.long)
        msk = torch.zeros((len(batch), L), dtype=torch.long)
        for r, i in enumerate(batch):
            n = len(seqs[i].tokens)
            inp[r, :n] = torch.tensor(seqs[i].tokens)
            att[r, :n] = 1
            msk[r, :n] = torch.tensor(seqs[i].loss_mask)
        hidden = supervised_hidden(model, inp.to(device), att.to(device), msk.to(device))
        counts = msk.sum(1).tolist()
        if phase == "ft":
            k = min(cfg.top_k, vocab)
            ids_all, vals_all, tail_all = [], [], []
            for _, logits in logit_chunks(model, hidden, vocab, cfg.chunk_rows):
                ids = logits.topk(k, dim=1).indices  # sorted, most probable first
                vals, tail = support_values(logits, ids)
                ids_all.append(ids.cpu()); vals_all.append(vals.cpu()); tail_all.append(tail.cpu())
            res = {"ids": torch.cat(ids_all) if ids_all else torch.zeros(0, k, dtype=torch.long),
                   "vals": torch.cat(vals_all) if vals_all else torch.zeros(0, k),
                   "tail": torch.cat(tail_all) if tail_all else torch.zeros(0)}
        else:
            ids = torch.cat([torch.from_numpy(ids_by_seq[i]) for i in batch]).long().to(device)
            vals_all, tail_all = [], []
            for sl, logits in logit_chunks(model, hidden, vocab, cfg.chunk_rows):
                vals, tail = support_values(logits, ids[sl])
                vals_all.append(vals.cpu()); tail_all.append(tail.cpu())
            res = {"vals": torch.cat(vals_all) if vals_all else torch.zeros(0, ids.shape[1]),
                   "tail": torch.cat(tail_all) if tail_all else torch.zeros(0)}
        bad = ~torch.isfinite(res["vals"]).all(1) | torch.isnan(res["tail"]) | (res["tail"] == float("inf"))
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            seq_i = batch[int(np.searchsorted(np.cumsum(counts), row, side="right"))]
            raise FloatingPointError(
                f"{phase} checkpoint produced NaN/Inf log-probs for example {seqs[seq_i].example_id} "
                f"(line {seqs[seq_i].example_id + 1} of the data, counting non-blank lines); "
                "try --model-dtype float32 or check the checkpoint")
        start = 0
        for r, i in enumerate(batch):
            n = counts[r]
            out[i] = {key: v[start:start + n].numpy() for key, v in res.items()}
            start += n
        bar.update(sum(len(seqs[i].tokens) for i in batch), len(batch))
    return out


def _pack(per_seq: list[dict], key: str, width: int | None) -> np.ndarray:
    parts = [d[key] for d in per_seq]
    if parts:
        return np.concatenate(parts)
    return np.zeros((0, width) if width else (0,), dtype=np.float32)


class Progress:
    """tqdm bar over tokens with sequences/s and tokens/s."""

    def __init__(self, total_tokens: int, desc: str, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total_tokens, desc=desc, unit="tok", unit_scale=True, disable=not enabled, dynamic_ncols=True)
        self.t0, self.seqs, self.tokens = time.perf_counter(), 0, 0

    def update(self, tokens: int, seqs: int):
        self.tokens += tokens
        self.seqs += seqs
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix(seq_s=f"{self.seqs / dt:.1f}", refresh=False)
        self.bar.update(tokens)

    def close(self) -> float:
        self.bar.close()
        return time.perf_counter() - self.t0


def teacher_arrays(seqs: list[Sequence], ft: list[dict], base: list[dict], k: int, vocab: int, value_dtype: str):
    tokens = np.concatenate([np.asarray(s.tokens) for s in seqs]).astype(schema.id_dtype(vocab))
    mask = np.concatenate([np.asarray(s.loss_mask) for s in seqs]).astype(np.uint8)
    offsets = np.concatenate([[0], np.cumsum([len(s.tokens) for s in seqs])]).astype(np.int64)
    logp_ft = _pack(ft, "vals", k)
    # Delta is formed in float32 from float32 log-probs, then rounded once.
    delta = logp_ft - _pack(base, "vals", k)
    enc = lambda x: schema.encode_values(x, value_dtype)  # noqa: E731
    return {
        "tokens": tokens, "loss_mask": mask, "seq_offsets": offsets,
        "example_ids": np.asarray([s.example_id for s in seqs], dtype=np.int64),
        "topk_ids": _pack(ft, "ids", k).astype(schema.id_dtype(vocab)),
        "logp_ft": enc(logp_ft), "delta": enc(delta),
        "tail_ft": enc(_pack(ft, "tail", None)), "tail_base": enc(_pack(base, "tail", None)),
    }


def student_arrays(s0: list[dict], k: int, value_dtype: str):
    return {"logp_s0": schema.encode_values(_pack(s0, "vals", k), value_dtype),
            "tail_s0": schema.encode_values(_pack(s0, "tail", None), value_dtype)}


def run_phases(root: Path, names: list[str], shards: dict[str, list[Sequence]], phases: dict[str, str],
               cfg: CacheBuildConfig, vocab: int, pad_id: int, rank: int) -> dict:
    """Run each phase's checkpoint over every shard that lacks that phase's stage file."""
    timings = {}
    for phase, path in phases.items():
        todo = [n for n in names if not (_stage(root, n) / f"{phase}.npz").exists()]
        if not todo:
            continue
        model = load_model(path, cfg.device, cfg.model_dtype)
        total = sum(len(s.tokens) for n in todo for s in shards[n])
        bar = Progress(total, f"[rank {rank}] {phase}", enabled=rank == 0)
        for n in todo:
            ids = None if phase == "ft" else _load_ids(root, n)
            res = run_phase(model, phase, shards[n], ids, cfg, vocab, pad_id, bar)
            arrays = {f"{key}_{i}": d[key] for i, d in enumerate(res) for key in d}
            _save_stage(_stage(root, n) / f"{phase}.npz", n=np.int64(len(res)), **arrays)
        timings[phase] = {"seconds": bar.close(), "tokens": total}
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return timings


def _load_stage(root: Path, name: str, phase: str) -> list[dict]:
    z = np.load(_stage(root, name) / f"{phase}.npz")
    n = int(z["n"])
    keys = {f.rsplit("_", 1)[0] for f in z.files if f != "n"}
    return [{key: z[f"{key}_{i}"] for key in keys} for i in range(n)]


def _load_ids(root: Path, name: str) -> list[np.ndarray]:
    """Teacher top-k ids per sequence: from this build's stage, else from the committed shard."""
    stage = _stage(root, name) / "ft.npz"
    if stage.exists():
        return [d["ids"] for d in _load_stage(root, name, "ft")]
    return ids_from_committed(root, name)


def ids_from_committed(root: Path, name: str) -> list[np.ndarray]:
    a = schema.read_group(root / schema.TEACHER_DIR / name, ["topk_ids", "loss_mask", "seq_offsets"])
    bounds = schema.sup_offsets(a["loss_mask"], a["seq_offsets"])
    return [a["topk_ids"][bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]


def commit_shard(root: Path, name: str, seqs, cfg: CacheBuildConfig, vocab: int, student_ident):
    """Write the shard's zarr groups aside and rename them into place; then drop its stage."""
    k = min(cfg.top_k, vocab)
    tdir = root / schema.TEACHER_DIR / name
    if not tdir.exists():
        part = tdir.with_name(name + schema.PARTIAL_SUFFIX)
        shutil.rmtree(part, ignore_errors=True)
        arrays = teacher_arrays(seqs, _load_stage(root, name, "ft"), _load_stage(root, name, "base"), k, vocab, cfg.dtype)
        schema.write_group(part, arrays)
        meta = schema.ShardInfo(name, len(seqs), int(arrays["tokens"].shape[0]), int(arrays["topk_ids"].shape[0]),
                                schema.group_checksums(part)).to_json()
        schema.commit_group(part, tdir, meta)
    if student_ident is not None:
        commit_student_shard(root, name, _load_stage(root, name, "s0"), k, cfg.dtype, student_ident)
    shutil.rmtree(_stage(root, name), ignore_errors=True)


def commit_student_shard(root: Path, name: str, s0: list[dict], k: int, value_dtype: str, student_ident: dict):
    sdir = root / schema.STUDENT_DIR / name
    part = sdir.with_name(name + schema.PARTIAL_SUFFIX)
    shutil.rmtree(part, ignore_errors=True)
    arrays = student_arrays(s0, k, value_dtype)
    schema.write_group(part, arrays)
    meta = {"name": name, "n_supervised": int(arrays["tail_s0"].shape[0]),
            "checksums": schema.group_checksums(part), "student_base": student_ident}
    schema.commit_group(part, sdir, meta)


def write_manifest(root: Path, ident: dict, build_cfg: dict, summary: dict) -> dict:
    shards = []
    for i in range(ident["n_shards"]):
        meta = root / schema.TEACHER_DIR / schema.shard_name(i) / schema.SHARD_META
        shards.append(json.loads(meta.read_text()))
    student = None
    if ident.get("student_base"):
        sh = [json.loads((root / schema.STUDENT_DIR / s["name"] / schema.SHARD_META).read_text()) for s in shards]
        student = {"checkpoint": ident["student_base"], "shards": [{k: v for k, v in m.items() if k != "student_base"} for m in sh]}
    manifest = {
        "format": schema.FORMAT_NAME, "format_version": schema.FORMAT_VERSION, "support": "topk",
        "k": min(ident["k"], ident["tokenizer"]["vocab_size"]), "vocab_size": ident["tokenizer"]["vocab_size"],
        "value_dtype": ident["value_dtype"], "id_dtype": str(schema.id_dtype(ident["tokenizer"]["vocab_size"])),
        "tail": "tail_X = log of the probability mass of model X outside topk_ids (-inf when k = vocab_size)",
        "delta": "delta = log p_teacher_ft - log p_teacher_base at topk_ids",
        "checkpoints": ident["checkpoints"], "tokenizer": ident["tokenizer"], "data": ident["data"],
        "build": build_cfg, "summary": summary, "shards": shards, "student": student,
        "totals": {key: sum(s[key] for s in shards) for key in ("n_seqs", "n_tokens", "n_supervised")},
    }
    schema.write_json_atomic(root / schema.MANIFEST, manifest)
    return manifest


def build_cache(cfg: CacheBuildConfig) -> dict:
    rank, world = dist.init()
    root = Path(cfg.out)
    roles = {"teacher_ft": cfg.teacher_ft, "teacher_base": cfg.teacher_base}
    if cfg.student_base:
        roles["student_base"] = cfg.student_base
    records = read_records(cfg.data)
    tok, tok_id = check_checkpoints(roles)
    plan = plan_shards(records, tok, cfg.max_length, cfg.shard_tokens)
    ident = build_identity(cfg, tok_id, plan)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        bfile = root / schema.BUILD_FILE
        if bfile.exists():
            diff = _same_identity(json.loads(bfile.read_text()), ident)
            if diff:
                raise ValueError(
                    f"{root} holds a cache built from other inputs or settings (differs in: {', '.join(diff)}); "
                    "use another --out folder or delete this one")
        elif any(root.iterdir()):
            raise ValueError(f"{root} is not empty and holds no deltakd build: choose an empty or new --out folder")
        schema.clean_partials(root)
        schema.write_json_atomic(bfile, ident)
    dist.barrier(world)
    if world > 1 and rank != 0:
        diff = _same_identity(json.loads((root / schema.BUILD_FILE).read_text()), ident)
        if diff:
            raise ValueError(f"rank {rank} sees different inputs than rank 0: {diff}")

    names_all = [schema.shard_name(i) for i in range(len(plan.shards))]
    shards = dict(zip(names_all, plan.shards))
    mine = [n for i, n in enumerate(names_all) if i % world == rank]
    student_ident = ident.get("student_base")
    pending = [n for n in mine if not (root / schema.TEACHER_DIR / n).exists()
               or (student_ident and not (root / schema.STUDENT_DIR / n).exists())]
    (root / schema.TEACHER_DIR).mkdir(exist_ok=True)
    (root / schema.STUDENT_DIR).mkdir(exist_ok=True)
    phases = {"ft": cfg.teacher_ft, "base": cfg.teacher_base}
    if student_ident:
        phases["s0"] = cfg.student_base
    teacher_pending = [n for n in pending if not (root / schema.TEACHER_DIR / n).exists()]
    timings = run_phases(root, teacher_pending, shards, {p: phases[p] for p in ("ft", "base")}, cfg,
                         tok_id["vocab_size"], tok.pad_token_id or 0, rank)
    if "s0" in phases:
        timings.update(run_phases(root, pending, shards, {"s0": phases["s0"]}, cfg, tok_id["vocab_size"],
                                  tok.pad_token_id or 0, rank))
    for n in pending:
        commit_shard(root, n, shards[n], cfg, tok_id["vocab_size"], student_ident)
    dist.barrier(world)
    summary = {
        "n_records": len(records), "n_truncated": plan.n_truncated, "world_size": world,
        "phases": timings if world == 1 else None, "shards_built_this_run": len(pending) if world == 1 else None,
    }
    manifest = None
    if rank == 0:
        shutil.rmtree(root / "stage", ignore_errors=True)
        manifest = write_manifest(root, ident, dataclasses.asdict(cfg), summary)
    dist.barrier(world)
    return manifest or {}
