"""A hostile or unlucky user against the CLI: one test per class of issue 10.

Each asserts the exit code, the one-line message, and that no file of the cache or
run folder was changed by the refused command (sha256 of every file, lock files aside).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from deltakd.cache.format import schema
from deltakd.cache.format.validate import validate
from deltakd.cli import main
from deltakd.runtime.lock import HOLDER_FILE, is_lock_file

# Launches processes, servers or whole pipelines: the full suite runs it, the quick tier does not.
pytestmark = pytest.mark.integration


def snapshot(folder) -> dict[str, str]:
    """sha256 of every file under `folder` (lock files excluded: they come and go with writers)."""
    root = Path(folder)
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not is_lock_file(p)
    }


def cli(*args) -> tuple[int, str, str]:
    """Run `deltakd ARGS` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("deltakd:")]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


def train_args(tiny, cache, out, *extra):
    return [
        "train",
        "--cache",
        cache,
        "--student",
        tiny["student_base"],
        "--out",
        out,
        "--loss",
        "p1",
        "--max-steps",
        "4",
        "--batch-tokens",
        "256",
        "--log-every",
        "1",
        "--eval-percent",
        "10",
        "--eval-batches",
        "1",
        "--warmup-steps",
        "1",
        "--chunk-rows",
        "13",
        *extra,
    ]


def build_args(tiny, out, *extra, student=True):
    args = [
        "cache",
        "build",
        "--teacher-ft",
        tiny["teacher_ft"],
        "--teacher-base",
        tiny["teacher_base"],
        "--data",
        tiny["data"],
        "--out",
        out,
        "--top-k",
        "16",
        "--max-length",
        "64",
        "--shard-tokens",
        "200",
        "--batch-size",
        "3",
        "--chunk-rows",
        "7",
        *extra,
    ]
    return args + (["--student-base", tiny["student_base"]] if student else [])


@pytest.fixture
def cache_copy(cache_dir, tmp_path):
    dst = tmp_path / "cache"
    shutil.copytree(cache_dir, dst)
    return dst


# ------------------------------------------------------------------ 1. corrupt data
def _first_chunk(cache: Path, sub: str, shard: str, array: str) -> Path:
    return sorted((cache / sub / shard / array / "c").rglob("*"), key=str)[-1]


def _flip(cache):
    p = _first_chunk(cache, schema.TEACHER_DIR, "shard-00001", "logp_base")
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x40
    p.write_bytes(bytes(b))
    return "shard-00001", "logp_base", "checksum"


def _delete(cache):
    _first_chunk(cache, schema.TEACHER_DIR, "shard-00002", "logp_ft").unlink()
    return "shard-00002", "logp_ft", "missing"


def _nan(cache):
    import zarr

    g = zarr.open_group(zarr.storage.LocalStore(str(cache / schema.TEACHER_DIR / "shard-00000")), mode="r+")
    g["tail_ft"][3] = np.nan  # a valid chunk (its crc32c matches), holding a NaN
    return "shard-00000", "tail_ft", "NaN"


def _swap(cache):
    s = cache / schema.STUDENT_DIR
    os.rename(s / "shard-00000", s / "tmp")
    os.rename(s / "shard-00001", s / "shard-00000")
    os.rename(s / "tmp", s / "shard-00001")
    return "shard-0000", None, "swapped"


def _dtype(cache):
    m = json.loads((cache / schema.MANIFEST).read_text())
    m["value_dtype"] = "bfloat16"
    (cache / schema.MANIFEST).write_text(json.dumps(m))
    return "shard-0000", "logp_ft", "stored as float16"  # whichever shard is read first


