"""ROUGE-L of students trained from one cache with SFT, KD and Delta-KD variants, over seeds.

    python -m benchmarks.quality [--steps 800] [--seeds 0 1 2] [--workdir runs/quality] [--variants sft lam0.5_kd ...]
    python -m benchmarks.quality online [--task bpe] [--supports topk64 union16] [--variants ...]   # cache vs online
    python -m benchmarks.quality regime [--smoke] [--world demo] [--floor -8] [--report-only]   # per test set

Beside the pure objectives it runs the paper's recipe lam*SFT + (1-lam)*D (`deltakd
train --loss D --lam LAM`) with D = KD and D = P1 (alpha 1 and 1.5), at lam 0.5 and
lam 0.2 (more weight on the distillation term, where the choice of its target matters most).

Uses the demo task (shipped checkpoints, test split of 200 prompts, greedy decoding).
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

from deltakd.cache.format.reader import CacheReader
from deltakd.demo.pipeline import DemoConfig, assets, build_demo_cache
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
    ap.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        metavar="NAME",
        help=f"subset to run (default: all): {', '.join(VARIANTS)}",
    )
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
                train(
                    TrainConfig(
                        cache=str(cache),
                        student=paths["student_base"],
                        out=str(out),
                        max_steps=a.steps,
                        batch_tokens=2048,
                        lr=2e-3,
                        warmup_steps=20,
                        log_every=100,
                        save_every=10_000,
                        eval_percent=5.0,
                        seed=seed,
                        **VARIANTS[name],
                    )
                )
            ev = out / "eval" / "summary.json"
            if not ev.exists():
                run_eval(
                    EvalConfig(
                        models=(str(out / "final"),),
                        data=paths["test"],
                        out=str(out / "eval"),
                        max_new_tokens=40,
                        batch_size=50,
                        max_examples=a.test_examples,
                    )
                )
            scores.setdefault(name, []).append(json.loads(ev.read_text())["results"][0]["rougeL"])
    base = run_eval(
        EvalConfig(
            models=(paths["teacher_ft"], paths["student_base"]),
            data=paths["test"],
            out=str(work / "eval-ref"),
            max_new_tokens=40,
            batch_size=50,
            max_examples=a.test_examples,
        )
    )
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
    print(
        json.dumps(
            {
                "benchmark": "quality",
                "machine": platform.machine(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "steps": a.steps,
                "seeds": a.seeds,
                "teacher_ft": base[0]["rougeL"],
                "student_base": base[1]["rougeL"],
                "variants": summary,
                "seconds": time.perf_counter() - t0,
            }
        )
    )


# ------------------------------------------------------------------ cache vs online full-vocabulary reference
# Supports compared against the online reference: format v1's top-64 of piT, and v2's default union.
# union16+s16 adds 16 ids per position drawn from πT's tail (--tail-samples 16) where the top-k leaves ≥ 1% of it.
SUPPORTS = {
    "topk64": dict(support="topk", top_k=64, mode="sequential", tail_samples=0),
    "union16": dict(support="union", top_k=16, tail_samples=0),
    "union16+s16": dict(support="union", top_k=16, tail_samples=16, tail_proposal="teacher"),
    # By mass: each distribution's fewest top ids holding 0.9, 12 to 32 of them (cache build --top-mass).
    "mass90": dict(support="union", top_k=32, top_mass=0.9, min_k=12, tail_samples=0),
    "mass90+s16": dict(support="union", top_k=32, top_mass=0.9, min_k=12, tail_samples=16, tail_proposal="teacher"),
    # Tail samples drawn from the Delta-KD target π* (α 1) instead of πT (cache build --tail-proposal target).
    "union16+t16": dict(support="union", top_k=16, tail_samples=16, tail_proposal="target"),
    "union12+t24": dict(support="union", top_k=12, tail_samples=24, tail_proposal="target"),
    # From half πT's tail and half π*'s (cache build --tail-proposal mixture).
    "union12+m24": dict(support="union", top_k=12, tail_samples=24, tail_proposal="mixture"),
    "union16+m16": dict(support="union", top_k=16, tail_samples=16, tail_proposal="mixture"),
}
ONLINE_VARIANTS = ("sft", "kd_fkl", "kd_rkl", "p1_a0.5", "p1_a1.0", "p1_a1.5", "p3_a1.0", "kd+p3")


def _mean_std(v: list[float]) -> tuple[float, float]:
    if not v:  # a run cut short (--report-only)
        return float("nan"), float("nan")
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def task_paths(task: str, work: Path) -> dict:
    """Checkpoints and data of the task the comparison runs on (built on first use, then reused)."""
    if task == "demo":
        return assets(DemoConfig(workdir=str(work)), work)
    from benchmarks import bpe_task

    if task == "bpe-broad":  # the same task, its student base pretrained for 1/8 of the steps
        return bpe_task.build(work.parent / "bpe_task_broad", student_steps=bpe_task.BROAD_STUDENT_STEPS)
    return bpe_task.build(work.parent / "bpe_task" if task == "bpe" else Path(task))


@torch.no_grad()
def base_regime(paths: dict, n_records: int = 200, max_length: int = 128) -> dict:
    """Mean next-token entropy (nats) of πT, πB and πS0 on the answer positions of the first training
    records, and how often πB's and πS0's top token is πT's: whether the bases are peaked or broad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltakd.cache.format.records import encode_record, read_records

    tok = AutoTokenizer.from_pretrained(paths["teacher_ft"])
    roles = {"T": "teacher_ft", "B": "teacher_base", "S0": "student_base"}
    models = {r: AutoModelForCausalLM.from_pretrained(paths[k]).eval() for r, k in roles.items()}
    ent = {r: [] for r in roles}
    agree = {r: [] for r in ("B", "S0")}
    for i, rec in enumerate(read_records(paths["train"])):
        if i >= n_records:
            break
        ids, plen, _ = encode_record(tok, rec, max_length)
        pos = torch.arange(max(plen - 1, 0), len(ids) - 1)  # position t predicts answer token t + 1
        lp = {r: torch.log_softmax(m(torch.tensor([ids])).logits[0, pos].double(), -1) for r, m in models.items()}
        for r, x in lp.items():
            ent[r].append(-(x.exp() * x).sum(-1))
        for r in agree:
            agree[r].append((lp[r].argmax(-1) == lp["T"].argmax(-1)).double())
    return {
        "entropy": {r: float(torch.cat(v).mean()) for r, v in ent.items()},
        "top1_agrees_with_T": {r: float(torch.cat(v).mean()) for r, v in agree.items()},
    }


