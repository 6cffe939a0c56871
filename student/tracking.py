"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases, Trackio, MLflow.

    deltakd train ... --report-to tensorboard                 # RUN/tensorboard/: tensorboard --logdir RUN
    deltakd train ... --report-to wandb,mlflow --run-name kd-a --project distil

Each tracker is an optional extra (`pip install 'deltakd[tensorboard]'`, `[wandb]`,
`[trackio]`, `[mlflow]`); a missing one is refused before the run starts, with that
command. Only rank 0 reports. metrics.jsonl stays the record; the trackers receive
its scalars on the optimizer-step axis, named as Hugging Face's Trainer names them:
a training line's keys as `train/<key>` (loss, each loss term, lr, grad_norm,
tokens_per_s, peak_mem_mb, eta_s), an evaluation line's `eval_<key>` as `eval/<key>`.
Once per run they also receive the resolved configuration (train_config.json: every
field, the objective string and the resolved weights).

A resumed run continues where its checkpoint is: TensorBoard drops the events after
the checkpoint's step (`purge_step`), as metrics.jsonl drops its lines; W&B, Trackio
and MLflow continue the same run, whose id is kept in RUN/trackers.json. Where a
tracker reads its settings from the environment (WANDB_MODE=offline, WANDB_PROJECT,
MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, TRACKIO_DIR), it still does; --project
takes precedence.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

# tracker -> the module it needs (and the extra that installs it: the same name)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
CHOICES = ("none", *TRACKERS)
IDS_FILE = "trackers.json"


def parse_report_to(value: str) -> tuple[str, ...]:
    """'none' -> (); 'tensorboard,wandb' -> ('tensorboard', 'wandb'); anything else is refused."""
    names = [n.strip().lower() for n in str(value).split(",") if n.strip()]
    bad = [n for n in names if n not in CHOICES]
    if bad or not names:
        raise ValueError(
            f"--report-to {value!r}: choose none or any of {', '.join(TRACKERS)}, comma-separated "
            f"(unknown: {', '.join(bad) or 'nothing given'})"
        )
    if "none" in names and len(names) > 1:
        raise ValueError(f"--report-to {value!r}: 'none' cannot be combined with trackers")
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def require(names: tuple[str, ...]) -> None:
    """Refuse, before any work, trackers whose package is not installed, with the command that installs them."""
    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n]) is None]
    if missing:
        raise ValueError(
            f"--report-to {','.join(missing)}: {' and '.join(TRACKERS[n] for n in missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'deltakd[{','.join(missing)}]'"
        )


def scalars(rec: dict) -> tuple[int, dict[str, float]]:
    """(step, {tracker name: value}) of one metrics.jsonl line; strings, dicts and nulls are not scalars."""
    out = {}
    for k, v in rec.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        out[f"eval/{k.removeprefix('eval_')}" if k.startswith("eval_") else f"train/{k}"] = float(v)
    return int(rec["step"]), out


class TensorBoard:
    def __init__(self, out: Path, name: str, project, config: dict, resume_step, ids: dict):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at or after it (logged before a crash, after the checkpoint) are dropped.
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=purge)
        if resume_step is None:
            self.writer.add_text("objective", config.get("objective", ""), 0)
            self.writer.add_text("config", "```json\n" + json.dumps(config, indent=1) + "\n```", 0)

    def log(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # log steps are rare: a crash loses nothing already in metrics.jsonl

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, out: Path, name: str, project, config: dict, resume_step, ids: dict):
        import wandb

        self.run = wandb.init(
            project=project or os.environ.get("WANDB_PROJECT") or "deltakd",
            name=name,
            id=ids.get("wandb"),
            resume="allow",
            config=config,
            dir=str(out),
        )
        ids["wandb"] = self.run.id

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, out: Path, name: str, project, config: dict, resume_step, ids: dict):
        import trackio

        self.trackio = trackio
        trackio.init(project=project or "deltakd", name=name, config=config, resume="allow")

    def log(self, step: int, values: dict) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


class MLflow:
    def __init__(self, out: Path, name: str, project, config: dict, resume_step, ids: dict):
        import mlflow

        self.mlflow = mlflow
        if project:
            mlflow.set_experiment(project)
        run_id = ids.get("mlflow")
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else name)
        ids["mlflow"] = self.run.info.run_id
        if run_id is None:  # parameters are immutable in MLflow: logged once per run
            try:
                from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit
            except ImportError:
                limit = 500
            mlflow.log_params({k: str(v)[:limit] for k, v in config.items()})
            mlflow.set_tag("objective", config.get("objective", ""))

    def log(self, step: int, values: dict) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio, "mlflow": MLflow}


class Trackers:
    """The trackers of one run (rank 0); `log(rec)` takes a metrics.jsonl line."""

    def __init__(self, names, out: Path, name: str, project, config: dict, resume_step: int | None):
        self.backends = []
        out = Path(out)
        ids_path = out / IDS_FILE
        ids = json.loads(ids_path.read_text()) if resume_step is not None and ids_path.is_file() else {}
        try:
            for n in names:
                try:
                    self.backends.append(BACKENDS[n](out, name, project, config, resume_step, ids))
                except ImportError:
                    raise
                except Exception as e:  # a tracker's own setup error (login, server): one line, with its name
                    raise ValueError(f"--report-to {n}: the tracker did not start ({type(e).__name__}: {e})") from e
        except BaseException:
            self.close()
            raise
        if ids:
            ids_path.write_text(json.dumps(ids) + "\n")

    def log(self, rec: dict) -> None:
        step, values = scalars(rec)
        if values:
            for b in self.backends:
                b.log(step, values)

    def close(self) -> None:
        while self.backends:
            self.backends.pop().close()


class NoTrackers:
    def log(self, rec: dict) -> None:
        pass

    def close(self) -> None:
        pass