@pytest.mark.parametrize("damage", [_flip, _delete, _nan, _swap, _dtype])
def test_training_never_reads_corrupt_data_silently(tiny, cache_copy, tmp_path, damage):
    shard, array, what = damage(cache_copy)
    before = snapshot(cache_copy)
    code, _, err = cli(*train_args(tiny, cache_copy, tmp_path / "run", "--max-steps", "40", "--epochs", "1"))
    line = one_error_line(err)
    assert code == 2 and shard in line and what in line and "deltakd cache validate" in line, line
    if array:
        assert f"array {array}" in line or f"/{array}" in line, line
    assert snapshot(cache_copy) == before
    code, _, err = cli("cache", "validate", cache_copy)
    assert code == 1 and shard in err


def test_the_broad_base_figure_reads_the_student_tails_with_the_same_checks(cache_copy):
    """CacheReader.mass_outside (the trainer's broad-base note) names a damaged tail_s0, as a batch read does."""
    import zarr

    from deltakd.cache.format.reader import CacheFormatError, CacheReader

    g = zarr.open_group(zarr.storage.LocalStore(str(cache_copy / schema.STUDENT_DIR / "shard-00001")), mode="r+")
    g["tail_s0"][2] = np.nan
    assert len(CacheReader(cache_copy).mass_outside("s0", shard=0)) > 0  # an undamaged shard reads
    with pytest.raises(CacheFormatError, match=r"shard-00001.*tail_s0.*NaN"):
        CacheReader(cache_copy).mass_outside("s0", shard=1)
    p = _first_chunk(cache_copy, schema.STUDENT_DIR, "shard-00002", "tail_s0")
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x40
    p.write_bytes(bytes(b))
    with pytest.raises(CacheFormatError, match="checksum"):
        CacheReader(cache_copy).mass_outside("s0", shard=2)


def test_validate_checks_totals_dtypes_and_unlisted_shards(cache_copy):
    m = json.loads((cache_copy / schema.MANIFEST).read_text())
    m["totals"]["n_tokens"] += 1
    m["id_dtype"] = "int32"
    (cache_copy / schema.MANIFEST).write_text(json.dumps(m))
    shutil.copytree(cache_copy / schema.TEACHER_DIR / "shard-00000", cache_copy / schema.TEACHER_DIR / "shard-00099")
    problems = "\n".join(validate(cache_copy))
    assert "totals.n_tokens" in problems and "shard-00099" in problems and "stored as uint16" in problems


# ------------------------------------------------------------------ 2. one writer per folder
def _hold_lock(folder):
    code = (
        "import sys, time; from deltakd.runtime.lock import folder_lock\n"
        "with folder_lock(sys.argv[1], 'test holder'):\n    print('locked', flush=True); time.sleep(120)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_one_writer_per_folder(tiny, cache_copy, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holders = [_hold_lock(cache_copy), _hold_lock(run)]
    try:
        before_cache, before_run = snapshot(cache_copy), snapshot(run)
        for args in (
            build_args(tiny, cache_copy),
            ["cache", "add-student", "--cache", cache_copy, "--student-base", tiny["student_base"]],
            train_args(tiny, cache_copy, run),
        ):
            code, _, err = cli(*args)
            line = one_error_line(err)
            assert code == 2 and f"pid {holders[0].pid if args[0] == 'cache' else holders[1].pid}" in line, line
            assert "being written by" in line and socket.gethostname() in line and "test holder" in line
        assert snapshot(cache_copy) == before_cache and snapshot(run) == before_run
    finally:
        for h in holders:
            h.kill()
            h.wait()
    # A holder killed with -9 leaves its record: the next writer takes over, and says so.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / HOLDER_FILE).write_text(
        json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "command": "train", "since": time.time()})
    )
    from deltakd.runtime.lock import folder_lock

    err = io.StringIO()
    with redirect_stderr(err), folder_lock(run, "test"):
        pass
    assert f"taking over the lock of {run} left by pid {int(dead.stdout)}" in err.getvalue()
    assert "no longer running" in err.getvalue() and not (run / HOLDER_FILE).exists()


