"""Distillation losses as pure functions of log-prob tensors on a shared support.

Every distribution at a supervised position is a row of log-probs over the same
outcomes: the k cached ids and, with `tail="bucket"`, one last column for "every
other token" (log of the mass outside the top-k; -inf when there is none). With
`tail="renorm"` the tail column is dropped and each row renormalised over the k ids.

Notation (DESIGN.md): lT teacher after SFT, lB teacher before SFT, lS0 student base,
lθ student; Δ = lT − lB. Every function returns `(sum over valid rows, number of
valid rows)`; the training loop divides once by the tokens of the whole step.
Everything is computed in float32 (or float64 when given float64).
"""
from __future__ import annotations

import torch

DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl")
NEG_INF = float("-inf")


def _f(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def log_ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a − b, with (−inf) − (−inf) = 0: two empty tails have a ratio of one."""
    both = torch.isneginf(a) & torch.isneginf(b)
    return torch.where(both, torch.zeros((), dtype=a.dtype), a - torch.where(both, torch.zeros((), dtype=b.dtype), b))


def xlogy_ratio(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Elementwise p · (log p − log q) with 0 where p = 0 (so −inf entries of p are harmless)."""
    # Both branches of where() are differentiated: the unused one must stay finite too,
    # or 0 * inf turns into a NaN gradient.
    zero = torch.zeros((), dtype=p_log.dtype)
    live = p_log > float("-inf")
    p_safe = torch.where(live, p_log, zero)
    return torch.where(live, p_safe.exp() * (p_safe - torch.where(live, q_log, zero)), zero)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, (N, m) -> (N,)."""
    return xlogy_ratio(p_log, q_log).sum(-1)


def _mix(a_log, b_log, w: float):
    """log(w·a + (1−w)·b), stable."""
    w_t = torch.tensor(w, dtype=a_log.dtype)
    if w <= 0:
        return b_log
    if w >= 1:
        return a_log
    both = torch.isneginf(a_log) & torch.isneginf(b_log)
    zero = torch.zeros((), dtype=a_log.dtype)
    # logaddexp(-inf, -inf) has a NaN gradient: route empty entries through zeros.
    mixed = torch.logaddexp(torch.where(both, zero, a_log) + w_t.log(), torch.where(both, zero, b_log) + torch.log1p(-w_t))
    return torch.where(both, torch.full((), float("-inf"), dtype=a_log.dtype), mixed)


def divergence(target_log: torch.Tensor, student_log: torch.Tensor, kind: str = "fkl",
               beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """D(target ‖ student) per row. (N, m), (N, m) -> (N,).

    fkl       KL(t ‖ s)                                   forward KL, mode covering
    rkl       KL(s ‖ t)                                   reverse KL, mode seeking
    jsd       β·KL(t ‖ m) + (1−β)·KL(s ‖ m), m = β·t + (1−β)·s   generalised JSD (GKD)
    skew_fkl  KL(t ‖ λ·t + (1−λ)·s)                      DistiLLM skew KL, λ = `skew`
    skew_rkl  KL(s ‖ λ·s + (1−λ)·t)                      DistiLLM skew reverse KL
    """
    assert target_log.shape == student_log.shape, (target_log.shape, student_log.shape)
    t, s = _f(target_log), _f(student_log)
    if kind == "fkl":
        return kl(t, s)
    if kind == "rkl":
        return kl(s, t)
    if kind == "jsd":
        m = _mix(t, s, beta)
        return beta * kl(t, m) + (1 - beta) * kl(s, m)
    if kind == "skew_fkl":
        return kl(t, _mix(t, s, skew))
    if kind == "skew_rkl":
        return kl(s, _mix(s, t, skew))
    raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCES}")


def support(logp_k: torch.Tensor, tail: torch.Tensor, mode: str = "bucket", temperature: float = 1.0) -> torch.Tensor:
    """One distribution on the cached support: (N, k) log-probs + (N,) tail -> (N, k+1) or (N, k).

    bucket: [logp_k, tail], already normalised; renorm: log_softmax over the k ids.
    A temperature τ ≠ 1 re-tempers the row as if its entries were logits; with the
    tail bucket this treats the tail as one outcome (exact only when k = V).
    """
    x = _f(logp_k)
    if mode == "bucket":
        x = torch.cat([x, _f(tail)[:, None]], dim=-1)
    elif mode != "renorm":
        raise ValueError(f"unknown tail mode {mode!r}; choose bucket or renorm")
    if temperature != 1.0 or mode == "renorm":
        x = torch.log_softmax(x / temperature, dim=-1)
    return x


def tail_logmass(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ_{y ∉ ids} p(y) per row, (N, V), (N, k) -> (N,); −inf when ids cover the vocabulary.

    The ids of a row are distinct, so the tail is empty exactly when k = V; that case
    returns a constant, because logsumexp over only −inf entries has a NaN gradient.
    """
    if ids.shape[1] >= logp.shape[1]:
        return torch.full(logp.shape[:1], float("-inf"), dtype=logp.dtype, device=logp.device)
    return logp.scatter(1, ids, float("-inf")).logsumexp(1)


def masked_sum(per_row: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if mask is None:
        return per_row.sum(), torch.tensor(per_row.shape[0])
    m = mask.bool()
    # where(), not multiplication: a NaN/inf in a masked-out row must not leak in.
    return torch.where(m, per_row, torch.zeros((), dtype=per_row.dtype)).sum(), m.sum()


def sft_loss(student_logp_next: torch.Tensor, mask=None):
    """Cross-entropy −log pθ(y_{t+1}) of the reference next token. (N,) -> sum, count."""
    return masked_sum(-_f(student_logp_next), mask)


def kd_loss(student_log, teacher_log, mask=None, kind="fkl", beta=0.5, skew=0.1):
    """Plain KD: D(πT ‖ πθ). Rows: (N, m) on the shared support."""
    return masked_sum(divergence(teacher_log, student_log, kind, beta, skew), mask)


def delta_target(s0_log: torch.Tensor, ft_log: torch.Tensor, base_log: torch.Tensor, alpha: float) -> torch.Tensor:
    """log π* = log_softmax(lS0 + α·Δ) with Δ = lT − lB on the support: π* ∝ πS0·(πT/πB)^α.

    α = 0 gives πS0; with πS0 = πB and α = 1 it gives πT exactly. Empty tails
    (−inf in both teachers) have Δ = 0, so the tail weight is T_S0·(T_T/T_B)^α.
    """
    logits = _f(s0_log) + alpha * log_ratio(_f(ft_log), _f(base_log))
    return torch.log_softmax(logits, dim=-1)


def delta_p1_loss(student_log, s0_log, ft_log, base_log, alpha=1.0, mask=None, kind="fkl", beta=0.5, skew=0.1):
    """P1 shift-target: D(π* ‖ πθ), π* = delta_target(...)."""
    return masked_sum(divergence(delta_target(s0_log, ft_log, base_log, alpha), student_log, kind, beta, skew), mask)


def delta_p2_loss(student_log, s0_log, ft_log, base_log, mask=None, kind="fkl", beta=0.5, skew=0.1):
    """P2 other diagonal: D(πT ‖ norm(πB·πθ/πS0)): the student's shift applied to the teacher base."""
    q = torch.log_softmax(_f(base_log) + log_ratio(_f(student_log), _f(s0_log)), dim=-1)
    return masked_sum(divergence(ft_log, q, kind, beta, skew), mask)


def delta_p3_loss(student_log, s0_log, ft_log, base_log, alpha=1.0, mask=None):
    """P3 shift-matching: Σ_y w(y)·(e(y) − ē)², e = Δθ − α·Δ, Δθ = lθ − lS0, w = π* (no gradient),
    ē = Σ_y w(y)·e(y). Centring removes the per-position normalisation constant."""
    w = delta_target(s0_log, ft_log, base_log, alpha).detach().exp()
    e = log_ratio(_f(student_log), _f(s0_log)) - alpha * log_ratio(_f(ft_log), _f(base_log))
    zero = torch.zeros((), dtype=e.dtype)
    e = torch.where(w > 0, e, zero)
    centred = e - (w * e).sum(-1, keepdim=True)
    return masked_sum(torch.where(w > 0, w * centred.square(), zero).sum(-1), mask)
