"""`deltakd train`: train a student from a cache (no teacher in memory).

deltakd train --cache CACHE --student S0 --out RUN --loss p1 --alpha 1.0 --max-steps 200
deltakd train --config run.toml [--lr 1e-4 ...]   # options override the file
deltakd train ... --dry-run                        # check, one step, peak memory, exit
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

from deltakd.dataclass_args import add_dataclass_args, config_from_args


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--config {path}: not UTF-8 text") from e
    try:
        data = _parse_config(p, text)
    except (ValueError, ImportError) as e:
        raise ValueError(f"--config {path}: {e}") from e
    except Exception as e:  # the YAML parser's own errors
        raise ValueError(f"--config {path}: cannot parse ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a table of fields, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _parse_config(p: Path, text: str):
    if p.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ImportError("YAML configs need pyyaml: pip install 'deltakd[yaml]' (or use TOML)") from e
        data = yaml.safe_load(text) or {}
    elif p.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError("config files end in .toml, .yaml, .yml or .json")
    return data


def _checkpoint_need(cfg, path) -> str:
    """Disk space of one more checkpoint: weights + AdamW's two moments (float32), plus the final export."""
    import shutil

    weights = sum(f.stat().st_size for f in Path(cfg.student).glob("*.safetensors")) or sum(
        f.stat().st_size for f in Path(cfg.student).glob("*.bin")
    )
    need = 4 * weights
    free = shutil.disk_usage(next((p for p in Path(path).parents if p.exists()), Path("."))).free
    return f"; a checkpoint needs about {need / 2**20:.1f} MB, {free / 2**20:.0f} MB are free"


def register(sub) -> None:
    from deltakd.student.trainer import TrainConfig

    p = sub.add_parser("train", help="train a student from a cache")
    p.add_argument("--config", help="TOML/YAML/JSON file with the same fields (underscored names)")
    add_dataclass_args(p, TrainConfig)
    p.set_defaults(func=_train)


def _train(ns) -> int:
    from deltakd.student.trainer import TrainConfig, train

    base = load_config_file(ns.config) if ns.config else {}
    cfg = config_from_args(TrainConfig, ns, base, source=ns.config)
    try:
        res = train(cfg)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            e.deltakd_need = _checkpoint_need(cfg, e.filename or cfg.out)
        raise
    if res.get("already_finished"):
        print(
            f"{cfg.out} is already finished: the final student is in {Path(cfg.out) / 'final'}; nothing was "
            "changed (use another --out to train again)"
        )
    elif cfg.dry_run:
        print(json.dumps(res, indent=1))
    else:
        print(
            f"final student: {Path(cfg.out) / 'final'}  "
            + " ".join(f"{k}={v:.4g}" for k, v in res.items() if isinstance(v, float))
        )
    return 0
