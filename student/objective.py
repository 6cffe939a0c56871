"""The training objective from the student's final hidden states, in chunks of rows.

The student's (rows x vocab) logits exist for one chunk at a time: each chunk's
gradient is formed during the forward pass (see _FusedHeadLoss), so the backward
neither keeps nor recomputes logits. Peak extra memory is a few chunk_rows x vocab
floats plus one head-sized gradient buffer, independent of batch size and length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from deltakd.cache.format.support import masked_tail, support_logprobs
from deltakd.student import losses as L

TERMS = ("sft", "kd", "p1", "p2", "p3")
NEEDS_S0 = ("p1", "p2", "p3")


@dataclass(frozen=True)
class TailProposal:
    """The distribution a cache's tail samples were drawn from (its tail_proposal "target" or "mixture"),
    which the trainer forms again from the stored values for their importance weights."""

    kind: str  # "target": π* at alpha; "mixture": ½·πT/T_T + ½·π*/T_* on the tail (cache/build/rows.py)
    alpha: float
    floor: float | None  # the cache's floor inside Δ
    star_col: int  # the cache's tail_star column at alpha (π*'s mass outside the stored ids)


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
    floor: float | None = None  # log-prob floor inside Δ (losses.teacher_shift); part of P1's and P3's definition
    star_col: int | None = None  # column of the cache's tail_star for `alpha` (exact π* tail), if it has one
    # How the cache's tail samples were drawn when π* had a part in it; None: from πT's tail alone
    proposal: TailProposal | None = None

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
        if self.divergence == "jsd" and not 0 < self.jsd_beta < 1:
            # JSD(β) is identically zero at β = 0 and β = 1: training would silently do nothing.
            raise ValueError(
                f"--jsd-beta {self.jsd_beta}: JSD needs 0 < beta < 1 (at 0 and 1 it is identically "
                "zero); for forward or reverse KL use --divergence fkl or rkl"
            )

    @property
    def active(self) -> tuple[str, ...]:
        """Terms with a non-zero weight, in TERMS order (the order of the returned sums)."""
        return tuple(t for t in TERMS if self.weights.get(t, 0) != 0)

    @property
    def needs_student_base(self) -> bool:
        return any(t in NEEDS_S0 for t in self.active)


def terms_from_support(s_vals, s_tail, lp_next, tg: dict, spec: LossSpec) -> torch.Tensor:
    """Sums of the active terms, (n_active,), from the student's only vocabulary-wide quantities:
    log-probs at the support ids (c, K; −inf on padding) and tail log-mass (c,) at the
    temperature, and the log-prob of the reference next token (c,) at temperature 1 (for SFT)."""
    tau = spec.temperature
    scale = tau * tau  # Hinton: keep gradient magnitudes comparable across temperatures
    student = L.support(s_vals, s_tail, spec.tail) if set(spec.active) - {"sft"} else None
    ft = L.support(tg["logp_ft"], tg["tail_ft"], spec.tail, tau)
    base = L.support(tg["logp_base"], tg["tail_base"], spec.tail, tau)
    s0 = L.support(tg["logp_s0"], tg["tail_s0"], spec.tail, tau) if spec.needs_student_base else None
    star = None
    if spec.star_col is not None and spec.tail == "bucket" and "tail_star" in tg:
        star = tg["tail_star"][:, spec.star_col]
    kw = dict(kind=spec.divergence, beta=spec.jsd_beta, skew=spec.skew)
    # Drawn ids carry a target's tail (losses.tail_cells, each target with its own importance
    # weights) where that target's weighted sum is the loss: forward KL (KD, P2: πT; P1: π*) and
    # P3 (π*). Draws in which π* had a part ("target", "mixture") serve every target. Ids drawn from
    # πT's tail alone (tail_proposal "teacher") serve πT only: reweighting π*'s
    # tail from draws that rarely land where π* keeps it is noise, so there P1 and P3 read them as
    # plain entries. Reverse KL, JSD and the skew KLs weigh by the student and always read them so.
    cells = tail_cells_of(tg, spec) if spec.divergence == "fkl" or spec.proposal is not None else None
    fwd = cells if spec.divergence == "fkl" else None
    star_cells = cells if spec.proposal is not None else None
    out = []
    for t in spec.active:
        if t == "sft":
            out.append(L.sft_loss(lp_next)[0])
        elif t == "kd":
            out.append(scale * L.kd_loss(student, ft, cells=fwd, **kw)[0])
        elif t == "p1":
            out.append(
                scale
                * L.delta_p1_loss(
                    student,
                    s0,
                    ft,
                    base,
                    spec.alpha,
                    floor=spec.floor,
                    tail_star=star,
                    cells=star_cells if fwd is not None else None,
                    **kw,
                )[0]
            )
        elif t == "p2":
            out.append(scale * L.delta_p2_loss(student, s0, ft, base, cells=fwd, **kw)[0])
        elif t == "p3":
            p3 = L.delta_p3_loss(student, s0, ft, base, spec.alpha, floor=spec.floor, tail_star=star, cells=star_cells)
            out.append(p3[0])
    return torch.stack(out)


def tail_cells_of(tg: dict, spec: LossSpec):
    """(sampled (c, K), log c (c, K)) when the cache drew tail samples for these rows, else None.

    c = max(ρ, τ)/ρ is each sampled id's priority-sampling weight (cache/build/rows.py, sample_tail),
    ρ the proposal in the units the build drew with: πT's log-probs, π*'s unnormalised
    lS0 + α·Δ, or their mixture ½·πT/T_T + ½·π*/T_* (spec.proposal), formed again here from the
    stored values. A component's mass T outside the top ids is its stored tail (outside every
    stored id) plus its values at the drawn ids.
    """
    if "sampled" not in tg or spec.tail != "bucket":
        return None
    sampled = tg["sampled"]
    p = spec.proposal
    log_rho = L.upcast(tg["logp_ft"])
    if p is not None:
        log_star = L.upcast(tg["logp_s0"]) + p.alpha * L.teacher_shift(tg["logp_ft"], tg["logp_base"], p.floor)
        if p.kind == "target":
            log_rho = log_star
        else:
            neg = torch.full((), float("-inf"), dtype=log_rho.dtype)
            parts = []
            for x, tail in ((log_rho, tg["tail_ft"]), (log_star, tg["tail_star"][:, p.star_col])):
                pre = torch.logaddexp(L.upcast(tail), torch.where(sampled, x, neg).logsumexp(1))[:, None]
                parts.append(x - torch.where(pre == neg, float("inf"), pre))  # T = 0: no part in the row
            log_rho = torch.logaddexp(*parts) - math.log(2.0)
    # log c = max(log ρ, log τ) − log ρ; off the drawn entries (padding: −inf or NaN) it is unused, set to 0.
    log_c = (L.upcast(tg["sample_tau"])[:, None] - log_rho).clamp_min(0)
    return sampled, torch.where(sampled, log_c, torch.zeros((), dtype=log_rho.dtype))


def _valid(tg: dict) -> torch.Tensor:
    v = tg.get("valid")
    return torch.ones_like(tg["support_ids"], dtype=torch.bool) if v is None else v


def terms_from_logits(logits: torch.Tensor, tg: dict, spec: LossSpec) -> torch.Tensor:
    """Sums of the active terms over the rows of one chunk, shape (n_active,); plain autograd.

    logits (c, V) float32; tg holds (c, K) support ids/valid/log-probs, (c,) tails and next tokens.
    """
    ids, nxt = tg["support_ids"], tg["next_tokens"][:, None]
    lp_t = torch.log_softmax(logits / spec.temperature, dim=-1)
    lp_1 = lp_t if spec.temperature == 1.0 else torch.log_softmax(logits, dim=-1)
    s_vals = lp_t.gather(1, ids).masked_fill(~_valid(tg), float("-inf"))
    return terms_from_support(s_vals, masked_tail(lp_t, ids), lp_1.gather(1, nxt)[:, 0], tg, spec)


def _fused_chunk(z: torch.Tensor, tg: dict, spec: LossSpec, weights: torch.Tensor):
    """Terms (n_active,) and d(Σ weights·terms)/dz (c, V) for temperature 1, consuming z.

    With p = softmax(z), T the tail mass outside the support S, and a, a_y, b the
    gradients of the loss w.r.t. the support log-probs, the next-token log-prob and
    the tail log-mass (cheap: autograd on (c, K) tensors):
        dL/dz_j = a_j·[j∈S] + a_y·[j=y] − p_j·A + (b/T)·p_j·[j∉S],  A = Σa + a_y + b.
    This needs one exp pass over (c, V) and no (c, V) tensor besides z itself.
    """
    ids, nxt, valid = tg["support_ids"], tg["next_tokens"][:, None], _valid(tg)
    z_y = z.gather(1, nxt)[:, 0]
    s_vals, tail, log_z, parts = support_logprobs(z, ids, valid)  # z now holds the tail exps only
    with torch.enable_grad():
        leaves = [s_vals.requires_grad_(True), tail.requires_grad_(True), (z_y - log_z).requires_grad_(True)]
        terms = terms_from_support(*leaves, tg, spec)
        grads = torch.autograd.grad((terms * weights).sum(), leaves, allow_unused=True)
    a, b, a_y = (torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads))
    zero = torch.zeros((), dtype=b.dtype)
    a = torch.where(valid, a, zero)
    live = parts.tail_sum > 0  # an empty tail (support = vocabulary) has no gradient to pass on
    b = torch.where(live, b, zero)
    Z = parts.Z
    A = a.sum(1) + a_y + b
    coef = (-A + torch.where(live, b * Z / torch.where(live, parts.tail_sum, 1.0), zero)) / Z
    g = parts.e_tail.mul_(coef[:, None])  # zero on the support (see support_logprobs)
    # scatter_add: padded entries repeat a real id and add exactly zero.
    g.scatter_add_(1, ids, torch.where(valid, a - (parts.e_s / Z[:, None]) * A[:, None], zero))
    g.scatter_add_(1, nxt, a_y[:, None])
    return terms.detach(), g


def terms_and_logit_grad(logits: torch.Tensor, tg: dict, spec: LossSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums of the active terms (n_active,), d(Σ_t weight_t·term_t)/d logits (c, V)) for one chunk of rows,
    by the trainer's own fused computation at temperature 1 (what a training step does with these rows),
    without a model: for measuring the cached objective against a reference (benchmarks/fidelity.py).
    The logits are not modified."""
    if spec.temperature != 1.0:
        raise ValueError("the fused chunk runs at temperature 1")
    weights = torch.tensor([float(spec.weights[t]) for t in spec.active], dtype=L.upcast(logits).dtype)
    return _fused_chunk(L.upcast(logits).clone(), tg, spec, weights)


