"""Distillation losses as pure functions of log-prob tensors on a shared support.

Every distribution at a supervised position is a row of log-probs over the same
outcomes: the cached support ids (padded rows carry −inf, which every function
treats as "no outcome") and, with `tail="bucket"`, one last column for "every
other token" (log of the mass outside the support; −inf when there is none). With
`tail="renorm"` the tail column is dropped and each row renormalised over the ids.

Notation (cache/format/FORMAT.md, "Distributions"): lT teacher after SFT, lB teacher before SFT, lS0 student base,
lθ student; Δ = lT − lB. Every function returns `(sum over valid rows, number of
valid rows)`; the training loop divides once by the tokens of the whole step.
Everything is computed in float32 (or float64 when given float64).
"""

from __future__ import annotations

import torch

DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl")
NEG_INF = float("-inf")


def upcast(x: torch.Tensor) -> torch.Tensor:
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
    mixed = torch.logaddexp(
        torch.where(both, zero, a_log) + w_t.log(), torch.where(both, zero, b_log) + torch.log1p(-w_t)
    )
    return torch.where(both, torch.full((), float("-inf"), dtype=a_log.dtype), mixed)


def divergence(
    target_log: torch.Tensor, student_log: torch.Tensor, kind: str = "fkl", beta: float = 0.5, skew: float = 0.1
) -> torch.Tensor:
    """D(target ‖ student) per row. (N, m), (N, m) -> (N,).

    fkl       KL(t ‖ s)                                   forward KL, mode covering
    rkl       KL(s ‖ t)                                   reverse KL, mode seeking
    jsd       β·KL(t ‖ m) + (1−β)·KL(s ‖ m), m = β·t + (1−β)·s   generalised JSD (GKD)
    skew_fkl  KL(t ‖ λ·t + (1−λ)·s)                      DistiLLM skew KL, λ = `skew`
    skew_rkl  KL(s ‖ λ·s + (1−λ)·t)                      DistiLLM skew reverse KL
    """
    assert target_log.shape == student_log.shape, (target_log.shape, student_log.shape)
    t, s = upcast(target_log), upcast(student_log)
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
    A temperature τ ≠ 1 re-tempers the row as if its entries were logits. With the
    tail bucket that is exact only when the support is the whole vocabulary (the tail
    is a sum of many probabilities, and (Σp)^(1/τ) ≠ Σp^(1/τ)); the trainer refuses it
    otherwise (objective.LossSpec / trainer).
    """
    x = upcast(logp_k)
    if mode == "bucket":
        x = torch.cat([x, upcast(tail)[:, None]], dim=-1)
    elif mode != "renorm":
        raise ValueError(f"unknown tail mode {mode!r}; choose bucket or renorm")
    if temperature != 1.0 or mode == "renorm":
        x = torch.log_softmax(x / temperature, dim=-1)
    return x


def tail_cells(target: torch.Tensor, sampled: torch.Tensor, log_c: torch.Tensor):
    """A target row whose tail is carried by the sampled ids: (N, K+1) -> ((N, K+1), (N,)), bucket last.

    In rows with sampled ids (sampled (N, K)), the target's exact mass on those ids plus
    its bucket is respread over the sampled ids in proportion to c·target, where
    c = max(ρ, τ)/ρ is the priority-sampling weight of the proposal ρ the ids were drawn
    from (πT, or π* with --tail-proposal target; log_c (N, K)); the bucket becomes
    empty. These weights w make Σ_drawn w(y)·g(y) the self-normalised priority-sampling
    estimate of Σ_{y∉S} p(y)·g(y) (cache/build/forward.py, sample_tail), so forward KL pulls the
    student's tail toward the teacher's tail tokens instead of leaving its shape free.
    The second result, Σ_drawn w·(log p − log w) per row, turns the divergence of the
    reweighted row into the estimate of the true one: KL(p ‖ q) ≈ KL(row ‖ q) + it (the
    row alone would compare a cell's mass with one token's probability). Rows without
    samples come back unchanged, with 0. Targets carry no gradient.

    A target is respread over draws from its own tail, or from one that covers it: πT over
    πT's draws (KD, P2), and every target over π*'s draws (P1, P3 too), where the weights
    c·target stay bounded and the estimate's mean is the full-vocabulary gradient. π* keeps
    its tail where πS0 does, where πT's draws rarely land: respread over those it would keep a
    gradient of sampling noise at πθ = π* (with πT's draws P1 and P3 read them as plain entries).
    """
    with torch.no_grad():
        t = upcast(target)
        vals, bucket = t[:, :-1], t[:, -1]
        has = sampled.any(1)
        ninf = torch.full((), NEG_INF, dtype=t.dtype)
        zero = torch.zeros((), dtype=t.dtype)
        cell = torch.cat([torch.where(sampled, vals, ninf), bucket[:, None]], dim=1).logsumexp(1)
        w = torch.where(sampled, vals + log_c.to(t.dtype), ninf)
        norm = torch.where(has, w.logsumexp(1), zero)
        w = w - norm[:, None] + torch.where(has, cell, zero)[:, None]
        w_safe = torch.where(sampled, w, zero)
        corr = torch.where(sampled, w_safe.exp() * (torch.where(sampled, vals, zero) - w_safe), zero).sum(1)
        row = torch.cat([torch.where(sampled, w, vals), torch.where(has, ninf, bucket)[:, None]], dim=1)
        return row, corr


def masked_sum(per_row: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if mask is None:
        return per_row.sum(), torch.tensor(per_row.shape[0])
    m = mask.bool()
    # where(), not multiplication: a NaN/inf in a masked-out row must not leak in.
    return torch.where(m, per_row, torch.zeros((), dtype=per_row.dtype)).sum(), m.sum()


def sft_loss(student_logp_next: torch.Tensor, mask=None):
    """Cross-entropy −log pθ(y_{t+1}) of the reference next token. (N,) -> sum, count."""
    return masked_sum(-upcast(student_logp_next), mask)


def kd_loss(student_log, teacher_log, mask=None, kind="fkl", beta=0.5, skew=0.1, cells=None):
    """Plain KD: D(πT ‖ πθ). Rows: (N, m) on the shared support. `cells` = (sampled, log_c): the tail
    carried by the ids drawn from πT's tail (tail_cells); forward KL only."""
    return _forward_with_cells(teacher_log, student_log, kind, beta, skew, cells, mask)


def teacher_shift(ft_log: torch.Tensor, base_log: torch.Tensor, floor: float | None = None) -> torch.Tensor:
    """Δ = lT − lB, or max(lT, f) − max(lB, f) with a floor f; 0 where both are −inf (padding, empty tails)."""
    ft_log, base_log = upcast(ft_log), upcast(base_log)
    if floor is None:
        return log_ratio(ft_log, base_log)
    return ft_log.clamp_min(floor) - base_log.clamp_min(floor)


def target_shift(
    s0_log: torch.Tensor,
    ft_log: torch.Tensor,
    base_log: torch.Tensor,
    alpha: float,
    floor: float | None = None,
    tail_star: torch.Tensor | None = None,
) -> torch.Tensor:
    """The shift α·Δ that the target π* applies to πS0, per outcome: (N, m) -> (N, m).

    On the ids it is α·teacher_shift(lT, lB, floor). With the tail bucket and the cache's
    exact `tail_star` (N,) it is, in the bucket, tail_star − lS0_tail: the log of the
    πS0-weighted mean of exp(α·Δ) over the tail, so that every outcome, the bucket
    included, satisfies log π* = lS0 + shift − log Z. The product formula
    α·(max(T_T, f) − max(T_B, f)) (used without `tail_star`) applies Δ to summed masses
    and is not that.
    """
    shift = alpha * teacher_shift(ft_log, base_log, floor)
    if tail_star is None:
        return shift
    tail = log_ratio(upcast(tail_star), upcast(s0_log)[:, -1])  # 0 where both tails are empty
    return torch.cat([shift[:, :-1], tail[:, None]], dim=-1)


def delta_target(
    s0_log: torch.Tensor,
    ft_log: torch.Tensor,
    base_log: torch.Tensor,
    alpha: float,
    floor: float | None = None,
    tail_star: torch.Tensor | None = None,
) -> torch.Tensor:
    """log π* = log_softmax(lS0 + α·Δ) on the support: π* ∝ πS0·(πT/πB)^α, Δ = teacher_shift(lT, lB, floor).

    α = 0 gives πS0; with πS0 = πB, α = 1 and no floor it gives πT exactly. The tail
    column (last, with the tail bucket) is lS0_tail + α·Δ_tail, the product formula
    T_S0·(T_T/T_B)^α, unless the cache gives `tail_star` (N,): the exact unnormalised
    log Σ_{y∉S} πS0(y)·exp(α·Δ(y)), which then replaces it (target_shift).
    """
    logits = upcast(s0_log) + alpha * teacher_shift(ft_log, base_log, floor)
    if tail_star is not None:
        logits = torch.cat([logits[:, :-1], upcast(tail_star)[:, None]], dim=-1)
    return torch.log_softmax(logits, dim=-1)


def delta_p1_loss(
    student_log,
    s0_log,
    ft_log,
    base_log,
    alpha=1.0,
    mask=None,
    kind="fkl",
    beta=0.5,
    skew=0.1,
    floor=None,
    tail_star=None,
    cells=None,
):
    """P1 shift-target: D(π* ‖ πθ), π* = delta_target(...).

    `cells` = (sampled, log c) from ids drawn from π*'s own tail (a cache built with
    --tail-proposal target): π*'s tail is respread over them as in tail_cells, forward KL only.
    Without them (ids drawn from πT's tail) the drawn ids are plain entries (exact values;
    `tail_star` is π*'s exact mass outside all stored ids): their weights follow πT, and π*'s
    tail lies elsewhere (where πS0 keeps its mass), so respreading π* over them would move the
    gradient away from the full-vocabulary one."""
    target = delta_target(s0_log, ft_log, base_log, alpha, floor, tail_star)
    return _forward_with_cells(target, student_log, kind, beta, skew, cells, mask)


def _forward_with_cells(target, student_log, kind, beta, skew, cells, mask):
    if cells is None:
        return masked_sum(divergence(target, student_log, kind, beta, skew), mask)
    assert kind == "fkl", "tail samples serve forward KL (the other divergences read them as plain entries)"
    row, corr = tail_cells(target, *cells)
    return masked_sum(divergence(row, student_log, kind) + corr, mask)


def delta_p2_loss(student_log, s0_log, ft_log, base_log, mask=None, kind="fkl", beta=0.5, skew=0.1, cells=None):
    """P2 other diagonal: D(πT ‖ norm(πB·πθ/πS0)): the student's shift applied to the teacher base.

    No floor: P2 holds no ratio of the two teachers (its optimum is πθ ∝ πS0·πT/πB, unfloored).
    The tail bucket of norm(πB·πθ/πS0) is the product T_B·T_θ/T_S0 (exact only on the full
    vocabulary). `cells`: as in kd_loss (the target is πT)."""
    q = torch.log_softmax(upcast(base_log) + log_ratio(upcast(student_log), upcast(s0_log)), dim=-1)
    return _forward_with_cells(ft_log, q, kind, beta, skew, cells, mask)


def delta_p3_loss(student_log, s0_log, ft_log, base_log, alpha=1.0, mask=None, floor=None, tail_star=None, cells=None):
    """P3 shift-matching: Σ_y w(y)·(e(y) − ē)², e = Δθ − α·Δ, Δθ = lθ − lS0, w = π* (no gradient),
    ē = Σ_y w(y)·e(y). Centring removes the per-position normalisation constant.

    The tail bucket's α·Δ is target_shift's: with `tail_star` the one implied by the exact
    π* tail, so the weight and the shift of the bucket describe the same target and P3 is
    0, with a zero gradient, at πθ = π*, as on the full vocabulary. Ids drawn from πT's tail
    are plain entries, as in P1. With `cells` (ids drawn from π*'s tail) the weights w are
    π*'s row from tail_cells: its tail mass respread over the drawn ids, each with its exact e,
    so the tail's spread of e counts (the bucket alone holds one e for the whole tail). Still 0
    at πθ = π*: e is then the same constant on every id, whatever the weights."""
    target = delta_target(s0_log, ft_log, base_log, alpha, floor, tail_star)
    if cells is not None:
        target, _ = tail_cells(target, *cells)
    w = target.detach().exp()
    e = log_ratio(upcast(student_log), upcast(s0_log)) - target_shift(s0_log, ft_log, base_log, alpha, floor, tail_star)
    zero = torch.zeros((), dtype=e.dtype)
    e = torch.where(w > 0, e, zero)
    centred = e - (w * e).sum(-1, keepdim=True)
    return masked_sum(torch.where(w > 0, w * centred.square(), zero).sum(-1), mask)
