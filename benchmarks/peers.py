"""The peers a user would pick instead of deltakd, run on deltakd's own batches (optional dependencies).

    pip install -e ".[peers]"                           # trl 1.16.0, liger-kernel 0.8.5
    python -m benchmarks.train_step --only peers        # the table; benchmarks/train_step.py runs these cases

Each peer's own loss function is imported and called, never re-implemented:
  trl    DistillationTrainer (trl 1.16) computes its loss in `_compute_loss`: the backbone hidden states of
         student and teacher (`_get_last_hidden_state`), then
         `trl.trainer.distillation_trainer._chunked_divergence_loss` with both lm_head weights. It projects
         tiles of 4096 rows x 32768 vocabulary columns for both models, twice (the backward recomputes them);
         beta 0 is forward KL(teacher || student), the objective of deltakd's `--loss kd`. On the CPU it runs
         its torch tiles (Triton only on cuda/xpu).
  liger  liger_kernel.chunked_loss.LigerFusedLinearJSDLoss (liger-kernel 0.8.5) with beta 0 (forward KL),
         weight_hard_loss 0, weight_soft_loss 1, chunk_size 1024 and compiled=False: its torch path (torch.compile
         of the chunk step is a separate, warm-up-heavy choice that we do not time). Importing
         `liger_kernel.chunked_loss` does not import Triton, so it runs on a CPU-only machine.
Both are given the supervised rows only (N_sup, H): what TRL's Triton path selects on a GPU (its CPU path
would project every position handed to it, prompts and padding included), and what Liger's ignore_index
would mask. Every contender holds the student, an AdamW state, and (online) teacher_ft, and takes the same
step: zero grads, forward(s), loss / N_sup, backward, clip to norm 1, AdamW step.

`build_contender` makes one contender's step. Time and memory are measured apart (train_step.py runs both):
`run_interleaved_timing` holds all five in one process and interleaves their steps batch by batch, so that the
load of other processes on a shared machine falls on every contender alike; `run_peer_case` runs one contender
alone in its own process for its peak RSS (a per-process high-water mark that cannot be reset).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks.synth_vocab import batches, rss_mb, setup

INSTALL = 'pip install -e ".[peers]"   (trl==1.16.0, liger-kernel==0.8.5; see pyproject.toml)'
PINNED = {"trl": "1.16.0", "liger-kernel": "0.8.5"}
# deltakd rows (kd_cache, p1_cache: from the cache; kd_online: teacher_ft in memory, deltakd's fused loss on
# full-vocabulary targets) and the peers' rows (teacher_ft in memory, their loss kernels).
CASES = ("kd_cache", "p1_cache", "kd_online", "trl_online", "liger_online")
# Peer beta (TRL and Liger share the convention: m = beta*p_teacher + (1-beta)*p_student) for deltakd's divergences.
BETA = {"fkl": 0.0, "rkl": 1.0}


def require() -> dict:
    """Import both peers (so every contender's process pays the same import cost) or say how to install them."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import liger_kernel.chunked_loss  # noqa: F401
        import trl.trainer.distillation_trainer  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the peer comparison needs trl and liger-kernel ({e}); install them with {INSTALL}") from e
    try:
        return {name: version(name) for name in PINNED}
    except PackageNotFoundError as e:
        raise ImportError(f"{e.name} is importable but not installed as a package; install with {INSTALL}") from e


# ---------------------------------------------------------------- the three loss kernels, one call each
def trl_loss(h_s, w_s, h_t, w_t, beta: float = 0.0) -> torch.Tensor:
    """TRL DistillationTrainer's loss on (N, H_s), (V, H_s), (N, H_t), (V, H_t): mean divergence over the N rows."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    mask = torch.ones(1, h_s.shape[0], dtype=torch.long, device=h_s.device)  # (B=1, K=N): every row supervised
    loss, _entropy, _n = _chunked_divergence_loss(h_s[None], h_t[None], w_s, w_t, mask, beta)
    return loss


def liger_loss(h_s, w_s, h_t, w_t, labels, beta: float = 0.0, chunk_size: int = 1024) -> torch.Tensor:
    """Liger's chunked fused-linear JSD (torch path, compiled=False), soft loss only: mean over the N rows."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    fn = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=False, chunk_size=chunk_size
    )
    return fn(h_s, w_s, h_t, w_t, labels)


def deltakd_loss(h_s, head, h_t, w_t, next_tokens, divergence: str = "fkl", chunk_rows: int = 1024) -> torch.Tensor:
    """deltakd's fused head+loss (student/objective.chunked_loss) on full-vocabulary teacher targets: mean over N.

    The targets are made the way benchmarks/online_ref.py makes them (teacher log-probs over the whole
    vocabulary, chunk_rows rows at a time, no tail), so this is `--loss kd` with k = V.
    """
    from benchmarks.online_ref import full_vocab_targets
    from deltakd.student.objective import LossSpec, chunked_loss

    V = w_t.shape[0]
    with torch.no_grad():
        lT = torch.cat(
            [
                torch.log_softmax(torch.nn.functional.linear(h_t[s : s + chunk_rows], w_t).float(), -1)
                for s in range(0, h_t.shape[0], chunk_rows)
            ]
        )
    spec = LossSpec(weights={"kd": 1.0}, divergence=divergence, chunk_rows=chunk_rows)
    total, _ = chunked_loss(h_s, head, full_vocab_targets({"ft": lT}, next_tokens, V), spec, V)
    return total / h_s.shape[0]