class _FusedHeadLoss(torch.autograd.Function):
    """Output projection + loss, chunk by chunk, with the gradient formed in the forward.

    Each chunk's logits (c, V) live only while that chunk is processed: autograd
    differentiates the chunk's loss w.r.t. its logits at once, and the result is
    folded into the gradients of the hidden states and the head. The backward pass
    only scales them, so nothing is recomputed and no (N, V) tensor ever exists.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, weights, vocab, spec, keys, *tg_values):
        n, rows = hidden.shape[0], spec.chunk_rows
        grad_h = torch.zeros_like(hidden)
        # A frozen head (LoRA students) gets no gradient: no (V, H) buffer, one matmul per chunk fewer.
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        sums = hidden.new_zeros(len(spec.active), dtype=L.upcast(hidden).dtype)
        w_v = weight[:vocab]  # (V, H): output rows beyond the tokenizer get no gradient
        b_v = bias[:vocab] if bias is not None else None
        for s in range(0, n, rows):
            h = hidden[s : s + rows]
            tg = {k: v[s : s + rows] for k, v in zip(keys, tg_values)}
            logits = L.upcast(torch.nn.functional.linear(h, w_v, b_v))  # (c, V), float32 or float64
            if spec.temperature == 1.0:
                terms, g = _fused_chunk(logits, tg, spec, weights)
            else:  # two softmaxes (τ and 1): plain autograd on the chunk
                with torch.enable_grad():
                    logits.requires_grad_(True)
                    terms = terms_from_logits(logits, tg, spec)
                    (g,) = torch.autograd.grad((terms * weights).sum(), logits)
            sums += terms.detach()
            g = g.to(weight.dtype)
            grad_h[s : s + rows] = g @ w_v
            if grad_w is not None:
                grad_w[:vocab] += g.T @ h
            if grad_b is not None:
                grad_b[:vocab] += g.sum(0)
            del logits, g  # free the chunk's (c, V) tensors before the next one
        ctx.save_for_backward(grad_h, grad_w, *(() if grad_b is None else (grad_b,)))
        ctx.has_bias, ctx.n_targets = grad_b is not None, len(tg_values)
        ctx.mark_non_differentiable(sums)
        return (sums * weights).sum(), sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        grad_h, grad_w, *rest = ctx.saved_tensors
        grad_b = grad_total * rest[0] if ctx.has_bias else None
        # No gradients for: weights, vocab, spec, keys, and each target tensor.
        grad_w = grad_total * grad_w if grad_w is not None else None
        return (grad_total * grad_h, grad_w, grad_b) + (None,) * (4 + ctx.n_targets)


def chunked_loss(hidden: torch.Tensor, head: torch.nn.Module, targets: dict, spec: LossSpec, vocab: int):
    """(Σ_t weight_t · sum_t, the per-term sums (n_active,)) over all rows; hidden: (N, H).

    The first output carries the gradient; the per-term sums are for logging.
    """
    n = hidden.shape[0]
    for k, v in targets.items():
        assert v.shape[0] == n, f"target {k} has {v.shape[0]} rows, hidden has {n}"
    keys = sorted(targets)
    weights = torch.tensor(
        [float(spec.weights[t]) for t in spec.active], device=hidden.device, dtype=L.upcast(hidden).dtype
    )
    if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
        return _FusedHeadLoss.apply(
            hidden, head.weight, head.bias, weights, vocab, spec, keys, *[targets[k] for k in keys]
        )
    sums = hidden.new_zeros(len(spec.active), dtype=torch.float32)
    for s in range(0, n, spec.chunk_rows):
        logits = head(hidden[s : s + spec.chunk_rows]).float()[:, :vocab]
        sums += terms_from_logits(logits, {k: v[s : s + spec.chunk_rows] for k, v in targets.items()}, spec)
    return (sums * weights).sum(), sums


@torch.no_grad()
def student_base_targets(model, input_ids, attention_mask, loss_mask, support_ids, valid, vocab: int, chunk_rows: int):
    """lS0 on the cached support (−inf on padding) and its tail, from a frozen student-base copy (on the fly)."""
    h = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[loss_mask]
    head = model.get_output_embeddings()
    vals, tails = [], []
    for s in range(0, h.shape[0], chunk_rows):
        ids, ok = support_ids[s : s + chunk_rows], valid[s : s + chunk_rows]
        v, t, _, _ = support_logprobs(head(h[s : s + chunk_rows]).float()[:, :vocab], ids, ok)
        vals.append(v)
        tails.append(t)
    k = support_ids.shape[1]
    return (torch.cat(vals) if vals else h.new_zeros(0, k)), (torch.cat(tails) if tails else h.new_zeros(0))
