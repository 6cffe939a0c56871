"""Caches in object storage: build, kill -9, resume, train, validate against a real S3 server
(moto in server mode on 127.0.0.1, started and stopped by these tests); network faults through
a proxy that drops connections on purpose (fault_proxy.py); one writer per URL across hosts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from fault_proxy import FaultProxy  # tests/ is on sys.path (pytest's rootdir-relative import mode)

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
    # Draws from πT: the test adds another student base later, which a cache whose draws hold π* refuses.
    opts = {
        "top_k": 8,
        "max_length": 64,
        "batch_size": 2,
        "shard_tokens": 300,
        "chunk_rows": 7,
        "tail_proposal": "teacher",
        **kw,
    }
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


# ------------------------------------------------------------------ network faults, one writer per URL
def _small_build(tiny, out) -> list[str]:
    """A build of two shards without a student: the least that shows a fault in the middle."""
    args = [sys.executable, "-m", "deltakd.cli", "cache", "build", "--teacher-ft", tiny["teacher_ft"]]
    args += ["--teacher-base", tiny["teacher_base"], "--data", tiny["data"], "--out", str(out), "--top-k", "4"]
    return args + ["--max-length", "64", "--batch-size", "4", "--shard-tokens", "600", "--tail-samples", "0"]


def _host(tmp_path, name: str, endpoint: str, **env) -> dict:
    """The environment of a process on its own "host": its own temp folder (local locks, stage)."""
    tmp = tmp_path / name
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "AWS_ENDPOINT_URL": endpoint, "TMPDIR": str(tmp), "PYTHONFAULTHANDLER": "1", **env}


def _wait(cond, proc, what: str, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        assert proc.poll() is None, f"ended before {what}: " + proc.stderr.read()[-2000:]
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _finish(proc, timeout: float) -> str:
    """The stderr of a process that must end within `timeout`; else its threads' stacks (faulthandler)."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGABRT)  # PYTHONFAULTHANDLER=1: every thread's stack on stderr
        raise AssertionError("still running: " + proc.communicate()[1][-6000:]) from None


def _one_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("deltakd: error:")]
    assert len(lines) == 1 and "Traceback" not in err and "never awaited" not in err, err[-3000:]
    return lines[0]