def build_task_cache(paths: dict, out: Path, **settings) -> Path:
    """A cache of the task's training data with its three checkpoints: the default build, but for `settings`."""
    from deltakd.cache.build.builder import CacheBuildConfig, build_cache

    build_cache(
        CacheBuildConfig(
            teacher_ft=paths["teacher_ft"],
            teacher_base=paths["teacher_base"],
            student_base=paths["student_base"],
            data=paths["train"],
            out=str(out),
            max_length=128,
            batch_size=32,
            shard_tokens=32768,
            **settings,
        )
    )
    return out


def held_out_objective(model: Path, cache: Path, paths: dict, name: str) -> dict:
    """The full-vocabulary objective of `name` and KL(πT ‖ πθ) on the cache's held-out rows, for a trained model.

    A continuous measure beside ROUGE-L: greedy decoding turns a near tie between two
    tokens into a different answer, so ROUGE-L can jump where the objective barely moved.
    Scored by the online reference (online_ref.py: full-vocabulary targets from the three
    frozen models, the cache's floor), float32, on every held-out row (eval_percent 5).
    """
    from benchmarks.online_ref import OnlineTrainer

    out = {}
    # KD fkl's own objective is KL(πT ‖ πθ): one evaluation serves both.
    for key, variant in (("own", name),) + ((("kl_t", "kd_fkl"),) if name != "kd_fkl" else ()):
        cfg = TrainConfig(
            cache=str(cache),
            student=str(model),
            out=str(model.parent / "heldout-scratch"),
            max_steps=1,
            eval_percent=5.0,
            eval_batches=100_000,
            batch_tokens=4096,
            **VARIANTS[variant],
        )
        tr = OnlineTrainer(
            cfg, paths["teacher_ft"], paths["teacher_base"], paths["student_base"], floor=CacheReader(cache).floor
        )
        ev = tr.evaluate()
        out[key] = sum(tr.spec.weights[t] * ev[f"eval_{t}"] for t in tr.spec.active)
        out["tokens"] = ev["eval_tokens"]
    out.setdefault("kl_t", out["own"])
    return out


