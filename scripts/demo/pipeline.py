"""The demo pipeline behind `deltakd demo`: the whole story on built-in defaults, on a CPU, in minutes.

    run_demo(DemoConfig(workdir="runs/demo"))   # what `deltakd demo` runs

Stages (each reused when a re-run finds it finished): task data and checkpoints -> cache (teachers +
student base) -> students trained with SFT, KD, Delta-KD P1 and the paper's recipe
lam*SFT + (1-lam)*D with D = KD or P1 -> ROUGE-L of the teacher, the student base and
the students on the test split -> report folder, whose first paragraph says which
objective wins on this task, by how much, and what in the cached targets explains it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
ALPHA = 1.0  # Delta-KD shift scale of every P1 student here
LAM = 0.5  # lam of the recipe rows; benchmarks/quality.py also runs lam = 0.2 and alpha = 1.5 over seeds
RUNS = {
    "sft": dict(loss="sft"),
    "kd": dict(loss="kd", divergence="fkl"),
    "delta_p1": dict(loss="p1", alpha=ALPHA),
    "recipe_kd": dict(loss="kd", lam=LAM),
    "recipe_p1": dict(loss="p1", lam=LAM, alpha=ALPHA),
}


@dataclass(frozen=True)
class DemoConfig:
    workdir: str = "runs/demo"
    quick: bool = False
    steps: int = 600
    rebuild_checkpoints: bool = False
    seed: int = 0

    @property
    def train_steps(self) -> int:
        return 6 if self.quick else self.steps

    @property
    def test_examples(self) -> int:
        return 12 if self.quick else 200


def _stage(name: str):
    print(f"\n=== {name} ===", flush=True)
    return time.perf_counter()


def assets(cfg: DemoConfig, work: Path) -> dict:
    from deltakd.demo.synthetic import build_checkpoints, write_data

    if cfg.rebuild_checkpoints or not (ASSETS / "teacher_ft" / "config.json").exists():
        if not (work / "checkpoints" / "TASK.json").exists():
            build_checkpoints(work / "checkpoints", cfg.seed)
        root = work / "checkpoints"
    else:
        root = ASSETS
    data = write_data(work / "data", cfg.seed)
    return {k: str(root / k) for k in ("teacher_base", "teacher_ft", "student_base")} | data


def build_demo_cache(work: Path, a: dict, top_k: int = 16) -> Path:
    """The demo's cache (resumes or reuses a finished one)."""
    from deltakd.cache.build.builder import CacheBuildConfig, build_cache

    cache = work / ("cache" if top_k == 16 else f"cache-k{top_k}")
    build_cache(
        CacheBuildConfig(
            teacher_ft=a["teacher_ft"],
            teacher_base=a["teacher_base"],
            student_base=a["student_base"],
            data=a["train"],
            out=str(cache),
            top_k=top_k,
            max_length=128,
            batch_size=32,
            shard_tokens=32768,
        )
    )
    return cache