def test_two_hosts_one_url_and_a_network_drop(tiny, tmp_path, s3):
    """Builder A (through a proxy) and builder B (another temp folder: another host) write one URL.
    B is refused while A lives; the network drops under A: one line, exit 2; B takes over A's
    lease and resumes, through a short drop of its own, to the cache an uninterrupted build makes."""
    import s3fs

    from deltakd.cache.build.builder import CacheBuildConfig, build_cache

    url = f"{s3}/caches/net"
    key = f"{url[5:]}/.deltakd.lease.json"
    fs = s3fs.S3FileSystem()  # straight to the server, past the proxy
    proxy = FaultProxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    quick = {"DELTAKD_STORE_RETRY_S": "2", "DELTAKD_STORE_TIMEOUT_S": "3"}
    a = subprocess.Popen(
        _small_build(tiny, url),
        env=_host(tmp_path, "host-a", proxy.url, **quick),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait(lambda: fs.invalidate_cache() or fs.exists(key), a, "A's lease")
        os.kill(a.pid, signal.SIGSTOP)  # A is alive but slow: it must not finish while B asks
        b = subprocess.run(
            _small_build(tiny, url),
            env=_host(tmp_path, "host-b", os.environ["AWS_ENDPOINT_URL"]),
            capture_output=True,
            text=True,
        )
        os.kill(a.pid, signal.SIGCONT)
        line = _one_line(b.stderr)
        assert b.returncode == 2 and f"{url} is being written by pid {a.pid}" in line and "(cache build," in line, line
        # The network drops under A once it has committed a shard.
        _wait(lambda: fs.invalidate_cache() or fs.exists(f"{url[5:]}/shards/shard-00000/shard.json"), a, "a commit")
        proxy.cut()
        err = _finish(a, 120)
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
            a.kill()
            a.wait()
    line = _one_line(err)
    assert a.returncode == 2 and "cache build: the object store did not answer while" in line, line
    assert url in line and "run the same command again to resume" in line, line
    fs.invalidate_cache()
    assert fs.exists(key) and not fs.exists(f"{url[5:]}/manifest.json")  # A could not give its lease back
    # B again (through the proxy now): A no longer runs, so its lease is taken over at once; a drop
    # of a second while B writes is retried away.
    proxy.restore()
    b = subprocess.Popen(
        _small_build(tiny, url),
        env=_host(tmp_path, "host-b", proxy.url, DELTAKD_STORE_RETRY_S="60", DELTAKD_STORE_TIMEOUT_S="3"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait(lambda: f'"pid": {b.pid},' in (fs.invalidate_cache() or fs.cat_file(key).decode()), b, "B's lease")
        proxy.cut()
        time.sleep(1)
        proxy.restore()
        err = _finish(b, 300)
    finally:
        if b.poll() is None:
            b.kill()
    assert b.returncode == 0, err[-3000:]
    assert f"taking over the lease of {url} from pid {a.pid}" in err and "no longer running" in err, err[-2000:]
    proxy.close()
    local = tmp_path / "local"
    build_cache(
        CacheBuildConfig(
            teacher_ft=tiny["teacher_ft"],
            teacher_base=tiny["teacher_base"],
            data=tiny["data"],
            out=str(local),
            top_k=4,
            max_length=64,
            batch_size=4,
            shard_tokens=600,
            tail_samples=0,
        )
    )
    x, y = shard_arrays(local), shard_arrays(url)
    assert sorted(x) == sorted(y) and len({k.split("/")[0] for k in x}) == 2  # two shards: one by A, one by B
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    fs.invalidate_cache()
    assert validate(url) == [] and not fs.exists(key)  # the lease is given back at the end


def test_an_unreachable_store_is_one_line_for_every_verb(tiny, tmp_path, s3, monkeypatch, capsys):
    """Wrong port: every verb that reads or writes the store says so in one line, exit 2, quickly."""
    import socket

    import s3fs

    from deltakd.cli import main

    with socket.socket() as sock:  # a port nobody listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("DELTAKD_STORE_RETRY_S", "0.5")
    s3fs.S3FileSystem.clear_instance_cache()  # filesystems made for the live endpoint
    url = f"{s3}/caches/unreachable"
    t0 = time.time()
    verbs = {
        "cache validate": ["cache", "validate", url],
        "cache inspect": ["cache", "inspect", url, "--json"],
        "cache add-student": ["cache", "add-student", "--cache", url, "--student-base", tiny["student_base"]],
        "cache build": _small_build(tiny, url)[3:],
        "train": ["train", "--cache", url, "--student", tiny["student_base"], "--out", str(tmp_path / "run")],
    }
    for verb, args in verbs.items():
        assert main(args) == 2, verb
        line = _one_line(capsys.readouterr().err)
        assert line.startswith(f"deltakd: error: {verb}: the object store did not answer while"), line
        assert "connection refused" in line and "after retrying for 0.5 s" in line and url in line, line
    assert time.time() - t0 < 60
    s3fs.S3FileSystem.clear_instance_cache()


def test_throttling_is_retried_then_one_line(s3, monkeypatch, capsys):
    """503 SlowDown for a while is waited out; for longer than the budget it is one line, exit 2."""
    import threading

    import s3fs

    from deltakd.cli import main

    proxy = FaultProxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("DELTAKD_STORE_RETRY_S", "5")
    s3fs.S3FileSystem.clear_instance_cache()
    url = f"{s3}/caches/throttled"
    proxy.busy()
    threading.Timer(1.0, proxy.restore).start()
    assert main(["cache", "validate", url]) == 1  # answered after the throttling: no cache there
    assert "no manifest.json" in capsys.readouterr().err
    monkeypatch.setenv("DELTAKD_STORE_RETRY_S", "0.5")
    s3fs.S3FileSystem.clear_instance_cache()
    proxy.busy()
    assert main(["cache", "validate", url]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "the server answered" in line and "503" in line and url in line, line
    proxy.close()
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_stale_lease_is_taken_over_and_its_holder_stops(s3, monkeypatch, capsys):
    import json
    import socket

    import s3fs

    from deltakd.runtime.lease import Lease, check_held, url_lease
    from deltakd.runtime.lock import LockedError

    s3fs.S3FileSystem.clear_instance_cache()
    # The server's clock counts whole seconds, so a lease written just now can look up to 1 s old, and a
    # loaded machine adds more before the check: 3 s keeps the fresh lease fresh.
    monkeypatch.setenv("DELTAKD_LEASE_TTL_S", "3")
    url = f"{s3}/caches/lease"
    key = f"{url[5:]}/.deltakd.lease.json"
    fs = s3fs.S3FileSystem()
    other = {"host": "other-host", "pid": 4242, "command": "cache build", "since": time.time(), "token": "x"}
    fs.pipe_file(key, json.dumps(other).encode())
    with pytest.raises(LockedError, match="being written by pid 4242 on host other-host .cache build"):
        Lease(url, "cache build").acquire()
    time.sleep(4.5)  # not renewed for longer than the TTL (the server's clock counts whole seconds)
    with url_lease(url, "cache build") as mine:
        assert "taking over the lease" in capsys.readouterr().err
        assert json.loads(fs.cat_file(key))["host"] == socket.gethostname()
        check_held()  # renewed in the background, and still ours
        time.sleep(1)
        check_held()
        # Another writer takes it over (as it may once ours was not renewed): the next renewal
        # finds out, and this writer commits nothing more.
        fs.pipe_file(key, json.dumps(other).encode())
        time.sleep(3 * mine.interval)
        with pytest.raises(LockedError, match="was taken over by pid 4242 on host other-host"):
            check_held()
    assert json.loads(fs.cat_file(key))["host"] == "other-host"  # not deleted: it is not ours
    fs.rm(key)


@pytest.mark.slow  # a torchrun launch: -m slow
def test_every_rank_reports_an_unreachable_store(tiny, tmp_path, s3):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{dead}", "DELTAKD_STORE_RETRY_S": "0.5"}
    env |= {"DELTAKD_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
        + ["-m", "deltakd.cli", "train", "--cache", f"{s3}/caches/unreachable", "--student", tiny["student_base"]]
        + ["--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = [l for l in res.stderr.splitlines() if l.startswith("deltakd: error: train: the object store did not")]
    assert res.returncode != 0 and len(lines) == 2, res.stderr[-3000:]
    assert "never awaited" not in res.stderr


def test_a_dropped_requests_leftover_task_is_not_printed_and_other_errors_are(caplog):
    """aiohttp's body-writing task of a dropped request ends with the network fault nobody retrieves; the
    request's retry loop has met it, so asyncio's "never retrieved" record of it is dropped. Any other
    unhandled exception, or the same fault reported otherwise, still reaches the log."""
    import asyncio
    import logging

    import aiohttp

    from deltakd.runtime import remote

    remote.quiet_dropped_requests()
    remote.quiet_dropped_requests()  # once is enough, twice adds nothing
    assert logging.getLogger("asyncio").filters.count(remote._DROPPED) == 1
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level("ERROR", logger="asyncio"):
            drop = aiohttp.ClientConnectionResetError("Cannot write to closing transport")
            loop.call_exception_handler({"message": "Task exception was never retrieved", "exception": drop})
            assert not caplog.records
            loop.call_exception_handler({"message": "Task exception was never retrieved", "exception": ValueError()})
            loop.call_exception_handler({"message": "Exception in callback", "exception": drop})
            assert len(caplog.records) == 2
    finally:
        loop.close()