def main_online(argv=None):
    """ROUGE-L of students trained from caches (per support) and from the online full-vocabulary reference."""

    from benchmarks.online_ref import train_online
    from deltakd.cache.format.summary import summarize

    ap = argparse.ArgumentParser(prog="quality.py online", description=main_online.__doc__)
    ap.add_argument(
        "--task",
        default="bpe",
        help="bpe (benchmarks/bpe_task.py, V = 8192), bpe-broad (the same with a broad student base), demo, "
        "or a bpe_task folder",
    )
    ap.add_argument("--workdir", default="runs/quality-online")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--variants",
        nargs="+",
        default=list(ONLINE_VARIANTS),
        choices=ONLINE_VARIANTS,
        metavar="NAME",
        help=f"subset to run (default: all): {', '.join(ONLINE_VARIANTS)}",
    )
    ap.add_argument("--supports", nargs="+", default=list(SUPPORTS), choices=list(SUPPORTS))
    ap.add_argument("--test-examples", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: the table from the runs already finished in --workdir (a cut-short benchmark)",
    )
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    t0 = time.perf_counter()
    paths = task_paths(a.task, work)
    bases = base_regime(paths)
    e, t = bases["entropy"], bases["top1_agrees_with_T"]
    print(
        f"bases on the training answers: entropy (nats) πT {e['T']:.2f}, πB {e['B']:.2f}, πS0 {e['S0']:.2f}; "
        f"top-1 equal to πT's: πB {t['B']:.2f}, πS0 {t['S0']:.2f}"
    )
    caches = {s: build_task_cache(paths, work / f"cache-{s}", **SUPPORTS[s]) for s in a.supports}
    inspect = {s: summarize(c) for s, c in caches.items()}
    for s, i in inspect.items():
        print(
            f"cache {s}: support length mean {i['support_length_mean']:.1f}; mass of piT held, quantiles "
            + " ".join(f"q{q}={v:.3f}" for q, v in i["topk_mass_quantiles"].items())
        )
    ev = dict(data=paths["test"], max_new_tokens=a.max_new_tokens, batch_size=50, max_examples=a.test_examples)

    def run(mode: str, name: str, seed: int) -> float | None:
        # SFT reads no target: its cached and online runs are the same computation; run it once.
        out = work / "runs" / ("sft" if name == "sft" else mode) / f"{name}-s{seed}"
        cache = caches[a.supports[0] if mode in ("online", "sft") or name == "sft" else mode]
        cfg = TrainConfig(
            cache=str(cache),
            student=paths["student_base"],
            out=str(out),
            max_steps=a.steps,
            batch_tokens=a.batch_tokens,
            lr=a.lr,
            warmup_steps=min(20, a.steps // 5),
            log_every=50,
            save_every=10_000,
            eval_percent=5.0,
            seed=seed,
            **VARIANTS[name],
        )
        if a.report_only and not (out / "eval" / "summary.json").exists():
            return None
        if not (out / "final" / "config.json").exists():
            t = time.perf_counter()
            if mode == "online" and name != "sft":
                floor = CacheReader(cache).floor  # the online twin's P1/P3 use the cache's own floor
                train_online(cfg, paths["teacher_ft"], paths["teacher_base"], paths["student_base"], floor=floor)
            else:
                train(cfg)
            print(
                f"[{time.perf_counter() - t0:7.0f}s] trained {mode} {name} seed {seed} "
                f"in {time.perf_counter() - t:.0f}s",
                flush=True,
            )
        summary = out / "eval" / "summary.json"
        if not summary.exists():
            run_eval(EvalConfig(models=(str(out / "final"),), out=str(out / "eval"), **ev))
        held = out / "heldout.json"
        if not held.exists():
            held.write_text(json.dumps(held_out_objective(out / "final", cache, paths, name)))
        heldout[name][mode].append(json.loads(held.read_text()))
        return json.loads(summary.read_text())["results"][0]["rougeL"]

    modes = [*a.supports, "online"]
    scores = {n: {m: [] for m in modes} for n in a.variants}
    heldout = {n: {m: [] for m in modes} for n in a.variants}
    # Seed-major order: a run cut short still has every variant and mode at the first seeds.
    for seed in a.seeds:
        for name in a.variants:
            for mode in modes:
                if (r := run(mode, name, seed)) is not None:
                    scores[name][mode].append(r)
    base = run_eval(EvalConfig(models=(paths["teacher_ft"], paths["student_base"]), out=str(work / "eval-ref"), **ev))
    print(
        f"\nROUGE-L on {a.test_examples} test prompts, task {a.task}, {a.steps} steps, seeds {a.seeds}: "
        "mean ± sample std over seeds; diff = cache − online per seed, then mean ± std"
    )
    head = f"{'variant':<10}" + "".join(f"{m:>16}" for m in modes) + "".join(f"{'diff ' + s:>18}" for s in a.supports)
    print(head)
    print(f"{'teacher_ft':<10}{base[0]['rougeL']:16.2f}\n{'student_0':<10}{base[1]['rougeL']:16.2f}")
    summary = {}
    for name, by_mode in scores.items():
        row, rec = f"{name:<10}", {}
        for m in modes:
            mu, sd = _mean_std(by_mode[m])
            rec[m] = {"mean": mu, "std": sd, "per_seed": by_mode[m]}
            row += f"{mu:10.2f} ±{sd:4.2f}"
        for s in a.supports:
            d = [c - o for c, o in zip(by_mode[s], by_mode["online"])]  # seed-major: same seeds, in order
            mu, sd = _mean_std(d)
            rec[f"diff_{s}"] = {"mean": mu, "std": sd, "per_seed": d}
            row += f"{mu:+12.2f} ±{sd:4.2f}"
        summary[name] = rec
        print(row + ("   (one run: SFT reads no target)" if name == "sft" else ""))
    print(
        "\nHeld-out full-vocabulary objective of each student (its own objective; lower is better), "
        "mean ± std over seeds; KL(πT ‖ πθ) in brackets"
    )
    print(f"{'variant':<10}" + "".join(f"{m:>26}" for m in modes))
    for name, by_mode in heldout.items():
        row = f"{name:<10}"
        for m in modes:
            own, kl = _mean_std([h["own"] for h in by_mode[m]]), _mean_std([h["kl_t"] for h in by_mode[m]])
            summary[name][m]["heldout"] = {"own": own, "kl_t": kl, "per_seed": by_mode[m]}
            row += f"{own[0]:11.4f} ±{own[1]:6.4f} [{kl[0]:5.3f}]"
        print(row)
    print(
        json.dumps(
            {
                "benchmark": "quality_online",
                "task": a.task,
                "machine": platform.machine(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "steps": a.steps,
                "batch_tokens": a.batch_tokens,
                "seeds": a.seeds,
                "test_examples": a.test_examples,
                "teacher_ft": base[0]["rougeL"],
                "student_base": base[1]["rougeL"],
                "bases": bases,
                "cache_inspect": {
                    s: {
                        "support_length_mean": i["support_length_mean"],
                        "topk_mass_quantiles": i["topk_mass_quantiles"],
                        "mass_held_quantiles": i["mass_held_quantiles"],
                        "bytes_per_token": i.get("bytes_per_supervised_token"),
                    }
                    for s, i in inspect.items()
                },
                "variants": summary,
                "seconds": time.perf_counter() - t0,
            }
        )
    )


# ------------------------------------------------------------------ the regime world: whose knowledge transfers
REGIME_VARIANTS = ("sft", "kd_fkl", "p1_a1.0", "p1_a1.5", "lam0.5_kd", "lam0.5_p1_a1.0")


def _train_all(todo: dict, workers: int) -> None:
    from deltakd.demo.pipeline import train_students

    if workers > 1:
        train_students(todo, train)  # two at a time in worker processes, each logging to <run>/train.log
    else:
        for cfg in todo.values():
            train(cfg)


def main_regime(argv=None):
    """ROUGE-L and held-out KL per test set (A, S, C, words) on the regime world; see benchmarks/regime_task.py."""
    from benchmarks import regime_task as rt

    ap = argparse.ArgumentParser(prog="quality.py regime", description=main_regime.__doc__)
    ap.add_argument(
        "--workdir", default=None, help="default runs/quality-regime (--world demo: runs/quality-floor-demo)"
    )
    ap.add_argument("--world", default="regime", choices=("regime", "demo"), help="demo: the demo task, one test set")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--smoke: 0)")
    ap.add_argument(
        "--variants",
        nargs="+",
        default=list(REGIME_VARIANTS),
        choices=list(VARIANTS),
        metavar="NAME",
        help=f"default: {' '.join(REGIME_VARIANTS)}",
    )
    ap.add_argument(
        "--floor",
        default="-12",
        help="the cache's floor inside Δ (a number or 'none'); P1 trains with it. -12 is the pre-registered "
        "design's (the builder's default was -12 then; it is -16 now)",
    )
    ap.add_argument("--workers", type=int, default=2, help="students trained at once in worker processes")
    ap.add_argument("--smoke", action="store_true", help="tiny world, 3 steps, one seed: the same path in minutes")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: the tables from the runs already finished in --workdir (a cut-short benchmark)",
    )
    a = ap.parse_args(argv)
    threads = torch.get_num_threads()
    # One thread in this process (the workers set their own): on a CPU shared with other jobs, two threads per
    # process spin and ran slower than one.
    torch.set_num_threads(1)
    try:
        regime(a, rt)
    finally:
        torch.set_num_threads(threads)


