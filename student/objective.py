"""The training objective from the student's final hidden states, in chunks of rows.

The student's (rows x vocab) logits exist for one chunk at a time: each chunk's
loss runs under activation checkpointing, so the backward pass recomputes that
chunk's logits instead of keeping them. Peak extra memory is chunk_rows x vocab
floats, independent of batch size and sequence length.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from . import losses as L

TERMS = ("sft", "kd", "p1", "p2", "p3")
NEEDS_S0 = ("p1", "p2", "p3")


@dataclass(frozen=True)
class LossSpec:
    """Which terms, with which weights and settings (see student/losses.py for formulas)."""

    weights: dict = field(default_factory=lambda: {"p1": 1.0})
    divergence: str = "fkl"
    alpha: float = 1.0
    temperature: float = 1.0
    tail: str = "bucket"
    jsd_beta: float = 0.5
    skew: float = 0.1
    chunk_rows: int = 1024

    def __post_init__(self):
        bad = set(self.weights) - set(TERMS)
        if bad:
            raise ValueError(f"unknown loss term(s) {sorted(bad)}; terms are {TERMS}")
        if not any(w != 0 for w in self.weights.values()):
            raise ValueError("every loss weight is zero: give at least one term a weight")
        if self.divergence not in L.DIVERGENCES:
            raise ValueError(f"divergence {self.divergence!r}: choose one of {L.DIVERGENCES}")
        if self.tail not in ("bucket", "renorm"):
            raise ValueError(f"tail {self.tail!r}: choose bucket or renorm")
        if self.temperature <= 0 or self.chunk_rows < 1:
            raise ValueError("temperature and chunk_rows must be positive")

    @property
    def active(self) -> tuple[str, ...]:
        """Terms with a non-zero weight, in TERMS order (the order of the returned sums)."""
        return tuple(t for t in TERMS if self.weights.get(t, 0) != 0)

    @property
    def needs_student_base(self) -> bool:
        return any(t in NEEDS_S0 for t in self.active)


def student_support(logits: torch.Tensor, ids: torch.Tensor, mode: str, temperature: float):
    """Student log-probs on the cached support (c, k[+1]) from full logits (c, V)."""
    lp = torch.log_softmax(logits / temperature, dim=-1)
    return L.support(lp.gather(1, ids), L.tail_logmass(lp, ids), mode)


def terms_from_logits(logits: torch.Tensor, tg: dict, spec: LossSpec) -> torch.Tensor:
    """Sums of the active terms over the rows of one chunk, shape (n_active,).

    logits (c, V) float32; tg holds (c, k) ids/log-probs, (c,) tails and next tokens.
    """
    ids, tau = tg["topk_ids"], spec.temperature
    scale = tau * tau  # Hinton: keep gradient magnitudes comparable across temperatures
    out = []
    student = student_support(logits, ids, spec.tail, tau) if set(spec.active) - {"sft"} else None
    ft = L.support(tg["logp_ft"], tg["tail_ft"], spec.tail, tau)
    base = L.support(tg["logp_ft"] - tg["delta"], tg["tail_base"], spec.tail, tau)
    s0 = L.support(tg["logp_s0"], tg["tail_s0"], spec.tail, tau) if spec.needs_student_base else None
    kw = dict(kind=spec.divergence, beta=spec.jsd_beta, skew=spec.skew)
    for t in spec.active:
        if t == "sft":
            lp_next = torch.log_softmax(logits, dim=-1).gather(1, tg["next_tokens"][:, None])[:, 0]
            out.append(L.sft_loss(lp_next)[0])
        elif t == "kd":
            out.append(scale * L.kd_loss(student, ft, **kw)[0])
        elif t == "p1":
            out.append(scale * L.delta_p1_loss(student, s0, ft, base, spec.alpha, **kw)[0])
        elif t == "p2":
            out.append(scale * L.delta_p2_loss(student, s0, ft, base, **kw)[0])
        elif t == "p3":
            out.append(L.delta_p3_loss(student, s0, ft, base, spec.alpha)[0])
    return torch.stack(out)


def _chunk(h, weight, bias, vocab, spec, *tg_values, keys):
    logits = torch.nn.functional.linear(h, weight, bias).float()[:, :vocab]  # (c, V)
    return terms_from_logits(logits, dict(zip(keys, tg_values)), spec)


def chunked_terms(hidden: torch.Tensor, head: torch.nn.Module, targets: dict, spec: LossSpec, vocab: int,
                  use_checkpoint: bool = True) -> torch.Tensor:
    """Sums of the active terms over all rows, (n_active,). hidden: (N, H) supervised rows."""
    n = hidden.shape[0]
    for k, v in targets.items():
        assert v.shape[0] == n, f"target {k} has {v.shape[0]} rows, hidden has {n}"
    keys = sorted(targets)
    total = hidden.new_zeros(len(spec.active), dtype=torch.float32)
    for s in range(0, n, spec.chunk_rows):
        args = (hidden[s:s + spec.chunk_rows], head.weight, head.bias, vocab, spec,
                *[targets[k][s:s + spec.chunk_rows] for k in keys])
        if use_checkpoint and torch.is_grad_enabled():
            total = total + checkpoint(_chunk, *args, keys=keys, use_reentrant=False)
        else:
            total = total + _chunk(*args, keys=keys)
    return total


@torch.no_grad()
def student_base_targets(model, input_ids, attention_mask, loss_mask, topk_ids, vocab: int, chunk_rows: int):
    """lS0 on the cached support and its tail, from a frozen student-base copy (on the fly)."""
    h = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[loss_mask]
    head = model.get_output_embeddings()
    vals, tails = [], []
    for s in range(0, h.shape[0], chunk_rows):
        lp = torch.log_softmax(head(h[s:s + chunk_rows]).float()[:, :vocab], dim=-1)
        ids = topk_ids[s:s + chunk_rows]
        vals.append(lp.gather(1, ids))
        tails.append(L.tail_logmass(lp, ids))
    k = topk_ids.shape[1]
    return (torch.cat(vals) if vals else h.new_zeros(0, k)), (torch.cat(tails) if tails else h.new_zeros(0))