def test_build_rerun_after_add_student_keeps_the_student(tiny, tmp_path):
    out, other = tmp_path / "c", tmp_path / "c2"
    assert cli(*build_args(tiny, out, student=False))[0] == 0
    assert cli("cache", "add-student", "--cache", out, "--student-base", tiny["student_base"])[0] == 0
    before = snapshot(out / schema.STUDENT_DIR)
    code, _, err = cli(*build_args(tiny, out, student=False))  # the same build command again
    assert code == 0, err
    m = json.loads((out / schema.MANIFEST).read_text())
    assert m["student"] and m["student"]["checkpoint"]["path"] == str(Path(tiny["student_base"]).resolve())
    assert snapshot(out / schema.STUDENT_DIR) == before and validate(out) == []
    # Built with S0, then another student added, then the build re-run: S0's arrays come back, labelled S0.
    # (Draws from πT: a cache whose draws hold π* refuses add-student.)
    teacher = ("--tail-proposal", "teacher")
    assert cli(*build_args(tiny, other, *teacher))[0] == 0
    before = snapshot(other / schema.STUDENT_DIR)
    assert cli("cache", "add-student", "--cache", other, "--student-base", tiny["teacher_base"])[0] == 0
    assert snapshot(other / schema.STUDENT_DIR) != before
    code, _, err = cli(*build_args(tiny, other, *teacher))
    assert code == 0, err
    m = json.loads((other / schema.MANIFEST).read_text())
    assert m["student"]["checkpoint"]["path"] == str(Path(tiny["student_base"]).resolve())
    assert snapshot(other / schema.STUDENT_DIR) == before and validate(other) == []


# ------------------------------------------------------------------ 3. resume and identity
def test_resume_checks_cache_identity_and_finished_runs_change_nothing(tiny, cache_copy, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli(*train_args(tiny, cache_copy, run, "--max-steps", "2"))
    assert code == 0, err
    before = snapshot(run)
    code, out, err = cli(*train_args(tiny, cache_copy, run, "--max-steps", "2"))
    assert code == 0 and "already finished" in out and snapshot(run) == before
    # An interrupted run (no final/) over a cache rebuilt at the same path is refused.
    shutil.rmtree(run / "final")
    before = snapshot(run)
    m = json.loads((cache_copy / schema.MANIFEST).read_text())
    m["summary"]["rebuilt"] = True
    (cache_copy / schema.MANIFEST).write_text(json.dumps(m))
    code, _, err = cli(*train_args(tiny, cache_copy, run, "--max-steps", "2"))
    line = one_error_line(err)
    assert code == 2 and "trained from another cache" in line and snapshot(run) == before


def test_student_other_than_the_cache_student_base(tiny, cache_dir, tmp_path):
    # teacher_base shares the tokenizer, so only the student-base check can object.
    args = [
        "train",
        "--cache",
        cache_dir,
        "--student",
        tiny["teacher_base"],
        "--loss",
        "p1",
        "--batch-tokens",
        "256",
        "--eval-percent",
        "10",
        "--dry-run",
    ]
    code, _, err = cli(*args, "--out", tmp_path / "a")
    assert code == 0 and "WARNING: the student" in err and "add-student" in err
    code, _, err = cli(*args, "--out", tmp_path / "b", "--strict")
    line = one_error_line(err)
    assert code == 2 and "piS0" in line and not (tmp_path / "b").exists()
    code, _, err = cli(*args, "--out", tmp_path / "c", "--loss", "kd")  # KD does not use piS0: no warning
    assert code == 0 and "WARNING" not in err


# ------------------------------------------------------------------ 4. strict options
@pytest.mark.parametrize(
    "opts,match",
    [
        (["--alpha", "nan"], "alpha (--alpha) must be a finite number"),
        (["--lr", "inf"], "lr (--lr) must be a finite number"),
        (["--max-steps", "-1"], "max_steps (--max-steps) must be >= 1"),
        (["--max-steps", "0"], "max_steps (--max-steps) must be >= 1"),
        (["--clip", "-1"], "clip (--clip) must be >= 0"),
        (["--warmup-steps", "-3"], "warmup_steps (--warmup-steps) must be >= 0"),
        (["--save-every", "0"], "save_every (--save-every) must be >= 1"),
        (["--log-every", "0"], "log_every (--log-every) must be >= 1"),
        (["--temperature", "0"], "temperature (--temperature) must be > 0"),
        (["--w-kd", "-1"], "w_kd (--w-kd) must be >= 0"),
    ],
)
def test_strict_options(tiny, cache_dir, tmp_path, opts, match):
    code, _, err = cli(*train_args(tiny, cache_dir, tmp_path / "r"), *opts)
    line = one_error_line(err)
    assert code == 2 and match in line, line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "text,match",
    [
        ('bf16 = "false"\n', "bf16 (--bf16) must be true or false, got the string 'false'"),
        ("max_steps = 2.5\n", "max_steps (--max-steps) must be a whole number, got 2.5"),
        ('alpha = "one"\n', "alpha (--alpha) must be a number"),
        ("lerning_rate = 1\n", "unknown config field(s): lerning_rate"),
    ],
)
def test_config_files_are_type_checked(tiny, cache_dir, tmp_path, text, match):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'cache = "{cache_dir}"\nstudent = "{tiny["student_base"]}"\nout = "{tmp_path / "r"}"\n' + text)
    code, _, err = cli("train", "--config", cfg)
    line = one_error_line(err)
    assert code == 2 and match in line and str(cfg) in line, line
    code, _, err = cli("train", "--config", tmp_path / "missing.toml")
    assert code == 2 and "no such file" in one_error_line(err)


