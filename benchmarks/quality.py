"""ROUGE-L of students trained from one cache with SFT, KD and Delta-KD variants, over seeds.

    python benchmarks/quality.py [--steps 800] [--seeds 0 1 2] [--workdir runs/quality] [--variants sft lam0.5_kd ...]

Beside the pure objectives it runs the paper's recipe lam*SFT + (1-lam)*D (`deltakd
train --loss D --lam LAM`) with D = KD and D = P1 (alpha 1 and 1.5), at lam 0.5 and
lam 0.2 (more weight on the distillation term, where the choice of its target matters most).

Uses the demo world (shipped checkpoints, test split of 200 prompts, greedy decoding).
Prints mean and spread (sample std) per variant; ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from deltakd.demo_cmd import DemoConfig, assets, build_demo_cache
from deltakd.student.eval import EvalConfig, run_eval
from deltakd.student.trainer import TrainConfig, train

VARIANTS = {
    "sft": dict(loss="sft"),
    "kd_fkl": dict(loss="kd", divergence="fkl"),
    "kd_rkl": dict(loss="kd", divergence="rkl"),
    "p1_a0.5": dict(loss="p1", alpha=0.5),
    "p1_a1.0": dict(loss="p1", alpha=1.0),
    "p1_a1.5": dict(loss="p1", alpha=1.5),
    "p3_a1.0": dict(loss="p3", alpha=1.0),
    "kd+p3": dict(loss="kd+p3", alpha=1.0),
    **{f"lam{lam}_kd": dict(loss="kd", lam=lam) for lam in (0.5, 0.2)},
    **{f"lam{lam}_p1_a{a}": dict(loss="p1", lam=lam, alpha=a) for lam in (0.5, 0.2) for a in (1.0, 1.5)},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/quality")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                    help=f"subset to run (default: all): {', '.join(VARIANTS)}")
    ap.add_argument("--test-examples", type=int, default=200)
    a = ap.parse_args()
    work = Path(a.workdir)
    paths = assets(DemoConfig(workdir=str(work)), work)
    cache = build_demo_cache(work, paths)
    scores: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for name in a.variants:
        for seed in a.seeds:
            out = work / "runs" / f"{name}-s{seed}"
            if not (out / "final" / "config.json").exists():
                train(TrainConfig(cache=str(cache), student=paths["student_base"], out=str(out), max_steps=a.steps,
                                  batch_tokens=2048, lr=2e-3, warmup_steps=20, log_every=100, save_every=10_000,
                                  eval_percent=5.0, seed=seed, **VARIANTS[name]))
            ev = out / "eval" / "summary.json"
            if not ev.exists():
                run_eval(EvalConfig(models=(str(out / "final"),), data=paths["test"], out=str(out / "eval"),
                                    max_new_tokens=40, batch_size=50, max_examples=a.test_examples))
            scores.setdefault(name, []).append(json.loads(ev.read_text())["results"][0]["rougeL"])
    base = run_eval(EvalConfig(models=(paths["teacher_ft"], paths["student_base"]), data=paths["test"],
                               out=str(work / "eval-ref"), max_new_tokens=40, batch_size=50, max_examples=a.test_examples))
    print(f"\nROUGE-L on {a.test_examples} test prompts, {a.steps} steps, seeds {a.seeds}")
    print(f"{'variant':<16}{'mean':>8}{'std':>8}   per seed   objective")
    print(f"{'teacher_ft':<16}{base[0]['rougeL']:8.2f}{'':>8}")
    print(f"{'student_base':<16}{base[1]['rougeL']:8.2f}{'':>8}")
    summary = {}
    for name, v in scores.items():
        mean, std = statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0
        objective = TrainConfig(cache="", student="", out="", **VARIANTS[name]).objective()
        summary[name] = {"mean": mean, "std": std, "per_seed": v, "objective": objective}
        print(f"{name:<16}{mean:8.2f}{std:8.2f}   " + " ".join(f"{x:.2f}" for x in v) + f"   {objective}")
    print(json.dumps({"benchmark": "quality", "machine": platform.machine(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "steps": a.steps, "seeds": a.seeds,
                      "teacher_ft": base[0]["rougeL"], "student_base": base[1]["rougeL"], "variants": summary,
                      "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
