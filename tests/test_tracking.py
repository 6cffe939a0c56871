"""--report-to: every tracker receives metrics.jsonl's scalars on the step axis and the resolved config.

TensorBoard is read back with its own reader. W&B (offline mode), MLflow (a local file store) and
Trackio (a local folder) run where they are installed and are skipped, with the command that
installs them, where they are not.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from conftest import short_run

from deltakd.student import tracking
from deltakd.student.trainer import train


def run_cfg(tiny, cache_dir, out, **kw):
    return short_run(tiny, cache_dir, out, **{"eval_every": 2, **kw})


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(out) -> dict[str, dict[int, float]]:
    """What every tracker must hold: metrics.jsonl's numbers, tag -> {step: value}."""
    want: dict[str, dict[int, float]] = {}
    for rec in metrics(out):
        step, values = tracking.scalars(rec)
        for k, v in values.items():
            want.setdefault(k, {})[step] = v
    return want


def require_or_skip(module: str):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: pip install 'deltakd[{module}]'")


def test_scalar_names_follow_the_hugging_face_trainer():
    step, values = tracking.scalars({"step": 3, "loss": 1.5, "kd": 0.5, "lr": 1e-3, "eta_s": None, "objective": "kd"})
    assert step == 3 and values == {"train/loss": 1.5, "train/kd": 0.5, "train/lr": 1e-3}
    assert tracking.scalars({"step": 4, "eval_kd": 0.25, "eval_tokens": 73})[1] == {"eval/kd": 0.25, "eval/tokens": 73}


def test_unknown_or_missing_trackers_are_refused_with_what_to_do(monkeypatch, tiny, cache_dir, tmp_path):
    assert tracking.parse_report_to("none") == () and tracking.parse_report_to("tensorboard, wandb") == (
        "tensorboard",
        "wandb",
    )
    for bad, match in (("tensorbored", "unknown: tensorbored"), ("none,wandb", "cannot be combined"), ("", "nothing")):
        with pytest.raises(ValueError, match=match):
            run_cfg(tiny, cache_dir, tmp_path / "x", report_to=bad)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"wandb is not installed: pip install 'deltakd\[wandb\]'"):
        train(run_cfg(tiny, cache_dir, tmp_path / "w", report_to="wandb"))
    assert not (tmp_path / "w" / "checkpoints").exists()  # refused before any work


@pytest.fixture(scope="module")
def tb_run(tiny, cache_dir, tmp_path_factory):
    pytest.importorskip("tensorboard", reason="pip install 'deltakd[tensorboard]'")
    out = tmp_path_factory.mktemp("tb") / "run"
    train(run_cfg(tiny, cache_dir, out, report_to="tensorboard"))
    return out