@pytest.mark.parametrize(
    "raw,match",
    [
        (
            b'{"prompt": "a", "response": "b"}\n{"messages": [{"role": 1, "content": "x"}, '
            b'{"role": "assistant", "content": "y"}]}\n',
            "train.jsonl:2: messages[0].role must be a string",
        ),
        (
            b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": ["b"]}\n',
            "train.jsonl:2: 'response' must be a string",
        ),
        (b'{"prompt": "a", "response": "b"}\n\n{"prompt": "caf\xe9", "response": "b"}\n', "train.jsonl:3: not UTF-8"),
    ],
)
def test_bad_records_name_file_and_line(tiny, tmp_path, raw, match):
    data = tmp_path / "train.jsonl"
    data.write_bytes(raw)
    args = build_args(tiny, tmp_path / "c")
    args[args.index("--data") + 1] = str(data)
    code, _, err = cli(*args)
    line = one_error_line(err)
    assert code == 2 and match in line, line
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------ 5. no tracebacks
def test_no_tracebacks_for_what_users_do(tiny, cache_copy, tmp_path, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    before = snapshot(cache_copy)
    cases = [
        (build_args(tiny, a_file), "is a file, not a folder"),
        (train_args(tiny, cache_copy, a_file), "is a file, not a folder"),
        (train_args(tiny, cache_copy, tmp_path / "r", "--config", tmp_path / "nope.toml"), "no such file"),
        (["train", "--cache", cache_copy, "--student", "runs/typo/student", "--out", tmp_path / "r"], "no such folder"),
        (["train", "--cache", cache_copy, "--student", "./s0", "--out", tmp_path / "r"], "no such folder"),
        (build_args(tiny, tmp_path / "c", "--teacher-ft", "runs/ft"), "no such checkpoint folder"),
        (["cache", "inspect", cache_copy, "--example", "9999"], "--example 9999: the cache holds"),
        (["cache", "inspect", cache_copy, "--example", "-1"], "--example -1: the cache holds"),
        (
            ["cache", "add-student", "--cache", tmp_path / "nocache", "--student-base", tiny["student_base"]],
            "no such folder",
        ),
    ]
    for args, match in cases:
        code, _, err = cli(*args)
        line = one_error_line(err)
        assert code == 2 and match in line, (args, line)
    assert not (tmp_path / "r").exists() and not (tmp_path / "nocache").exists() and a_file.read_text() == "x"
    # A read-only folder (root ignores permissions, so the refusal of the OS is simulated then).
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        from deltakd.runtime import lock

        def denied(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

        monkeypatch.setattr(lock, "open_lock_file", denied)
    else:
        ro.chmod(0o555)
    code, _, err = cli(*train_args(tiny, cache_copy, ro))
    assert code == 2 and "is not writable (permission denied)" in one_error_line(err)
    monkeypatch.undo()
    assert snapshot(cache_copy) == before


def test_full_disk_names_the_path_and_the_space_needed_and_resumes(tiny, tmp_path, monkeypatch):
    out = tmp_path / "c"
    real = schema.write_group
    calls = []

    def full(group_dir, arrays):
        calls.append(group_dir)
        if len(calls) > 2:  # two shards fit, the third does not
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(group_dir) / "logp_ft" / "c" / "0"))
        real(group_dir, arrays)

    monkeypatch.setattr(schema, "write_group", full)
    code, _, err = cli(*build_args(tiny, out))
    line = one_error_line(err)
    assert code == 2 and "no space left on the device while writing" in line and str(out) in line, line
    assert "the next shard needs up to" in line and "B are free" in line
    monkeypatch.setattr(schema, "write_group", real)
    code, _, err = cli(*build_args(tiny, out))  # space freed: the same command resumes
    assert code == 0, err
    assert validate(out) == []