def regime(a: argparse.Namespace, rt) -> None:
    seeds = a.seeds or ([0] if a.smoke else [0, 1, 2])
    steps = 3 if a.smoke else a.steps
    work = Path(a.workdir or ("runs/quality-regime" if a.world == "regime" else "runs/quality-floor-demo"))
    t0 = time.perf_counter()
    if a.world == "regime":
        paths = rt.build(work / "world", size=rt.SMOKE if a.smoke else rt.WorldSize())
    else:
        paths = assets(DemoConfig(workdir=str(work)), work)
    tag = "" if a.floor == "-12" else f"-floor{a.floor}"
    cache = build_task_cache(paths, work / f"cache{tag}", floor=a.floor)
    test_n = len(Path(paths["test"]).read_text().splitlines())
    ev = dict(data=paths["test"], max_new_tokens=40, batch_size=50, max_examples=test_n)
    kl = None

    def result(model: Path, out: Path) -> dict:
        """Per-set scores (from the answers on disk, so a new measure needs no re-decoding) and KL (stored)."""
        nonlocal kl
        if not (out / "eval" / "summary.json").exists():
            run_eval(EvalConfig(models=(str(model),), out=str(out / "eval"), **ev))
        rows = [json.loads(l) for f in (out / "eval").glob("*.jsonl") for l in f.read_text().splitlines()]
        done = out / "regime.json"
        if not done.exists() or json.loads(done.read_text()).get("floor") != a.floor:  # KL to π* with this floor
            kl = kl or rt.HeldOutKL(paths, floor=None if a.floor == "none" else float(a.floor))
            done.write_text(json.dumps({"kl": kl(model), "floor": a.floor}))
        return {"sets": rt.score_sets(paths["test"], rows), "kl": json.loads(done.read_text())["kl"]}

    runs = {n: [] for n in a.variants}
    # Seed-major: a run cut short has every variant at the first seeds.
    for seed in seeds:
        cfgs = {
            name: TrainConfig(
                cache=str(cache),
                student=paths["student_base"],
                out=str(work / f"runs{tag}" / f"{name}-s{seed}"),
                max_steps=steps,
                batch_tokens=2048,
                lr=2e-3,
                warmup_steps=min(20, steps // 5),
                log_every=100,
                save_every=10_000,
                eval_percent=5.0,
                seed=seed,
                **VARIANTS[name],
            )
            for name in a.variants
        }
        todo = {n: c for n, c in cfgs.items() if not (Path(c.out) / "final" / "config.json").exists()}
        if todo and not a.report_only:
            t = time.perf_counter()
            _train_all(todo, 1 if a.smoke else a.workers)
            print(
                f"[{time.perf_counter() - t0:6.0f}s] seed {seed}: trained {len(todo)} in {time.perf_counter() - t:.0f}s"
            )
        for name, c in cfgs.items():
            if (Path(c.out) / "final" / "config.json").exists():
                runs[name].append(result(Path(c.out) / "final", Path(c.out)))
    ref = {k: result(Path(paths[k]), work / f"ref{tag}" / k) for k in ("teacher_ft", "student_base")}
    sets = list(ref["teacher_ft"]["sets"])

    def cell(v: list[float], w: int = 14) -> str:
        mu, sd = _mean_std(v)
        return f"{mu:{w - 6}.1f} ±{sd:4.1f}" if v else f"{'-':>{w}}"

    per_seed = {n: {s: [r["sets"][s]["rougeL"] for r in rs] for s in sets} for n, rs in runs.items()}
    print(
        f"\nworld {a.world}, floor {a.floor}, {steps} steps, seeds {seeds}: mean ± sample std over the seeds finished"
    )
    for metric, title in (
        ("rougeL", "ROUGE-L"),
        ("fact", "fact (% answers with the asked value; words: exact)"),
        ("name", "name (% answers naming the creature asked about)"),
        ("name_fact", "name and fact (% answers naming it and giving its value)"),
    ):
        if metric not in ref["teacher_ft"]["sets"][sets[0]]:
            continue
        sets_m = [s for s in sets if metric in ref["teacher_ft"]["sets"][s]]
        print(
            f"\n{title} per test set (n: " + ", ".join(f"{s} {ref['teacher_ft']['sets'][s]['n']}" for s in sets_m) + ")"
        )
        print(f"{'row':<16}{'seeds':>6}" + "".join(f"{s:>14}" for s in sets_m))
        for name, r in ref.items():
            print(f"{name:<16}{'':>6}" + "".join(cell([r["sets"][s][metric]]) for s in sets_m))
        for name, rs in runs.items():
            print(f"{name:<16}{len(rs):>6}" + "".join(cell([r["sets"][s][metric] for r in rs]) for s in sets_m))

    def mean_kl(rs: list[dict], s: str, key: str) -> float:
        return _mean_std([r["kl"][s][key] for r in rs])[0]

    print(f"\nheld-out full-vocabulary KL per answer token, to πT | to π* (α 1, floor {a.floor}), mean over seeds")
    print(f"{'row':<16}" + "".join(f"{s:>16}" for s in sets))
    for name, rs in [(k, [v]) for k, v in ref.items()] + list(runs.items()):
        if rs:
            print(
                f"{name:<16}"
                + "".join(f"{mean_kl(rs, s, 'kl_t'):8.3f} |{mean_kl(rs, s, 'kl_star'):6.3f}" for s in sets)
            )
    verdicts = rt.judge(per_seed) if a.world == "regime" else []
    if verdicts:
        print("\npredictions (d = mean of X − Y over seeds; spread = std X + std Y; 'at least' fails if d < −spread)")
    for v in verdicts:
        if v["held"] is None:
            print(f"  {v['set']:<6}{v['x']} {v['claim']} {v['y']}: not run")
            continue
        print(
            f"  {v['set']:<6}{v['x']} {v['claim']} {v['y']}: d {v['d']:+.1f}, spread {v['spread']:.1f} "
            f"-> {'held' if v['held'] else 'FAILED'}" + (" (a win for X)" if v["d"] > v["spread"] else "")
        )
    print(
        json.dumps(
            {
                "benchmark": "quality_regime",
                "world": a.world,
                "smoke": a.smoke,
                "floor": a.floor,
                "machine": platform.machine(),
                "torch": torch.__version__,
                "steps": steps,
                "seeds": seeds,
                "reference": ref,
                "variants": {n: {"per_seed": rs, "rougeL": per_seed[n]} for n, rs in runs.items()},
                "predictions": verdicts,
                "seconds": time.perf_counter() - t0,
            }
        )
    )


if __name__ == "__main__":
    import sys

    # `quality.py online|regime ...`; otherwise the demo-task sweep.
    {"online": main_online, "regime": main_regime}.get(sys.argv[1] if sys.argv[1:] else "", lambda _: main())(
        sys.argv[2:]
    )