def read_tensorboard(logdir) -> tuple[dict[str, dict[int, float]], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    got = {}
    for tag in tags["scalars"]:
        events = acc.Scalars(tag)
        assert len({e.step for e in events}) == len(events), f"{tag}: a step logged twice"
        got[tag] = {e.step: e.value for e in events}
    return got, set(tags["tensors"])


def assert_same_scalars(got, want):
    assert set(got) == set(want)
    for tag, by_step in want.items():
        assert sorted(got[tag]) == sorted(by_step), tag
        for step, v in by_step.items():
            assert got[tag][step] == pytest.approx(v, rel=1e-6), (tag, step)  # float32 in the event file


def test_tensorboard_holds_the_scalars_of_metrics_jsonl(tb_run):
    got, texts = read_tensorboard(tb_run / "tensorboard")
    want = expected_scalars(tb_run)
    assert {"train/loss", "train/sft", "train/kd", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(want)
    assert {"eval/sft", "eval/kd"} <= set(want) and sorted(want["eval/kd"]) == [2, 4]
    assert_same_scalars(got, want)
    assert {"objective/text_summary", "config/text_summary"} <= texts


def test_a_resumed_run_replaces_the_events_after_its_checkpoint(tb_run, tiny, cache_dir, tmp_path):
    """Killed after step 4 (its events written), resumed from the step-2 checkpoint: each step once, as before."""
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(tb_run / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
    shutil.copytree(tb_run / "tensorboard", out / "tensorboard")  # events of steps 1-4, as a crash would leave
    (out / "metrics.jsonl").write_text((tb_run / "metrics.jsonl").read_text())
    train(run_cfg(tiny, cache_dir, out, report_to="tensorboard"))
    got, _ = read_tensorboard(out / "tensorboard")
    want = expected_scalars(tb_run)
    for tag in ("train/loss", "train/kd", "train/grad_norm", "eval/kd"):
        assert sorted(got[tag]) == sorted(want[tag]), tag
        for step, v in want[tag].items():
            assert got[tag][step] == pytest.approx(v, rel=1e-4), (tag, step)


def read_wandb_log(path: Path) -> list:
    """The protobuf records of an offline run's .wandb file: a LevelDB-style log (32 KiB blocks of chunks with a
    7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last) after a 7-byte ':W&B' file header."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 1 << 15
    assert data[:4] == b":W&B"
    pos, buf, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            records.append(pb.Record.FromString(buf))
            buf = b""
    return records


@pytest.mark.integration  # W&B starts a service process
def test_wandb_offline_run_holds_the_scalars_and_the_config(tiny, cache_dir, tmp_path, monkeypatch):
    require_or_skip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(run_cfg(tiny, cache_dir, out, report_to="wandb", run_name="tiny-kd"))
    import wandb

    wandb.teardown()  # the service process writes the run's log to its end when it stops (at exit for a user)
    (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert json.loads((out / "trackers.json").read_text())["wandb"] in log.name
    got: dict[str, dict[int, float]] = {}
    config = {}
    for r in read_wandb_log(log):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for k, v in row.items():
                if not k.startswith("_"):
                    got.setdefault(k, {})[row.get("_step", r.history.step.num)] = v
        elif kind in ("run", "config"):  # the run record carries the config given to wandb.init
            updates = r.run.config.update if kind == "run" else r.config.update
            config |= {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in updates}
    assert_same_scalars(got, expected_scalars(out))
    assert config["objective"] == "0.5*sft + 0.5*kd (divergence fkl, tail bucket)"
    assert config["resolved_weights"] == {"sft": 0.5, "kd": 0.5} and config["report_to"] == "wandb"


@pytest.mark.integration
def test_mlflow_run_holds_the_scalars_and_params(tiny, cache_dir, tmp_path, monkeypatch):
    require_or_skip("mlflow")
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local test store; MLflow prefers a database
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    out = tmp_path / "run"
    train(run_cfg(tiny, cache_dir, out, report_to="mlflow", max_steps=2, project="deltakd-test"))
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(json.loads((out / "trackers.json").read_text())["mlflow"])
    assert run.data.params["loss"] == "kd" and run.data.tags["objective"].startswith("0.5*sft + 0.5*kd")
    want = expected_scalars(out)
    for tag in ("train/loss", "train/kd", "eval/kd"):
        hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)}
        assert hist == pytest.approx(want[tag]), tag


@pytest.mark.integration
def test_trackio_run_holds_the_scalars(tiny, cache_dir, tmp_path, monkeypatch):
    require_or_skip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    import trackio.sqlite_storage as storage
    import trackio.utils

    monkeypatch.setattr(trackio.utils, "TRACKIO_DIR", tmp_path / "trackio")
    out = tmp_path / "run"
    train(run_cfg(tiny, cache_dir, out, report_to="trackio", max_steps=2, project="deltakd-test", run_name="r1"))
    logs = storage.SQLiteStorage.get_logs("deltakd-test", "r1")
    want = expected_scalars(out)
    for tag in ("train/loss", "eval/kd"):
        got = {row["step"]: row[tag] for row in logs if row.get(tag) is not None}
        assert got == pytest.approx(want[tag]), tag