# ------------------------------------------------------------------ 6. graceful stops
def _train_cmd(tiny, cache, out):
    return [
        sys.executable,
        "-m",
        "deltakd.cli",
        *map(str, train_args(tiny, cache, out, "--max-steps", "6", "--save-every", "100", "--grad-accum", "2")),
    ]


@pytest.fixture(scope="module")
def reference_run(tiny, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    res = subprocess.run(_train_cmd(tiny, cache_dir, out), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def _metrics(run):
    return [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_train_stops_gracefully_and_resumes_exactly(tiny, cache_dir, tmp_path, reference_run, sig):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _train_cmd(tiny, cache_dir, run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    for line in proc.stdout:
        if line.startswith("step=2 "):
            proc.send_signal(sig)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    line = [l for l in err.splitlines() if "stopped by" in l]
    assert len(line) == 1 and "checkpoint saved" in line[0] and "Traceback" not in err, err[-2000:]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts and ckpts[-1] >= "step-000002" and not (run / "final").exists()
    assert not (run / HOLDER_FILE).exists()
    res = subprocess.run(_train_cmd(tiny, cache_dir, run), capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = [m for m in _metrics(reference_run) if "loss" in m], [m for m in _metrics(run) if "loss" in m]
    assert [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b):
        for key in ("loss", "p1", "grad_norm", "lr"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)


def test_build_stops_gracefully_and_resumes(tiny, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "c"
    assert cli(*build_args(tiny, ref))[0] == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "deltakd.cli", *map(str, build_args(tiny, out))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(out.glob("shards/shard-?????")):
        time.sleep(0.01)
    assert proc.poll() is None, "the build finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert (
        "cache build stopped by SIGTERM" in err and "run the same command to resume" in err and "Traceback" not in err
    )
    assert 1 <= len(list(out.glob("shards/shard-?????"))) < len(list(ref.glob("shards/shard-?????")))
    assert not list(out.rglob("*.partial")) and not (out / schema.MANIFEST).exists()
    code, _, err = cli(*build_args(tiny, out))
    assert code == 0, err
    ca, cb = snapshot(ref / schema.TEACHER_DIR), snapshot(out / schema.TEACHER_DIR)
    assert ca == cb and validate(out) == []