# ---------------------------------------------------------------- one contender's step
class OnlinePeerStep:
    """Student + AdamW + teacher_ft in memory; step(batch) = teacher forward, student forward, peer loss, update.

    Mirrors deltakd's Trainer.train_step (zero grads kept allocated, loss normalised by the step's supervised
    tokens, clip to norm 1, AdamW with the trainer's learning-rate schedule `lr_for(step)`) so that only the
    loss path differs, and the online rows' losses stay comparable after the first update too.
    """

    def __init__(self, kind: str, student: str, teacher: str, lr_for, clip: float = 1.0):
        from transformers import AutoModelForCausalLM

        assert kind in ("trl", "liger"), kind
        self.kind, self.clip, self.lr_for, self.n_steps = kind, clip, lr_for, 0
        torch.manual_seed(0)
        self.student = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).train()
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
        self.teacher.requires_grad_(False)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr_for(0), weight_decay=0.0)

    def loss(self, b) -> torch.Tensor:
        h_s = self.student.get_decoder()(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
        with torch.no_grad():
            h_t = self.teacher.get_decoder()(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
        h_s, h_t = h_s[b.loss_mask], h_t[b.loss_mask]  # (N_sup, H_s), (N_sup, H_t)
        w_s = self.student.get_output_embeddings().weight
        w_t = self.teacher.get_output_embeddings().weight
        if self.kind == "trl":
            return trl_loss(h_s, w_s, h_t, w_t, beta=0.0)
        return liger_loss(h_s, w_s, h_t, w_t, b.targets["next_tokens"], beta=0.0)

    def step(self, b) -> float:
        self.opt.zero_grad(set_to_none=False)
        loss = self.loss(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        for g in self.opt.param_groups:
            g["lr"] = self.lr_for(self.n_steps)
        self.opt.step()
        self.n_steps += 1
        return float(loss.detach())


def rss_now_mb() -> float:
    """Current resident set (MB), from /proc (Linux): the baseline after imports and batches."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_contender(case: str, paths: dict, cache: Path, work: Path, steps: int, batch_tokens: int):
    """step(batch) -> that step's loss per supervised token, for one of CASES."""
    from deltakd.student.trainer import TrainConfig, Trainer, lr_at

    assert case in CASES, f"unknown case {case!r}; cases are {CASES}"
    cfg = TrainConfig(
        cache=str(cache),
        student=paths["student_base"],
        out=str(work / f"peers-{case}"),
        loss="p1" if case == "p1_cache" else "kd",
        max_steps=steps,
        batch_tokens=batch_tokens,
        eval_percent=0,
    )
    if case in ("trl_online", "liger_online"):
        return OnlinePeerStep(
            case.split("_")[0], paths["student_base"], paths["teacher_ft"], lr_for=lambda i: lr_at(i, cfg, steps)
        ).step
    if case == "kd_online":
        from benchmarks.online_ref import OnlineTrainer

        tr = OnlineTrainer(cfg, paths["teacher_ft"], paths["teacher_base"], paths["student_base"], floor=-12.0)
        assert tuple(tr.frozen) == ("ft",), f"online KD should hold teacher_ft alone, holds {tuple(tr.frozen)}"
    else:
        tr = Trainer(cfg)

    def step(b):
        r = tr.train_step([b])
        return float(r["term_sums"][0]) / r["n"]

    return step


def _prepare(work: Path, steps: int, batch_tokens: int):
    versions = require()  # every process imports the same libraries before anything is measured
    torch.manual_seed(0)
    paths, cache = setup(work)
    return versions, paths, cache, batches(cache, steps, batch_tokens)


def run_peer_case(case: str, work: Path, steps: int, batch_tokens: int) -> dict:
    """Peak memory of one contender, alone in this process: imports and batches first, then the baseline RSS."""
    versions, paths, cache, data = _prepare(work, steps, batch_tokens)
    base = rss_now_mb()
    step = build_contender(case, paths, cache, work, steps, batch_tokens)
    after_load = rss_now_mb()
    times, losses = [], []
    for b in data:
        t0 = time.perf_counter()
        losses.append(step(b))
        times.append(time.perf_counter() - t0)
    peak = rss_mb()
    return {
        "case": case,
        "alone_step_s": statistics.median(times[1:] or times),
        "peak_rss_mb": peak,
        "rss_after_imports_mb": base,
        "working_mb": peak - base,
        "models_mb": after_load - base,
        "memory_steps": len(data),
        "versions": versions,
    }


def run_interleaved_timing(work: Path, steps: int, batch_tokens: int) -> dict:
    """Step times of every contender in one process, their steps interleaved batch by batch (in a rotating
    order): on a shared machine, load from other processes then falls on all contenders alike."""
    _, paths, cache, data = _prepare(work, steps, batch_tokens)
    contenders = {c: build_contender(c, paths, cache, work, steps, batch_tokens) for c in CASES}
    times = {c: [] for c in CASES}
    losses = {c: [] for c in CASES}
    for i, b in enumerate(data):
        for c in CASES[i % len(CASES) :] + CASES[: i % len(CASES)]:
            t0 = time.perf_counter()
            losses[c].append(contenders[c](b))
            times[c].append(time.perf_counter() - t0)
    tokens = sum(b.n_tokens for b in data)
    out = {}
    for c in CASES:
        warm = times[c][2:] if len(times[c]) > 4 else times[c]
        out[c] = {
            "step_s": statistics.median(warm),
            "step_best_s": min(warm),
            "tokens_per_s": tokens / sum(times[c]),
            "first_loss": losses[c][0],
            "last_loss": losses[c][-1],
            "steps": len(data),
            "supervised_first_batch": data[0].n_supervised,
        }
    return out
