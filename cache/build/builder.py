"""Build a teacher cache: each checkpoint runs once over the data; shards commit atomically.

    deltakd cache build --teacher-ft FT --teacher-base BASE [--student-base S0] \
        --data train.jsonl --out CACHE
    torchrun --nproc_per_node N -m deltakd.cli cache build ... --device cuda   # ranks split the shards
    ... --teacher-sharding tp|device_map    # a teacher larger than one GPU (forward.resolve_sharding)

Plan (cache/build/plan.py, streamed: one shard in memory): records are tokenised and
grouped, in data order, into shards of about `shard_tokens` tokens; shard j belongs to
rank j % world, so the content does not depend on the number of ranks. Checkpoints
run one after another (only one model in memory); each phase leaves its per-shard
results in `stage/<shard>/` so that a killed build resumes from the last finished phase
of each shard.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from deltakd.cache.build.forward import (
    SHARDING,
    input_device,
    load_model,
    load_tokenizer,
    logit_chunks,
    output_rows,
    resolve_sharding,
    supervised_hidden,
)

# Plan and plan_shards stay importable from here (benchmarks/cache_build.py).
from deltakd.cache.build.plan import Plan, Sequence, plan_shards, scan, stage  # noqa: F401
from deltakd.cache.build.rows import lockstep_rows
from deltakd.cache.format import schema, store
from deltakd.cache.format.records import Fields, tokenizer_identity
from deltakd.cache.format.sources import DataSource
from deltakd.cache.format.support import pad_ragged, support_logprobs
from deltakd.runtime import dist
from deltakd.runtime.checkpoints import CheckpointError, checkpoint_identity
from deltakd.runtime.config import check_fields
from deltakd.runtime.lock import is_lock_file, locked
from deltakd.runtime.stop import Stopped, graceful_stop


@dataclass(frozen=True)
class CacheBuildConfig:
    teacher_ft: str = field(metadata={"help": "teacher after SFT (local Hugging Face checkpoint folder)"})
    teacher_base: str = field(metadata={"help": "the same teacher before SFT"})
    data: str = field(
        metadata={
            "help": "JSONL with prompt/response fields or chat messages; a Parquet or Arrow "
            "file or folder, a save_to_disk folder, or hf:org/name (extra [datasets])"
        }
    )
    out: str = field(metadata={"help": "cache folder to create or resume"})
    student_base: str | None = field(
        default=None, metadata={"help": "student before distillation (optional; see `cache add-student`)"}
    )
    support: str = field(
        default="union",
        metadata={
            "help": "union: top-k of every model and of the Delta-KD target per alpha (every objective faithful); "
            "topk: top-k of the finetuned teacher only (forward KL only; accepts add-student)",
            "choices": ("union", "topk"),
        },
    )
    top_k: int = field(
        default=16,
        metadata={"help": "ids taken from each distribution per supervised position (topk: 64 is the usual choice)"},
    )
    top_mass: float = field(
        default=0.0,
        metadata={
            "help": "in (0, 1): each distribution gives only the fewest of its --top-k ids whose probability "
            "reaches this mass, at least --min-k (more ids where it is flat, fewer where it is peaked; "
            "--top-k 32 --top-mass 0.9 --min-k 12 suits broad bases); 0: always --top-k"
        },
    )
    min_k: int = field(default=12, metadata={"help": "fewest ids per distribution with --top-mass"})
    alphas: str = field(
        default="0.5,1,1.5",
        metadata={
            "help": "comma-separated alpha grid of the exact Delta-KD target tails (training refuses other alphas)"
        },
    )
    floor: str = field(
        # -16: P1 as good as no floor on small clean vocabularies, and 5% of pi* on noise tokens of SmolLM2's
        # distributions instead of 37% without one (benchmarks/README.md, "The floor's cost").
        default="-16",
        metadata={
            "help": "log-prob floor f inside the teacher shift, delta = max(lT,f) - max(lB,f), or 'none' "
            "(-12 for P1 at alpha 1.5, or where the teacher pair's tails are noisy; none only on a small "
            "clean vocabulary)"
        },
    )
    tail_samples: int = field(
        default=16,
        metadata={
            "help": "ids drawn per position outside the top-k support by priority sampling (from the tail "
            "--tail-proposal names), so that the objectives learn the tail's shape where the distributions are "
            "flat; 0: none (needed with --mode sequential)"
        },
    )
    sample_min_tail: float = field(
        default=0.01,
        metadata={
            "help": "draw tail samples only where the proposal's mass outside the top-k support is at least this"
        },
    )
    tail_proposal: str = field(
        default="auto",
        metadata={
            "help": "where the tail samples come from: teacher (the finetuned teacher's tail; they carry forward "
            "KL to it: KD, P2), target (the Delta-KD target pi* at alpha 1, needs --student-base; they carry "
            "every forward KL and P3, each with its own importance weights) or mixture (half of each: bounded "
            "weights for KD and for P1/P3 alike; needs --student-base). auto: mixture for a --support union "
            "build with a --student-base in lockstep with 1 in --alphas, else teacher. A cache drawn with pi* "
            "refuses `cache add-student`",
            "choices": ("auto", *schema.TAIL_PROPOSALS),
        },
    )
    mode: str = field(
        default="lockstep",
        metadata={
            "help": "lockstep: all checkpoints resident, run together on each batch (needed for union and exact "
            "target tails); sequential: one model in memory at a time (topk only)",
            "choices": ("lockstep", "sequential"),
        },
    )
    max_length: int = field(
        default=1024, metadata={"help": "tokens per sequence; longer records are truncated and counted"}
    )
    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    chunk_rows: int = field(
        default=1024, metadata={"help": "supervised rows projected to the vocabulary at once (memory peak)"}
    )
    shard_tokens: int = field(default=65536, metadata={"help": "tokens per shard (unit of commit, resume and reading)"})
    dtype: str = field(default="float16", metadata={"help": "stored value dtype: float16, bfloat16 or float32"})
    model_dtype: str = field(
        default="float32", metadata={"help": "dtype the checkpoints run in (bfloat16 on accelerators)"}
    )
    device: str = field(default="cpu", metadata={"help": "cpu, cuda (cuda:LOCAL_RANK under torchrun) or cuda:N"})
    data_split: str | None = field(
        default=None, metadata={"help": "split of a dataset with several (default: its only split, else train)"}
    )
    data_config: str | None = field(default=None, metadata={"help": "configuration (subset) of a Hub dataset"})
    prompt_field: str = field(default="prompt", metadata={"help": "field of the prompt (text, or chat messages)"})
    response_field: str = field(
        default="response", metadata={"help": "field of the response (response, else completion)"}
    )
    messages_field: str = field(default="messages", metadata={"help": "field of the chat messages"})
    teacher_sharding: str = field(
        default="none",
        metadata={
            "help": "spread each teacher over GPUs: tp (tensor parallel over the torchrun ranks of one node), "
            "device_map (one process per node, layers over its GPUs), auto (tp where transformers has a plan), none",
            "choices": SHARDING,
        },
    )

    def __post_init__(self):
        check_fields(self)
        self._resolve_proposal()
        if self.top_k < 1:
            raise ValueError("--top-k must be at least 1")
        if self.max_length < 2:
            raise ValueError("--max-length must be at least 2")
        if min(self.batch_size, self.chunk_rows, self.shard_tokens) < 1:
            raise ValueError("--batch-size, --chunk-rows and --shard-tokens must be positive")
        schema.storage_dtype(self.dtype)
        if self.model_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--model-dtype {self.model_dtype!r}: use float32, bfloat16 or float16")
        if self.support not in schema.SUPPORTS:
            raise ValueError(f"--support {self.support!r}: choose one of {', '.join(schema.SUPPORTS)}")
        if self.mode not in ("lockstep", "sequential"):
            raise ValueError(f"--mode {self.mode!r}: choose lockstep or sequential")
        if self.mode == "sequential" and self.support == "union":
            raise ValueError(
                "--support union needs --mode lockstep: the top ids of the Delta-KD target and its exact "
                "tail need all checkpoints at the same position at once; use --support topk for a "
                "one-model-at-a-time build"
            )
        if not 0 <= self.top_mass < 1:
            raise ValueError(f"--top-mass {self.top_mass}: give a probability mass in (0, 1), or 0 for a fixed --top-k")
        if self.top_mass and not 1 <= self.min_k <= self.top_k:
            raise ValueError(f"--min-k {self.min_k}: give 1 to --top-k ({self.top_k})")
        if self.top_mass and self.mode != "lockstep":
            raise ValueError("--top-mass needs --mode lockstep; pass --top-mass 0 with --mode sequential")
        if not 0 <= self.tail_samples <= 255:
            raise ValueError(f"--tail-samples {self.tail_samples}: give 0 (none) to 255")
        if not 0 <= self.sample_min_tail < 1:
            raise ValueError(f"--sample-min-tail {self.sample_min_tail}: give a probability mass in [0, 1)")
        if self.tail_samples and self.mode != "lockstep":
            raise ValueError(
                "--tail-samples needs --mode lockstep (the samples are drawn while the support is chosen): "
                "pass --tail-samples 0 with --mode sequential"
            )
        _ = self.alpha_grid, self.floor_value  # validates both
        if self.tail_proposal not in schema.TAIL_PROPOSALS:
            raise ValueError(
                f"--tail-proposal {self.tail_proposal!r}: choose auto or one of {', '.join(schema.TAIL_PROPOSALS)}"
            )
        if self.tail_proposal != "teacher":
            needs = []
            if not self.tail_samples:
                needs.append("--tail-samples > 0")
            if not self.student_base:
                needs.append("--student-base (the target is built from it)")
            if self.mode != "lockstep":
                needs.append("--mode lockstep")
            if schema.PROPOSAL_ALPHA not in self.alpha_grid:
                needs.append(f"{schema.PROPOSAL_ALPHA:g} in --alphas")
            if needs:
                raise ValueError(
                    f"--tail-proposal {self.tail_proposal} needs {', '.join(needs)}; or use --tail-proposal teacher"
                )

    def _resolve_proposal(self) -> None:
        """--tail-proposal auto: the mixture where the build can draw from π* (a union build with a student
        base in lockstep, α 1 in the grid, samples); on a broad student base it brings P3 within 7-11 degrees
        of its full-vocabulary gradient along training (16-22 from πT's draws) and P1 within 2.6 (4); on a
        peaked one P3 within 2 (13) and P1 within 1 (2), with KD and JSD within 0.6 of where they were and
        reverse KL as close (benchmarks/README.md, "Draws from half πT's tail and half π*'s: the
        default"). Else πT's tail."""
        if self.tail_proposal != "auto":
            return
        can = (
            bool(self.student_base)
            and self.support == "union"
            and self.mode == "lockstep"
            and self.tail_samples > 0
            and schema.PROPOSAL_ALPHA in self.alpha_grid
        )
        object.__setattr__(self, "tail_proposal", "mixture" if can else "teacher")

    @property
    def alpha_grid(self) -> tuple[float, ...]:
        return schema.parse_alphas(self.alphas)

    @property
    def floor_value(self) -> float | None:
        return schema.parse_floor(self.floor)


def data_source(cfg: CacheBuildConfig) -> DataSource:
    return DataSource(
        cfg.data, cfg.data_split, cfg.data_config, Fields(cfg.prompt_field, cfg.response_field, cfg.messages_field)
    )


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
                "template): a cache needs one tokenizer shared by all checkpoints"
            )
    vocab = ids[ref_role]["vocab_size"]
    for role, p in paths.items():
        rows = output_rows(p)
        if rows < vocab:
            raise CheckpointError(
                f"{role} ({p}) has {rows} output rows but its tokenizer has {vocab} tokens: "
                "the model cannot score every token"
            )
    return toks[ref_role], ids[ref_role]


def build_identity(cfg: CacheBuildConfig, tok_id: dict, plan) -> dict:
    """What makes two builds produce the same cache; a resume must match it exactly."""
    roles = {"teacher_ft": cfg.teacher_ft, "teacher_base": cfg.teacher_base}
    ident = {
        "format": schema.FORMAT_NAME,
        "format_version": schema.FORMAT_VERSION,
        "support": cfg.support,
        "checkpoints": {r: checkpoint_identity(p) for r, p in roles.items()},
        "tokenizer": tok_id,
        "data": plan.data,
        "k": cfg.top_k,
        "value_dtype": cfg.dtype,
        "model_dtype": cfg.model_dtype,
        "mode": cfg.mode,
        "alphas": list(star_alphas(cfg)),
        "floor": cfg.floor_value,
        "max_length": cfg.max_length,
        "shard_tokens": cfg.shard_tokens,
        "n_shards": plan.n_shards,
        "n_truncated": plan.n_truncated,
    }
    if cfg.tail_samples:  # only then: the identity of a build without samples stays what it was
        ident["tail_samples"], ident["sample_min_tail"] = cfg.tail_samples, cfg.sample_min_tail
    if cfg.tail_proposal != "teacher":  # likewise: caches drawing from πT keep the identity they had
        ident["tail_proposal"] = cfg.tail_proposal
    if cfg.top_mass:  # likewise
        ident["top_mass"], ident["min_k"] = cfg.top_mass, cfg.min_k
    if cfg.student_base:
        ident["student_base"] = checkpoint_identity(cfg.student_base)
    return ident


def star_alphas(cfg: CacheBuildConfig) -> tuple[float, ...]:
    """The alphas whose exact target tails this build stores: only a lockstep build with a student base has them."""
    return cfg.alpha_grid if cfg.mode == "lockstep" and cfg.student_base else ()


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


# ---------------------------------------------------------------- running models
# A per-sequence result is a dict of numpy arrays: row arrays (one entry per
# supervised position: "len", "tail_<role>", "tail_star") and entry arrays (one per
# support id: "ids", "<role>" log-probs), roles being "ft", "base" and "s0".
ROW_KEYS = ("len", "tail_ft", "tail_base", "tail_s0", "tail_star", "sample_len", "sample_tau")
PHASES = ("ft", "base", "s0")


def _stage(root, name: str) -> Path:
    return store.local_stage(root) / name


def _save_stage(path: Path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def length_sorted_batches(seqs: list[Sequence], batch_size: int):
    """Batches of sequence indices, sorted by length so that padding stays small."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].tokens))
    for s in range(0, len(order), batch_size):
        yield order[s : s + batch_size]


def pad_batch(seqs: list[Sequence], batch: list[int], pad_id: int, device):
    L = max(len(seqs[i].tokens) for i in batch)
    inp = torch.full((len(batch), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), L), dtype=torch.long)
    msk = torch.zeros((len(batch), L), dtype=torch.long)
    for r, i in enumerate(batch):
        n = len(seqs[i].tokens)
        inp[r, :n] = torch.tensor(seqs[i].tokens)
        att[r, :n] = 1
        msk[r, :n] = torch.tensor(seqs[i].loss_mask)
    return inp.to(device), att.to(device), msk.to(device)


def _chunk_rows(models: dict, hidden: dict, vocab: int, cfg: CacheBuildConfig, ids_flat, lengths, seed: int = 0):
    """Results of one batch's supervised rows (flat torch tensors), chunk by chunk.

    `seed` fixes the tail samples of the batch (with the chunk's first row), so a
    resumed or multi-rank build draws exactly what one uninterrupted build draws."""
    roles = list(models)
    n = next(iter(hidden.values())).shape[0]
    parts = []
    row_start = torch.cumsum(lengths, 0) - lengths if lengths is not None else None
    for s in range(0, n, cfg.chunk_rows):
        sl = slice(s, min(n, s + cfg.chunk_rows))
        logits = {r: next(logit_chunks(models[r], hidden[r][sl], vocab, sl.stop - sl.start))[1] for r in roles}
        # Models spread over GPUs (--teacher-sharding) may end on different devices.
        logits = {r: z.to(logits[roles[0]].device) for r, z in logits.items()}
        if ids_flat is None and (len(roles) > 1 or cfg.support == "union"):
            gen = None
            if cfg.tail_samples:
                gen = torch.Generator(device=logits[roles[0]].device).manual_seed(seed * 1_000_003 + s)
            parts.append(
                lockstep_rows(
                    logits,
                    cfg.support,
                    cfg.top_k,
                    star_alphas(cfg),
                    cfg.floor_value,
                    cfg.tail_samples,
                    cfg.sample_min_tail,
                    gen,
                    cfg.top_mass,
                    cfg.min_k,
                    cfg.tail_proposal,
                    schema.PROPOSAL_ALPHA,
                )
            )
            continue
        if ids_flat is None:  # sequential "ft" phase: the top-k of πT, ids ascending
            z = logits["ft"]
            ids = z.topk(min(cfg.top_k, vocab), dim=1).indices.sort(dim=1).values
            valid = torch.ones_like(ids, dtype=torch.bool)
            ln = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long)
        else:  # a later phase: the ids the support already has
            ln = lengths[sl]
            idx, valid = pad_ragged(ln)
            ids = ids_flat[int(row_start[sl.start]) + idx].to(logits[roles[0]].device)
            valid = valid.to(ids.device)
        (r,) = roles
        vals, tail, _, _ = support_logprobs(logits[r], ids, valid)
        out = {r: vals[valid].cpu(), f"tail_{r}": tail.cpu()}
        if ids_flat is None:
            out |= {"ids": ids[valid].cpu(), "len": ln}
        parts.append(out)
    if not parts:
        return {}
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def run_batches(
    models: dict, seqs: list[Sequence], cfg: CacheBuildConfig, vocab: int, pad_id: int, bar, support_of_seq=None
) -> list[dict]:
    """The given models over one shard, together on each batch. Returns per-sequence result dicts.

    With `support_of_seq` (per sequence: (lengths, ids)), the models are scored on that
    support; otherwise the support is chosen here (top-k of πT, or the union).
    """
    out: list[dict | None] = [None] * len(seqs)
    device = input_device(next(iter(models.values())))  # a spread model takes its ids where its embedding is
    for batch in length_sorted_batches(seqs, cfg.batch_size):
        inp, att, msk = pad_batch(seqs, batch, pad_id, device)
        hidden = {r: supervised_hidden(m, inp, att, msk) for r, m in models.items()}
        counts = msk.sum(1).tolist()
        ids_flat = lengths = None
        if support_of_seq is not None:
            lengths = torch.from_numpy(np.concatenate([support_of_seq[i][0] for i in batch])).long()
            ids_flat = torch.from_numpy(np.concatenate([support_of_seq[i][1] for i in batch])).long()
        # The batch's first example id seeds its tail samples: batches are a function of the shard plan alone.
        res = _chunk_rows(models, hidden, vocab, cfg, ids_flat, lengths, seed=seqs[batch[0]].example_id)
        if support_of_seq is not None:
            res["len"] = lengths
        _check_finite(res, counts, batch, seqs, "+".join(models))
        row0 = ent0 = 0
        for r, i in enumerate(batch):
            n = counts[r]
            e = int(res["len"][row0 : row0 + n].sum())
            out[i] = {
                key: (v[row0 : row0 + n] if key in ROW_KEYS else v[ent0 : ent0 + e]).numpy()
                for key, v in res.items()
                if key != "len" or support_of_seq is None
            }
            row0, ent0 = row0 + n, ent0 + e
        bar.update(sum(len(seqs[i].tokens) for i in batch), len(batch))
    return out


def _check_finite(res: dict, counts: list[int], batch: list[int], seqs: list[Sequence], phase: str):
    """Stop on NaN/Inf log-probs and name the example (support log-probs are finite by construction)."""
    if not counts or sum(counts) == 0:
        return
    row_bad = torch.zeros(sum(counts), dtype=torch.bool)
    for key, v in res.items():
        if key in ("len", "ids", "sample_len", "sample_tau"):  # sample_tau is −inf where nothing was drawn
            continue
        if key in ROW_KEYS:  # a tail may be -inf (the support covers the vocabulary), never NaN/+inf
            b = torch.isnan(v) | (v == float("inf"))
            row_bad |= b.reshape(b.shape[0], -1).any(1)
        else:
            ent_bad = ~torch.isfinite(v)
            if ent_bad.any():
                row_of_entry = torch.repeat_interleave(torch.arange(len(res["len"])), res["len"])
                row_bad[row_of_entry[ent_bad]] = True
    if row_bad.any():
        row = int(row_bad.nonzero()[0, 0])
        seq_i = batch[int(np.searchsorted(np.cumsum(counts), row, side="right"))]
        raise FloatingPointError(
            f"{phase} checkpoint produced NaN/Inf log-probs for example {seqs[seq_i].example_id} "
            f"(line {seqs[seq_i].example_id + 1} of the data, counting non-blank lines); "
            "try --model-dtype float32 or check the checkpoint"
        )


def _pack(per_seq: list[dict], key: str) -> np.ndarray:
    parts = [d[key] for d in per_seq if key in d]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


class Progress:
    """tqdm bar over tokens with sequences/s and tokens/s."""

    def __init__(self, total_tokens: int, desc: str, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total_tokens, desc=desc, unit="tok", unit_scale=True, disable=not enabled, dynamic_ncols=True
        )
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


def teacher_arrays(seqs: list[Sequence], res: list[dict], vocab: int, value_dtype: str) -> dict[str, np.ndarray]:
    enc = lambda x: schema.encode_values(x, value_dtype)  # noqa: E731
    return {
        "tokens": np.concatenate([np.asarray(s.tokens) for s in seqs]).astype(schema.id_dtype(vocab)),
        "loss_mask": np.concatenate([np.asarray(s.loss_mask) for s in seqs]).astype(np.uint8),
        "seq_offsets": np.concatenate([[0], np.cumsum([len(s.tokens) for s in seqs])]).astype(np.int64),
        "example_ids": np.asarray([s.example_id for s in seqs], dtype=np.int64),
        "support_len": _pack(res, "len").astype(np.uint16),
        "support_ids": _pack(res, "ids").astype(schema.id_dtype(vocab)),
        "logp_ft": enc(_pack(res, "ft")),
        "logp_base": enc(_pack(res, "base")),
        "tail_ft": enc(_pack(res, "tail_ft")),
        "tail_base": enc(_pack(res, "tail_base")),
    } | (
        {"sample_len": _pack(res, "sample_len").astype(np.uint8), "sample_tau": enc(_pack(res, "sample_tau"))}
        if res and "sample_len" in res[0]
        else {}
    )


def student_arrays(res: list[dict], value_dtype: str) -> dict[str, np.ndarray]:
    out = {
        "logp_s0": schema.encode_values(_pack(res, "s0"), value_dtype),
        "tail_s0": schema.encode_values(_pack(res, "tail_s0"), value_dtype),
    }
    if res and "tail_star" in res[0]:
        out["tail_star"] = schema.encode_values(np.concatenate([d["tail_star"] for d in res]), value_dtype)
    return out


def _load_models(phases: dict[str, str], cfg: CacheBuildConfig, sharding: str = "none") -> dict:
    """The phases' checkpoints; the teachers spread over GPUs when `sharding` says so (the student base never is)."""
    dev = dist.resolve_device(cfg.device)
    return {
        r: load_model(p, dev, cfg.model_dtype, sharding if r in ("ft", "base") else "none") for r, p in phases.items()
    }


def _free(models: dict):
    models.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_phases(
    root: Path,
    names: list[str],
    shards: dict[str, list[Sequence]],
    phases: dict[str, str],
    cfg: CacheBuildConfig,
    vocab: int,
    pad_id: int,
    rank: int,
    sharding: str = "none",
    writer: bool = True,
) -> dict:
    """Sequential mode: each phase's checkpoint over every shard that lacks that phase's stage file.

    Under tensor parallelism all ranks run the same shards and only the `writer` saves.
    """
    timings = {}
    for phase, path in phases.items():
        dist.barrier()  # the previous phase's stage files are on disk for every rank
        todo = [n for n in names if not (_stage(root, n) / f"{phase}.npz").exists()]
        if not todo:
            continue
        models = _load_models({phase: path}, cfg, sharding)
        total = sum(len(s.tokens) for n in todo for s in shards[n])
        bar = Progress(total, f"[rank {rank}] {phase}", enabled=rank == 0)
        for n in todo:
            sup = None if phase == "ft" else _load_support(root, n)
            res = run_batches(models, shards[n], cfg, vocab, pad_id, bar, sup)
            if writer:
                _save_stage(_stage(root, n) / f"{phase}.npz", **_flatten(res))
        timings[phase] = {"seconds": bar.close(), "tokens": total}
        _free(models)
    return timings


def _flatten(res: list[dict]) -> dict[str, np.ndarray]:
    arrays = {f"{key}_{i}": v for i, d in enumerate(res) for key, v in d.items()}
    return {"n": np.int64(len(res)), **arrays}


def load_stage(root: Path, name: str, phase: str) -> list[dict]:
    z = np.load(_stage(root, name) / f"{phase}.npz")
    n = int(z["n"])
    keys = {f.rsplit("_", 1)[0] for f in z.files if f != "n"}
    return [{key: z[f"{key}_{i}"] for key in keys} for i in range(n)]


def _load_support(root: Path, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(lengths, ids) per sequence: from this build's stage, else from the committed shard."""
    if (_stage(root, name) / "ft.npz").exists():
        return [(d["len"], d["ids"]) for d in load_stage(root, name, "ft")]
    return support_from_committed(root, name)


def support_from_committed(root: Path, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(lengths, ids) per sequence of a committed shard, version 1 (k ids a row) or 2."""
    g = root / schema.TEACHER_DIR / name
    meta = json.loads((g / schema.SHARD_META).read_text()) if (g / schema.SHARD_META).exists() else {}
    names = ["loss_mask", "seq_offsets"]
    try:
        a = schema.read_group(g, names + ["support_len", "support_ids"])
        lengths, ids = a["support_len"].astype(np.int64), a["support_ids"]
    except schema.CacheFormatError:
        if "support_len" in json.dumps(meta):
            raise
        a = schema.read_group(g, names + ["topk_ids"])
        lengths = np.full(a["topk_ids"].shape[0], a["topk_ids"].shape[1], dtype=np.int64)
        ids = a["topk_ids"].reshape(-1)
    rows = schema.sup_offsets(a["loss_mask"], a["seq_offsets"])
    ent = np.concatenate([[0], np.cumsum(lengths)])
    return [(lengths[rows[i] : rows[i + 1]], ids[ent[rows[i]] : ent[rows[i + 1]]]) for i in range(len(rows) - 1)]


def run_lockstep(
    root: Path,
    names: list[str],
    shards: dict[str, list[Sequence]],
    phases: dict[str, str],
    cfg: CacheBuildConfig,
    vocab: int,
    pad_id: int,
    rank: int,
    student_ident,
    sharding: str = "none",
    writer: bool = True,
) -> dict:
    """Lockstep mode: every checkpoint resident, all of them on each batch; each shard commits when done."""
    if not names:
        return {}
    models = _load_models(phases, cfg, sharding)
    total = sum(len(s.tokens) for n in names for s in shards[n])
    bar = Progress(total, f"[rank {rank}] {'+'.join(phases)}", enabled=rank == 0)
    for n in names:
        res = run_batches(models, shards[n], cfg, vocab, pad_id, bar)
        if writer:
            commit_shard(root, n, shards[n], res, cfg, vocab, student_ident)
    timing = {"+".join(phases): {"seconds": bar.close(), "tokens": total}}
    _free(models)
    return timing


def commit_shard(root: Path, name: str, seqs, res: list[dict], cfg: CacheBuildConfig, vocab: int, student_ident):
    """Write the shard's zarr groups aside and rename them into place; then drop its stage."""
    tdir = root / schema.TEACHER_DIR / name
    if not schema.is_committed(tdir):
        part = schema.partial_dir(tdir)
        store.rmtree(part)
        arrays = teacher_arrays(seqs, res, vocab, cfg.dtype)
        schema.write_group(part, arrays)
        meta = schema.ShardInfo(
            name,
            len(seqs),
            int(arrays["tokens"].shape[0]),
            int(arrays["support_len"].shape[0]),
            schema.group_checksums(part),
            int(arrays["support_ids"].shape[0]),
        ).to_json()
        schema.commit_group(part, tdir, meta)
    if student_ident is not None:
        commit_student_shard(root, name, res, cfg.dtype, student_ident)
    store.rmtree(_stage(root, name))


def commit_student_shard(root: Path, name: str, res: list[dict], value_dtype: str, student_ident: dict):
    sdir = root / schema.STUDENT_DIR / name
    schema.uncommit_group(sdir)  # in place (object store): readers stop trusting the old group first
    part = schema.partial_dir(sdir)
    store.rmtree(part)
    arrays = student_arrays(res, value_dtype)
    schema.write_group(part, arrays)
    meta = {
        "name": name,
        "n_supervised": int(arrays["tail_s0"].shape[0]),
        "checksums": schema.group_checksums(part),
        "student_base": student_ident,
    }
    schema.commit_group(part, sdir, meta)


def _same_checkpoint(a: dict | None, b: dict | None) -> bool:
    return bool(a and b) and {k: v for k, v in a.items() if k != "path"} == {k: v for k, v in b.items() if k != "path"}


def _reconcile_student(root: Path, want: dict | None) -> None:
    """A re-run after `cache add-student` put another student's arrays here: with --student-base,
    those arrays are dropped (the manifest first says "no student") and this build's are made."""
    if not want:
        return  # without --student-base, write_manifest keeps what add-student added
    mpath = root / schema.MANIFEST
    if mpath.exists():
        m = json.loads(mpath.read_text())
        if m.get("student") and not _same_checkpoint(m["student"]["checkpoint"], want):
            m["student"] = None
            schema.write_json_atomic(mpath, m)
    for meta in sorted((root / schema.STUDENT_DIR).glob(f"*/{schema.SHARD_META}")):
        if not _same_checkpoint(json.loads(meta.read_text()).get("student_base"), want):
            store.rmtree(meta.parent)


def _kept_student(root: Path, shards: list[dict]) -> dict | None:
    """The student entry of the previous manifest (from add-student), when all its shards are still there."""
    mpath = root / schema.MANIFEST
    old = json.loads(mpath.read_text()).get("student") if mpath.exists() else None
    if (
        old
        and [s["name"] for s in old["shards"]] == [s["name"] for s in shards]
        and all(schema.is_committed(root / schema.STUDENT_DIR / s["name"]) for s in old["shards"])
    ):
        return old
    return None


def write_manifest(root: Path, ident: dict, build_cfg: dict, summary: dict) -> dict:
    shards = []
    for i in range(ident["n_shards"]):
        meta = root / schema.TEACHER_DIR / schema.shard_name(i) / schema.SHARD_META
        shards.append(json.loads(meta.read_text()))
    student = _kept_student(root, shards)
    if ident.get("student_base"):
        sh = [json.loads((root / schema.STUDENT_DIR / s["name"] / schema.SHARD_META).read_text()) for s in shards]
        student = {
            "checkpoint": ident["student_base"],
            "alphas": ident["alphas"],
            "shards": [{k: v for k, v in m.items() if k != "student_base"} for m in sh],
        }
    vocab = ident["tokenizer"]["vocab_size"]
    manifest = {
        "format": schema.FORMAT_NAME,
        "format_version": schema.FORMAT_VERSION,
        "support": ident["support"],
        # alphas: the grid asked for (FORMAT.md); the tail_star columns are student.alphas.
        "k": min(ident["k"], vocab),
        "vocab_size": vocab,
        "alphas": list(schema.parse_alphas(build_cfg["alphas"])),
        "floor": ident["floor"],
        "mode": ident["mode"],
        "value_dtype": ident["value_dtype"],
        "id_dtype": str(schema.id_dtype(vocab)),
        "covers_vocabulary": schema.covers_vocabulary(ident["support"], ident["k"], vocab),
        "tail_samples": ident.get("tail_samples", 0),
        "sample_min_tail": ident.get("sample_min_tail"),
        **({"tail_proposal": ident["tail_proposal"]} if "tail_proposal" in ident else {}),
        **({"top_mass": ident["top_mass"], "min_k": ident["min_k"]} if "top_mass" in ident else {}),
        "checkpoints": ident["checkpoints"],
        "tokenizer": ident["tokenizer"],
        "data": ident["data"],
        "build": build_cfg,
        "summary": summary,
        "shards": shards,
        "student": student,
        "totals": {key: sum(s[key] for s in shards) for key in ("n_seqs", "n_tokens", "n_supervised", "n_entries")},
    }
    schema.write_json_atomic(root / schema.MANIFEST, manifest)
    return manifest


def stops_cleanly(what: str, root_of):
    """Decorator for a cache writer `fn(cfg)`: a signal abandons the shard in progress and says what is kept."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(cfg, *a, **kw):
            with graceful_stop(what, at="once"):
                try:
                    return fn(cfg, *a, **kw)
                except Stopped as e:
                    root = root_of(cfg)
                    schema.clean_partials(root)  # what the interrupted shard left aside
                    kept = sum(1 for p in (root / schema.TEACHER_DIR).glob("shard-*") if schema.is_committed(p))
                    raise Stopped(
                        f"{e}: the shard in progress was abandoned, the {kept} committed shard(s) of "
                        f"{root} are kept; run the same command to resume",
                        e.signum,
                    ) from None

        return inner

    return wrap


@locked(lambda cfg: cfg.out, "cache build")
@stops_cleanly("cache build", lambda cfg: store.cache_root(cfg.out))
def build_cache(cfg: CacheBuildConfig) -> dict:
    rank, world = dist.init(cfg.device)
    root = store.cache_root(cfg.out)
    roles = {"teacher_ft": cfg.teacher_ft, "teacher_base": cfg.teacher_base}
    if cfg.student_base:
        roles["student_base"] = cfg.student_base
    tok, tok_id = check_checkpoints(roles)
    schema.check_row_width(
        cfg.support,
        cfg.top_k,
        2 + bool(cfg.student_base) + len(star_alphas(cfg)),
        cfg.tail_samples,
        tok_id["vocab_size"],
    )
    sharding = resolve_sharding(cfg.teacher_sharding, cfg.device, [cfg.teacher_ft, cfg.teacher_base])
    # Data-parallel layout: under tp the whole (one-node) job is one teacher replica.
    dp_rank, dp_world, writer = (0, 1, rank == 0) if sharding == "tp" else (rank, world, True)
    source = data_source(cfg)
    plan = scan(source, tok, cfg.max_length, cfg.shard_tokens, progress=rank == 0)  # streamed: one shard in memory
    ident = build_identity(cfg, tok_id, plan)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        bfile = root / schema.BUILD_FILE
        if bfile.exists():
            diff = _same_identity(json.loads(bfile.read_text()), ident)
            if diff:
                raise ValueError(
                    f"{root} holds a cache built from other inputs or settings (differs in: {', '.join(diff)}); "
                    "use another --out folder or delete this one"
                )
        elif not store.is_empty_or_missing(root) and any(not is_lock_file(p) for p in root.iterdir()):
            raise ValueError(f"{root} is not empty and holds no deltakd build: choose an empty or new --out folder")
        schema.clean_partials(root)
        _reconcile_student(root, ident.get("student_base"))
        schema.write_json_atomic(bfile, ident)
    dist.barrier(world)
    if world > 1 and rank != 0:
        diff = _same_identity(json.loads((root / schema.BUILD_FILE).read_text()), ident)
        if diff:
            raise ValueError(f"rank {rank} sees different inputs than rank 0: {diff}")

    names_all = [schema.shard_name(i) for i in range(plan.n_shards)]
    mine = [n for i, n in enumerate(names_all) if i % dp_world == dp_rank]
    student_ident = ident.get("student_base")
    pending = [
        n
        for n in mine
        if not schema.is_committed(root / schema.TEACHER_DIR / n)
        or (student_ident and not schema.is_committed(root / schema.STUDENT_DIR / n))
    ]
    # The token ids of the pending shards, read from the data again into stage files (name -> sequences).
    todo = {i: _stage(root, n) for i, n in enumerate(names_all) if n in pending}
    shards = stage(source, plan, todo, tok, cfg.max_length)
    (root / schema.TEACHER_DIR).mkdir(exist_ok=True)
    (root / schema.STUDENT_DIR).mkdir(exist_ok=True)
    phases = {"ft": cfg.teacher_ft, "base": cfg.teacher_base}
    if student_ident:
        phases["s0"] = cfg.student_base
    vocab, pad_id = tok_id["vocab_size"], tok.pad_token_id or 0
    if cfg.mode == "lockstep":
        timings = run_lockstep(root, pending, shards, phases, cfg, vocab, pad_id, rank, student_ident, sharding, writer)
    else:
        teacher_pending = [n for n in pending if not schema.is_committed(root / schema.TEACHER_DIR / n)]
        timings = run_phases(
            root,
            teacher_pending,
            shards,
            {p: phases[p] for p in ("ft", "base")},
            cfg,
            vocab,
            pad_id,
            rank,
            sharding,
            writer,
        )
        if "s0" in phases:
            timings.update(
                run_phases(root, pending, shards, {"s0": phases["s0"]}, cfg, vocab, pad_id, rank, sharding, writer)
            )
        for n in pending if writer else []:
            staged = [load_stage(root, n, p) for p in phases if (_stage(root, n) / f"{p}.npz").exists()]
            res = [dict(kv for d in per_phase for kv in d.items()) for per_phase in zip(*staged)] if staged else []
            commit_shard(root, n, shards[n], res, cfg, vocab, student_ident)
    dist.barrier(world)
    summary = {
        "n_records": plan.n_records,
        "n_truncated": plan.n_truncated,
        "world_size": world,
        "phases": timings if world == 1 else None,
        "shards_built_this_run": len(pending) if world == 1 else None,
    }
    manifest = None
    if rank == 0:
        store.rmtree(store.local_stage(root))
        manifest = write_manifest(root, ident, dataclasses.asdict(cfg), summary)
    dist.barrier(world)
    return manifest or {}
