"""`deltakd demo`: the whole story on built-in defaults, on a CPU, in minutes.

    deltakd demo [--workdir runs/demo] [--quick]

The pipeline itself (stages, report) is `deltakd.demo.pipeline`.
"""

from __future__ import annotations

from deltakd.demo.pipeline import DemoConfig, run_demo


def register(sub) -> None:
    p = sub.add_parser("demo", help="end-to-end demo: cache, SFT/KD/Delta-KD/recipe students, ROUGE-L table, report")
    p.add_argument("--workdir", default="runs/demo", help="where every stage writes (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a few steps and examples (tests, smoke runs)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per student")
    p.add_argument(
        "--rebuild-checkpoints",
        "--rebuild-world",
        action="store_true",
        help="retrain the demo checkpoints instead of the shipped ones",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(
        func=lambda ns: _print(run_demo(DemoConfig(ns.workdir, ns.quick, ns.steps, ns.rebuild_checkpoints, ns.seed)))
    )


def _print(report: dict) -> int:
    print(report["table"])
    print("\n" + report["verdict"].replace("**", ""))
    print(f"\nreport: {report['report']}")
    return 0
