"""`deltakd train`: train a student from a cache (no teacher in memory).

    deltakd train --cache CACHE --student S0 --out RUN --loss p1 --alpha 1.0 --max-steps 200
    deltakd train --config run.toml [--lr 1e-4 ...]   # options override the file
    deltakd train ... --dry-run                        # check, one step, peak memory, exit
"""
from __future__ import annotations

import json
from pathlib import Path

from .dataclass_args import add_dataclass_args, config_from_args


def load_config_file(path: str) -> dict:
    p = Path(path)
    text = p.read_text()
    if p.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise SystemExit("YAML configs need pyyaml: pip install 'deltakd[yaml]' (or use TOML)") from e
        data = yaml.safe_load(text) or {}
    elif p.suffix == ".json":
        data = json.loads(text)
    else:
        raise SystemExit(f"{path}: config files end in .toml, .yaml, .yml or .json")
    return {k.replace("-", "_"): v for k, v in data.items()}


def register(sub) -> None:
    from deltakd.student.trainer import TrainConfig

    p = sub.add_parser("train", help="train a student from a cache")
    p.add_argument("--config", help="TOML/YAML/JSON file with the same fields (underscored names)")
    add_dataclass_args(p, TrainConfig)
    p.set_defaults(func=_train)


def _train(ns) -> int:
    from deltakd.student.trainer import TrainConfig, train

    base = load_config_file(ns.config) if ns.config else {}
    cfg = config_from_args(TrainConfig, ns, base)
    res = train(cfg)
    if cfg.dry_run:
        print(json.dumps(res, indent=1))
    else:
        print(f"final student: {Path(cfg.out) / 'final'}  " + " ".join(f"{k}={v:.4g}" for k, v in res.items()
                                                                      if isinstance(v, float)))
    return 0
