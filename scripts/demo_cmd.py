"""`deltakd demo`: the whole story on built-in defaults, on a CPU, in minutes.

    deltakd demo [--workdir runs/demo] [--quick]

Stages (each reused when a re-run finds it finished): world data -> cache (teachers +
student base) -> students trained with SFT, KD and Delta-KD -> ROUGE-L of the
teacher, the student base and the students on the test split -> report folder.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).parent / "demo_assets"
RUNS = {
    "sft": dict(loss="sft"),
    "kd": dict(loss="kd", divergence="fkl"),
    "delta_p1": dict(loss="p1", alpha=1.0),
}


@dataclass(frozen=True)
class DemoConfig:
    workdir: str = "runs/demo"
    quick: bool = False
    steps: int = 600
    rebuild_world: bool = False
    seed: int = 0

    @property
    def train_steps(self) -> int:
        return 6 if self.quick else self.steps

    @property
    def test_examples(self) -> int:
        return 12 if self.quick else 200


def register(sub) -> None:
    p = sub.add_parser("demo", help="end-to-end demo: cache, SFT/KD/Delta-KD students, ROUGE-L table, report")
    p.add_argument("--workdir", default="runs/demo", help="where every stage writes (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a few steps and examples (tests, smoke runs)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per student")
    p.add_argument("--rebuild-world", action="store_true", help="retrain the demo checkpoints instead of the shipped ones")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda ns: _print(run_demo(DemoConfig(ns.workdir, ns.quick, ns.steps, ns.rebuild_world, ns.seed))))


def _print(report: dict) -> int:
    print(report["table"])
    print(f"\nreport: {report['report']}")
    return 0


def _stage(name: str):
    print(f"\n=== {name} ===", flush=True)
    return time.perf_counter()


def assets(cfg: DemoConfig, work: Path) -> dict:
    from .world import build_world, write_data

    if cfg.rebuild_world or not (ASSETS / "teacher_ft" / "config.json").exists():
        if not (work / "world" / "WORLD.json").exists():
            build_world(work / "world", cfg.seed)
        root = work / "world"
    else:
        root = ASSETS
    data = write_data(work / "data", cfg.seed)
    return {k: str(root / k) for k in ("teacher_base", "teacher_ft", "student_base")} | data


def build_demo_cache(work: Path, a: dict, top_k: int = 16) -> Path:
    """The demo's cache (resumes or reuses a finished one)."""
    from deltakd.cache.builder import CacheBuildConfig, build_cache

    cache = work / ("cache" if top_k == 16 else f"cache-k{top_k}")
    build_cache(CacheBuildConfig(teacher_ft=a["teacher_ft"], teacher_base=a["teacher_base"], student_base=a["student_base"],
                                 data=a["train"], out=str(cache), top_k=top_k, max_length=128, batch_size=32,
                                 shard_tokens=32768))
    return cache


def run_demo(cfg: DemoConfig) -> dict:
    from deltakd.cache.inspect import format_summary, plot, summarize
    from deltakd.student.eval import EvalConfig, format_table, run_eval
    from deltakd.student.trainer import TrainConfig, train

    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    timings = {}
    t = _stage("world: checkpoints and data")
    a = assets(cfg, work)
    timings["world"] = time.perf_counter() - t

    t = _stage("cache build (teacher after SFT, teacher before SFT, student base)")
    cache = build_demo_cache(work, a)
    timings["cache"] = time.perf_counter() - t

    runs = {}
    for name, opts in RUNS.items():
        t = _stage(f"train student: {name}")
        out = work / "runs" / name
        if not (out / "final" / "config.json").exists():
            train(TrainConfig(cache=str(cache), student=a["student_base"], out=str(out), max_steps=cfg.train_steps,
                              batch_tokens=2048, lr=2e-3, warmup_steps=min(20, cfg.train_steps // 5),
                              log_every=max(1, cfg.train_steps // 30), save_every=100, eval_every=max(1, cfg.train_steps // 5),
                              eval_percent=5.0, seed=cfg.seed, **opts))
        runs[name] = str(out / "final")
        timings[f"train_{name}"] = time.perf_counter() - t

    t = _stage("evaluate on the test split (greedy, ROUGE-L)")
    models = {"teacher_ft": a["teacher_ft"], "student_base": a["student_base"], **runs}
    ev_dir = work / "eval"
    summary = ev_dir / "summary.json"
    want = [str(m) for m in models.values()]
    # run_eval writes summary.json; it is reused when it scored the same models on as many examples.
    results = json.loads(summary.read_text())["results"] if summary.exists() else []
    if [(r["model"], r["n"]) for r in results] != [(m, cfg.test_examples) for m in want]:
        results = run_eval(EvalConfig(models=tuple(want), data=a["test"], out=str(ev_dir), max_new_tokens=40,
                                      batch_size=50, max_examples=cfg.test_examples))
    for r, name in zip(results, models):
        r["name"] = name
    timings["eval"] = time.perf_counter() - t

    t = _stage("report")
    rep = work / "report"
    rep.mkdir(exist_ok=True)
    s = summarize(cache)
    (rep / "cache_inspect.txt").write_text(format_summary(s, json.loads((cache / "manifest.json").read_text()),
                                                          a["teacher_ft"]) + "\n")
    plot(s, str(rep / "cache_histograms.png"))
    loss_curves(work, list(RUNS), rep / "loss_curves.png")
    table = format_table(results)
    write_markdown(rep / "summary.md", cfg, table, results, (rep / "cache_inspect.txt").read_text(), timings)
    (rep / "rouge.json").write_text(json.dumps({r["name"]: r["rougeL"] for r in results}, indent=1))
    timings["report"] = time.perf_counter() - t
    return {"table": table, "report": str(rep), "results": results, "timings": timings}


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


def write_markdown(path: Path, cfg: DemoConfig, table: str, results, inspect: str, timings: dict) -> None:
    lines = ["# deltakd demo report", "",
             f"Students trained for {cfg.train_steps} steps from one cache; test split: {cfg.test_examples} examples,",
             "greedy decoding, ROUGE-L F-measure x 100 (rouge-score).", "", "```", table, "```", "",
             "![loss curves](loss_curves.png)", "", "## What the cache holds", "", "```", inspect.rstrip(), "```", "",
             "![cache histograms](cache_histograms.png)", "", "## Stage times (s)", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in timings.items()]
    path.write_text("\n".join(lines) + "\n")
