"""Caches in object storage: build, kill -9, resume, train, validate against a real S3 server
(moto in server mode on 127.0.0.1, started and stopped by these tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("upath")
moto_server = pytest.importorskip("moto.server")

from deltakd.cache.format.reader import CacheReader  # noqa: E402
from deltakd.cache.format.validate import validate  # noqa: E402

# Launches processes, servers or whole pipelines: the full suite runs it, the quick tier does not.
pytestmark = pytest.mark.integration

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "deltakd-test",
    "AWS_SECRET_ACCESS_KEY": "deltakd-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3(monkeypatch_module=None):
    """A bucket on a local S3-compatible server; the environment points boto/s3fs at it."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("deltakd-test")
    yield "s3://deltakd-test"
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _build_args(tiny, out, **kw):
    # A few shards (the test kills the build after the first commits; ~4 here): each shard is
    # dozens of objects, and the local S3 server makes every object a round trip.
    opts = {"top_k": 8, "max_length": 64, "batch_size": 2, "shard_tokens": 300, "chunk_rows": 7, **kw}
    args = [
        sys.executable,
        "-m",
        "deltakd.cli",
        "cache",
        "build",
        "--teacher-ft",
        tiny["teacher_ft"],
        "--teacher-base",
        tiny["teacher_base"],
        "--student-base",
        tiny["student_base"],
        "--data",
        tiny["data"],
        "--out",
        str(out),
    ]
    for key, v in opts.items():
        args += ["--" + key.replace("_", "-"), str(v)]
    return args


def shard_arrays(root) -> dict:
    r = CacheReader(root)
    out = {}
    for n in r.shard_names:
        for key, v in r.read_shard(n).arrays.items():
            out[f"{n}/{key}"] = v.numpy()
    return out


def test_build_kill_resume_train_validate_in_s3(tiny, tmp_path, s3):
    import s3fs

    local = tmp_path / "local"
    assert subprocess.run(_build_args(tiny, local), capture_output=True).returncode == 0
    url = f"{s3}/caches/c1"
    proc = subprocess.Popen(_build_args(tiny, url), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    fs = s3fs.S3FileSystem()
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        fs.invalidate_cache()
        if fs.glob(f"{url[5:]}/shards/*/shard.json"):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed: " + proc.stderr.read().decode()[-800:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fs.invalidate_cache()
    assert not fs.exists(f"{url[5:]}/manifest.json")
    res = subprocess.run(_build_args(tiny, url), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    # The same content as a build on a local disk.
    a, b = shard_arrays(local), shard_arrays(url)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert validate(url) == []
    # Train a few steps straight from the bucket.
    out = tmp_path / "run"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltakd.cli",
            "train",
            "--cache",
            url,
            "--student",
            tiny["student_base"],
            "--out",
            str(out),
            "--loss",
            "p1",
            "--max-steps",
            "2",
            "--batch-tokens",
            "256",
            "--eval-batches",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "final" / "model.safetensors").exists()
    # Inspect and add-student work on the bucket too.
    res = subprocess.run(
        [sys.executable, "-m", "deltakd.cli", "cache", "inspect", url, "--json"], capture_output=True, text=True
    )
    assert res.returncode == 0 and '"bytes_per_supervised_token"' in res.stdout, res.stderr[-1000:]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltakd.cli",
            "cache",
            "add-student",
            "--cache",
            url,
            "--student-base",
            tiny["teacher_base"],
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    m = CacheReader(url).manifest
    assert m["student"]["checkpoint"]["path"].endswith("teacher_base") and validate(url) == []
    # A flipped byte in one object is caught, with the shard and array named.
    chunk = sorted(fs.glob(f"{url[5:]}/shards/shard-00001/logp_base/c/*"))[0]
    data = bytearray(fs.cat_file(chunk))
    data[len(data) // 2] ^= 0x40
    fs.pipe_file(chunk, bytes(data))
    problems = validate(url)
    assert problems and "shard-00001" in problems[0] and "logp_base" in problems[0]
    res = subprocess.run(
        [sys.executable, "-m", "deltakd.cli", "cache", "validate", url], capture_output=True, text=True
    )
    assert res.returncode == 1 and "shard-00001" in res.stderr