def run_demo(cfg: DemoConfig) -> dict:
    from deltakd.cache.format.summary import format_summary, plot, summarize
    from deltakd.student.eval import EvalConfig, format_table, run_eval
    from deltakd.student.trainer import TrainConfig, train

    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    timings = {}
    t = _stage("task: checkpoints and data")
    a = assets(cfg, work)
    timings["task"] = time.perf_counter() - t

    t = _stage("cache build (teacher after SFT, teacher before SFT, student base)")
    cache = build_demo_cache(work, a)
    timings["cache"] = time.perf_counter() - t

    runs, objectives, todo = {}, {}, {}
    for name, opts in RUNS.items():
        out = work / "runs" / name
        tcfg = TrainConfig(
            cache=str(cache),
            student=a["student_base"],
            out=str(out),
            max_steps=cfg.train_steps,
            batch_tokens=2048,
            lr=2e-3,
            warmup_steps=min(20, cfg.train_steps // 5),
            log_every=max(1, cfg.train_steps // 30),
            save_every=100,
            eval_every=max(1, cfg.train_steps // 5),
            eval_percent=5.0,
            seed=cfg.seed,
            **opts,
        )
        if not (out / "final" / "config.json").exists():
            todo[name] = tcfg
        runs[name], objectives[name] = str(out / "final"), tcfg.objective()
    t = _stage(f"train {len(todo)} students: {', '.join(todo) or 'all trained already'}")
    timings |= train_students(todo, train)
    timings["train_all"] = time.perf_counter() - t

    t = _stage("evaluate on the test split (greedy, ROUGE-L)")
    models = {"teacher_ft": a["teacher_ft"], "student_base": a["student_base"], **runs}
    ev_dir = work / "eval"
    summary = ev_dir / "summary.json"
    want = [str(m) for m in models.values()]
    # run_eval writes summary.json; it is reused when it scored the same models on as many examples.
    results = json.loads(summary.read_text())["results"] if summary.exists() else []
    if [(r["model"], r["n"]) for r in results] != [(m, cfg.test_examples) for m in want]:
        results = run_eval(
            EvalConfig(
                models=tuple(want),
                data=a["test"],
                out=str(ev_dir),
                max_new_tokens=40,
                batch_size=50,
                max_examples=cfg.test_examples,
            )
        )
    for r, name in zip(results, models):
        r["name"] = name
    timings["eval"] = time.perf_counter() - t

    t = _stage("report")
    rep = work / "report"
    rep.mkdir(exist_ok=True)
    s = summarize(cache)
    (rep / "cache_inspect.txt").write_text(
        format_summary(s, json.loads((cache / "manifest.json").read_text()), a["teacher_ft"]) + "\n"
    )
    plot(s, str(rep / "cache_histograms.png"))
    loss_curves(work, list(RUNS), rep / "loss_curves.png")
    table = format_table(results)
    verdict = what_it_means({r["name"]: r["rougeL"] for r in results}, target_agreement(cache, ALPHA))
    write_markdown(
        rep / "summary.md", cfg, table, verdict, objectives, (rep / "cache_inspect.txt").read_text(), timings
    )
    (rep / "rouge.json").write_text(json.dumps({r["name"]: r["rougeL"] for r in results}, indent=1))
    timings["report"] = time.perf_counter() - t
    return {"table": table, "verdict": verdict, "report": str(rep), "results": results, "timings": timings}


def _train_logged(cfg, log: str, threads: int) -> float:
    """One student in a worker process, its output in `log`; returns seconds."""
    import contextlib

    import torch

    from deltakd.student.trainer import train

    torch.set_num_threads(threads)
    t = time.perf_counter()
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        train(cfg)
    return time.perf_counter() - t


def train_students(todo: dict, train) -> dict:
    """Train the students, two at a time in worker processes when the machine has two cores or more.

    The demo's students are tiny: one process keeps about one core busy, so two workers
    halve the stage. Each worker writes its progress to <run>/train.log; a failure
    re-raises here with that log's path.
    """
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    cpus = os.cpu_count() or 1
    if cpus < 2 or len(todo) < 2:
        out = {}
        for name, cfg in todo.items():
            t = time.perf_counter()
            train(cfg)
            out[f"train_{name}"] = time.perf_counter() - t
        return out
    workers = 2
    out = {}
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        jobs = {}
        for name, cfg in todo.items():
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            jobs[name] = ex.submit(_train_logged, cfg, str(Path(cfg.out) / "train.log"), max(1, cpus // workers))
        for name, job in jobs.items():
            try:
                out[f"train_{name}"] = job.result()
            except Exception as e:
                raise RuntimeError(
                    f"training student {name} failed ({type(e).__name__}: {e}); "
                    f"its log: {Path(todo[name].out) / 'train.log'}"
                ) from e
            print(
                f"  trained {name} in {out[f'train_{name}']:.0f} s (log: {Path(todo[name].out) / 'train.log'})",
                flush=True,
            )
    return out


def loss_curves(work: Path, names: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        rows = [json.loads(l) for l in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        tr = [r for r in rows if "loss" in r]
        ev = [r for r in rows if any(k.startswith("eval_") and k != "eval_tokens" for k in r)]
        axes[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], label=name)
        key = next(k for k in ev[-1] if k.startswith("eval_") and k != "eval_tokens")
        axes[1].plot([r["step"] for r in ev], [r[key] for r in ev], marker="o", label=f"{name} ({key[5:]})")
    axes[0].set(title="training loss (each run's own objective)", xlabel="step", yscale="log")
    axes[1].set(title="held-out loss", xlabel="step", yscale="log")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def target_agreement(cache: Path, alpha: float) -> dict:
    """How often each training target's most likely token is the reference next token, and the
    mean probability it gives that token, over the cache's supervised positions.

    For the teacher (pi_T), the student base (pi_S0) and the Delta-KD target pi* that P1 trains
    on (pi* = norm(pi_S0 * (pi_T / pi_B)^alpha), with the cache's floor and exact tail when it
    has them), on the cached support with the tail as one outcome (a reference token outside
    the support counts as a miss with probability 0).
    """
    import torch

    from deltakd.cache.format.reader import CacheReader
    from deltakd.student import losses as L
    from deltakd.student.data import StreamingLoader
    from deltakd.student.objective import LossSpec
    from deltakd.student.trainer import fit_spec_to_cache

    reader = CacheReader(cache)
    spec = fit_spec_to_cache(LossSpec(weights={"p1": 1.0}, alpha=alpha), "cache", reader)
    hits = {"teacher": 0.0, "student_base": 0.0, "delta_target": 0.0}
    mass, n = dict.fromkeys(hits, 0.0), 0
    loader = StreamingLoader(reader, batch_tokens=1 << 15, with_student=True, shuffle=False, epochs=1)
    for b in loader:
        tg = b.targets
        ft = L.support(tg["logp_ft"], tg["tail_ft"])  # (N, K+1), -inf on padding
        base = L.support(tg["logp_base"], tg["tail_base"])
        s0 = L.support(tg["logp_s0"], tg["tail_s0"])
        star = tg["tail_star"][:, spec.star_col] if spec.star_col is not None else None
        target = L.delta_target(s0, ft, base, alpha, spec.floor, star)
        is_ref = (tg["support_ids"] == tg["next_tokens"][:, None]) & tg["valid"]  # (N, K)
        in_support = is_ref.any(1)
        col = is_ref.float().argmax(1)
        for name, d in (("teacher", ft), ("student_base", s0), ("delta_target", target)):
            p_ref = d.gather(1, col[:, None])[:, 0].exp()
            hits[name] += float(((d[:, :-1].argmax(1) == col) & in_support).sum())
            mass[name] += float(torch.where(in_support, p_ref, torch.zeros(())).sum())
        n += len(col)
    loader.close()
    return {
        "positions": n,
        "alpha": alpha,
        **{f"{k}_top1": v / max(n, 1) for k, v in hits.items()},
        **{f"{k}_p_ref": v / max(n, 1) for k, v in mass.items()},
    }


def what_it_means(rouge: dict, agree: dict) -> str:
    """The report's first paragraph: which student wins on this task, by how much, and why."""
    students = sorted(RUNS, key=lambda k: -rouge[k])
    best, second = students[0], students[1]
    d_recipe = rouge["recipe_p1"] - rouge["recipe_kd"]
    d_pure = rouge["delta_p1"] - rouge["kd"]
    lines = [
        f"**What the table says.** On this task the best student is `{best}` ({rouge[best]:.1f} ROUGE-L, "
        f"{rouge[best] - rouge[second]:+.1f} over `{second}`; the teacher scores {rouge['teacher_ft']:.1f}). "
        f"In the paper's recipe {LAM:g}·SFT + {1 - LAM:g}·D, the Delta-KD target (D = P1, α = {ALPHA:g}) scores "
        f"{rouge['recipe_p1']:.1f} against {rouge['recipe_kd']:.1f} with plain KD: "
        + (
            f"Delta-KD is {-d_recipe:.1f} points behind KD here"
            if d_recipe < 0
            else f"Delta-KD is {d_recipe:.1f} points ahead of KD here"
        )
        + f". Alone, P1 scores {rouge['delta_p1']:.1f} and KD {rouge['kd']:.1f} ({d_pure:+.1f}). "
        "One seed: benchmarks/quality.py gives the spread over seeds and more λ and α.",
        "",
        f"**Why, from the cache.** Over its {agree['positions']} supervised training positions, the teacher's most "
        f"likely next token is the reference one at {100 * agree['teacher_top1']:.1f}% of them (mean probability "
        f"{agree['teacher_p_ref']:.2f})"
        + (", so KD's target carries little beyond the SFT label. " if agree["teacher_p_ref"] > 0.9 else ". ")
        + f"The Delta-KD target π* ∝ π_S0·(π_T/π_B)^α (α = {ALPHA:g}) starts from the student base, which ranks the "
        f"reference first at {100 * agree['student_base_top1']:.1f}% of the positions; after the teacher's shift "
        f"π* does so at {100 * agree['delta_target_top1']:.1f}% (mean probability {agree['delta_target_p_ref']:.2f})"
        + (
            ". π* departs from the teacher where the small student base and the teacher base disagree (at α = 1, "
            "π* ∝ π_T·π_S0/π_B), and a student that learns π* learns those departures"
            if agree["delta_target_top1"] < agree["teacher_top1"]
            else ""
        )
        + (
            "; the SFT part of the recipe pulls it back toward the reference."
            if rouge["recipe_p1"] > rouge["delta_p1"]
            else "."
        ),
    ]
    return "\n".join(lines)


def write_markdown(
    path: Path, cfg: DemoConfig, table: str, verdict: str, objectives: dict, inspect: str, timings: dict
) -> None:
    lines = [
        "# deltakd demo report",
        "",
        f"Students trained for {cfg.train_steps} steps from one cache; test split: {cfg.test_examples} examples,",
        "greedy decoding, ROUGE-L F-measure x 100 (rouge-score).",
        "",
        "```",
        table,
        "```",
        "",
        verdict,
        "",
        "Each student's objective (`deltakd train` prints it at start and logs it first in metrics.jsonl):",
        "",
    ]
    lines += [f"- `{name}`: {obj}" for name, obj in objectives.items()]
    lines += [
        "",
        "![loss curves](loss_curves.png)",
        "",
        "## What the cache holds",
        "",
        "```",
        inspect.rstrip(),
        "```",
        "",
        "![cache histograms](cache_histograms.png)",
        "",
        "## Stage times (s)",
        "",
    ]
    lines += [f"- {k}: {v:.1f}" for k, v in timings.items()]
    path.write_text("\n".join(lines) + "\n")
