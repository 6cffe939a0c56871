"""Multi-process training on CPU: rank->device resolution, collectives on the right device,
DDP and FSDP2 equal one process, FSDP resume, tied embeddings, per-rank reading."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import same_batches

from deltakd.cache.format.reader import CacheReader
from deltakd.runtime import dist
from deltakd.student.data import StreamingLoader

# Launches processes, servers or whole pipelines: the full suite runs it, the quick tier does not.
pytestmark = pytest.mark.integration

GUARD = str(Path(__file__).parent / "collective_guard.py")
ENV = {**os.environ, "DELTAKD_BACKEND": "gloo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------- rank -> device
@pytest.fixture
def fake_gpus(monkeypatch):
    """Eight fake GPUs: torch.cuda answers as on a GPU node; set_device calls are recorded."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    for k in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    return current


def torchrun_env(monkeypatch, local_rank, local_world, rank=None, world=None):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.setenv("RANK", str(local_rank if rank is None else rank))
    monkeypatch.setenv("WORLD_SIZE", str(local_world if world is None else world))


def test_a_rank_computes_on_its_local_gpu(fake_gpus, monkeypatch):
    torchrun_env(monkeypatch, 3, 8, rank=11, world=16)
    assert dist.resolve_device("cuda") == torch.device("cuda", 3)
    assert fake_gpus == [torch.device("cuda", 3)]  # made current before any model or group
    assert dist.resolve_device("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(ValueError, match="pass --device cuda"):
        dist.resolve_device("cuda:0")  # two ranks of a node on one GPU
    assert dist.resolve_device("cpu") == torch.device("cpu")
    assert len(fake_gpus) == 2


def test_a_single_process_may_name_any_gpu(fake_gpus, monkeypatch):
    assert dist.resolve_device("cuda") == torch.device("cuda", 0)
    assert dist.resolve_device("cuda:5") == torch.device("cuda", 5)
    assert fake_gpus[-1] == torch.device("cuda", 5)
    with pytest.raises(ValueError, match="only 8 GPU"):
        dist.resolve_device("cuda:8")
    torchrun_env(monkeypatch, 0, 1)  # torchrun with one process per node: cuda:N is still fine
    assert dist.resolve_device("cuda:6") == torch.device("cuda", 6)
    with pytest.raises(ValueError, match="use cpu, cuda or cuda:N"):
        dist.resolve_device("mps")


def test_no_gpu_is_refused_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        dist.resolve_device("cuda")


def test_the_group_has_a_backend_for_gpu_and_cpu_tensors(fake_gpus, monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw)
    )
    monkeypatch.delenv("DELTAKD_BACKEND", raising=False)
    torchrun_env(monkeypatch, 1, 2)
    assert dist.init("cuda") == (0, 1)  # the fake group reports no ranks; what matters is how it was made
    assert seen == {"backend": "cpu:gloo,cuda:nccl", "device_id": torch.device("cuda", 1)}
    assert fake_gpus == [torch.device("cuda", 1)]  # set before the group exists
    seen.clear()
    dist.init("cpu")
    assert seen == {"backend": "gloo"}


def test_the_collective_guard_can_fail():
    import collective_guard  # tests/ is on sys.path (pytest's rootdir-relative import mode)

    ok = collective_guard.guard("all_reduce", lambda t: t, torch.device("cpu"))
    ok(torch.zeros(1))
    with pytest.raises(AssertionError, match="NCCL needs cpu"):
        ok(torch.zeros(1, device="meta"))
    wants_gpu = collective_guard.guard("all_reduce", lambda t: t, torch.device("cuda", 1))
    with pytest.raises(AssertionError, match="got a tensor on cpu; NCCL needs cuda:1"):
        wants_gpu(torch.zeros(1))


# ---------------------------------------------------------------- DDP / FSDP == one process
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(out) -> list[dict]:
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def tied_student(tiny, tmp_path_factory):
    """A student whose output layer is its input embedding (as SmolLM2's)."""
    from transformers import AutoTokenizer

    from deltakd.demo.tiny import save_checkpoint, tiny_llama

    tok = AutoTokenizer.from_pretrained(tiny["student_base"])
    m = tiny_llama(len(tok), hidden=32, seed=4, tokenizer=tok, tie=True)
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
    return save_checkpoint(m, tok, tmp_path_factory.mktemp("tied") / "s")


# SFT and P1 train the tied student, KD the untied one: every mode sees both.
LOSSES = {"sft": "tied", "kd": "untied", "p1": "tied"}


def _args(tiny, cache_dir, tied_student, loss, out, grad_accum, extra=()):
    student = tied_student if LOSSES[loss] == "tied" else tiny["student_base"]
    return [
        "train",
        "--cache",
        cache_dir,
        "--student",
        student,
        "--loss",
        loss,
        "--max-steps",
        "4",
        "--batch-tokens",
        "256",
        "--log-every",
        "1",
        "--save-every",
        "2",
        "--eval-percent",
        "10",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "1",
        "--grad-accum",
        str(grad_accum),
        "--out",
        str(out),
        *extra,
    ]


def _two_ranks(args, log_dir, **kw):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_port()),
        GUARD,
        str(log_dir),
        *args,
    ]


@pytest.fixture(scope="module")
def runs(tiny, cache_dir, tied_student, tmp_path_factory):
    """Finished runs by (mode, loss), made on first use: 'one' is one process accumulating 2 micro-batches."""
    root, done = tmp_path_factory.mktemp("runs"), {}

    def get(mode: str, loss: str) -> Path:
        if (mode, loss) not in done:
            out = root / f"{mode}-{loss}"
            if mode == "one":
                cmd = [sys.executable, "-m", "deltakd.cli", *_args(tiny, cache_dir, tied_student, loss, out, 2)]
            else:
                cmd = _two_ranks(
                    _args(tiny, cache_dir, tied_student, loss, out, 1, ["--parallel", mode]),
                    root / f"guard-{mode}-{loss}",
                )
            res = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
            assert res.returncode == 0, res.stderr[-4000:]
            done[mode, loss] = out
        return done[mode, loss]

    return get


# Each case is three process launches; the default suite keeps one tied and one untied
# student per engine (with test_trainer's 2-rank kd+p3 run), the rest run with -m slow.
CASES = [
    pytest.param(m, l, marks=[pytest.mark.slow] if (m, l) in {("ddp", "sft"), ("ddp", "kd"), ("fsdp", "sft")} else [])
    for m in ("ddp", "fsdp")
    for l in LOSSES
]


@pytest.mark.parametrize("mode,loss", CASES)
def test_two_ranks_equal_one_process(runs, mode, loss):
    one, two = runs("one", loss), runs(mode, loss)
    a = [m for m in _metrics(one) if "loss" in m]
    b = [m for m in _metrics(two) if "loss" in m]
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", loss, "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-7), (mode, loss, x["step"], key)
    assert [m for m in _metrics(one) if "eval_tokens" in m][-1]["eval_tokens"] > 0
    wa, wb = _weights(one), _weights(two)
    assert set(wa) == set(wb)  # a tied student is exported tied (no separate lm_head.weight)
    assert ("lm_head.weight" in wa) == (LOSSES[loss] == "untied")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{mode} {loss} {k}: {m}")
    for rank in (0, 1):  # our own collectives ran, each on the device NCCL would need (else the run failed)
        calls = json.loads((two.parent / f"guard-{mode}-{loss}" / f"rank{rank}.json").read_text())
        assert calls.get("all_reduce", 0) >= 4 * 3


def test_fsdp_checkpoint_is_sharded_and_final_export_loads(runs):
    from transformers import AutoModelForCausalLM

    out = runs("fsdp", "p1")
    ck = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert sorted(p.name for p in (ck / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (ck / "model.safetensors").exists()
    m = AutoModelForCausalLM.from_pretrained(out / "final")
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once. torchrun's agent starts the ranks in
    sessions of their own, so killing its process group alone leaves them to finish the run."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    for p in reversed(found):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_killed_fsdp_run_resumes_as_uninterrupted(tiny, cache_dir, tied_student, runs, tmp_path):
    ref = runs("fsdp", "p1")
    out = tmp_path / "run"
    cmd = _two_ranks(_args(tiny, cache_dir, tied_student, "p1", out, 1, ["--parallel", "fsdp"]), tmp_path / "g")
    # Killed after step 3 (checkpoint at 2), all ranks at once, as a node failure would.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True
    )
    for line in proc.stdout:
        if line.startswith("step=3 "):
            _kill_tree(proc.pid)
            break
    proc.wait()
    assert (out / "checkpoints" / "step-000002" / "sharded").is_dir() and not (out / "final").exists()
    res = subprocess.run(
        _two_ranks(_args(tiny, cache_dir, tied_student, "p1", out, 1, ["--parallel", "fsdp"]), tmp_path / "g"),
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert "(resuming at step 2)" in res.stdout, res.stdout[-2000:]  # not a fresh run that happens to match
    a = [m for m in _metrics(ref) if "loss" in m]
    b = [m for m in _metrics(out) if "loss" in m]
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", "p1", "grad_norm", "lr"):
            assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-9), (x["step"], key)
    for k, v in _weights(ref).items():
        torch.testing.assert_close(_weights(out)[k], v, rtol=1e-6, atol=1e-8)
    # A sharded checkpoint is not silently resumed as a replicated one.
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltakd.cli",
            *_args(tiny, cache_dir, tied_student, "p1", out, 1, ["--parallel", "ddp"]),
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert res.returncode == 2 and "other settings (parallel; micro-batches per step M" in res.stderr, res.stderr[
        -2000:
    ]


# ---------------------------------------------------------------- elastic resume
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_run_resumes_on_another_number_of_ranks_when_m_stays(
    tiny, cache_dir, tied_student, runs, tmp_path, mode, capsys
):
    """2 ranks x 1 stopped at step 2 continue as one process x 2 (M = 2) to the 2-rank run's weights."""
    from deltakd.cli import main

    ref = runs(mode, "p1")
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    # What the 2-rank run leaves when stopped after its checkpoint of step 2.
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-000004")
    # One process accumulating 1 would change M (2 -> 1): refused, naming the --grad-accum that keeps it.
    assert main(_args(tiny, cache_dir, tied_student, "p1", out, 1, ["--parallel", mode])) == 2
    err = capsys.readouterr().err
    assert "2 x 1 = 2 -> 1 x 1 = 1" in err and "pass --grad-accum 2 to continue it exactly on 1 rank" in err, err
    assert main(_args(tiny, cache_dir, tied_student, "p1", out, 2, ["--parallel", mode])) == 0
    assert "(resuming at step 2)" in capsys.readouterr().out
    a = [m for m in _metrics(ref) if "loss" in m]
    b = [m for m in _metrics(out) if "loss" in m]
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", "p1", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-3, abs=1e-7), (mode, x["step"], key)
    wa, wb = _weights(ref), _weights(out)
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-6, msg=lambda m, k=k: f"{mode} {k}: {m}")


# ---------------------------------------------------------------- per-rank reading
@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow), 4])  # 3: suite time; -m slow
def test_each_rank_reads_its_stripe_of_the_one_rank_sequence(cache_dir, world_size):
    """Rank r of N (no accumulation) = batches r, r+N, ... of one rank accumulating N (same M = N)."""
    reader = CacheReader(cache_dir)
    kw = dict(batch_tokens=150, with_student=True, seed=5, epochs=2)
    one = list(StreamingLoader(reader, accum=world_size, **kw))
    assert {b.state["epoch"] for b in one} == {0, 1}
    ranks = [list(StreamingLoader(reader, rank=r, world=world_size, **kw)) for r in range(world_size)]
    for r, mine in enumerate(ranks):
        same_batches(mine, one[r::world_size])
    # Resumed mid-shard (more global batches of that shard follow) from its own position,
    # a rank continues its own stripe.
    mine = ranks[1]
    where = lambda b: (b.state["epoch"], b.state["shard"])  # noqa: E731
    i = next(
        i
        for i in range(2, len(mine) - 1)
        if any(where(b) == where(mine[i]) and b.state["index"] > mine[i].state["index"] + 1 for b in one)
    )
    rest = list(StreamingLoader(reader, rank=1, world=world_size, state=mine[i].state, **kw))
    same_batches(rest, mine[i + 1 :])
    # The trainer saves rank 0's position (its last micro-batch of a step): every rank resumes at the next step.
    st = ranks[0][i].state
    for r in range(world_size):
        rest = list(StreamingLoader(reader, rank=r, world=world_size, state=st, **kw))
        same_batches(rest, [b for b in ranks[r] if b.state["index"] > st["index"] - 1 + world_size])


def test_a_rank_converts_only_its_rows(cache_dir, monkeypatch):
    reader = CacheReader(cache_dir)
    decoded = []
    orig = CacheReader._decode
    # Count the sequences whose targets get converted (the planning reads carry no targets).
    monkeypatch.setattr(
        CacheReader,
        "_decode",
        lambda self, raw, **kw: ("tokens" in raw and decoded.append(len(raw["example_ids"]))) or orig(self, raw, **kw),
    )
    list(StreamingLoader(reader, batch_tokens=150, with_student=True, seed=5, epochs=1, rank=0, world=2))
    part = sum(decoded)
    decoded.clear()
    list(StreamingLoader(reader, batch_tokens=150, with_student=True, seed=5, epochs=1))
    full = sum(decoded)
    n_seqs = len(reader)
    assert full == n_seqs and part < 0.75 * n_seqs, (part, full)


# ---------------------------------------------------------------- teachers larger than one GPU
def test_teacher_sharding_is_refused_without_a_gpu(tiny, tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltakd.cli",
            "cache",
            "build",
            "--teacher-ft",
            tiny["teacher_ft"],
            "--teacher-base",
            tiny["teacher_base"],
            "--data",
            tiny["data"],
            "--out",
            str(tmp_path / "c"),
            "--device",
            "cuda",
            "--teacher-sharding",
            "tp",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    # The device is resolved first: with no GPU at all, that is what the user hears.
    assert "no CUDA GPU is visible" in res.stderr, res.stderr[-2000:]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltakd.cli",
            "cache",
            "build",
            "--teacher-ft",
            tiny["teacher_ft"],
            "--teacher-base",
            tiny["teacher_base"],
            "--data",
            tiny["data"],
            "--out",
            str(tmp_path / "c"),
            "--teacher-sharding",
            "device_map",
        ],
        capture_output=True,
        text=True,
    )
    assert (
        res.returncode == 2
        and "--teacher-sharding device_map spreads each teacher over GPUs, but no CUDA GPU" in res.stderr
    ), res.stderr[-2000:]
    assert not (tmp_path / "c" / "shards").exists()  # refused before any model ran


def test_teacher_sharding_choices_on_a_gpu_node(tiny, fake_gpus, monkeypatch):
    from deltakd.cache.build.forward import resolve_sharding

    teachers = [tiny["teacher_ft"], tiny["teacher_base"]]  # Llama: transformers has a TP plan
    with pytest.raises(ValueError, match="needs --device cuda"):
        resolve_sharding("tp", "cpu", teachers)
    assert resolve_sharding("auto", "cuda", teachers) == "device_map"  # one process: layers over its GPUs
    with pytest.raises(ValueError, match="torchrun --nproc_per_node N"):
        resolve_sharding("tp", "cuda", teachers)
    torchrun_env(monkeypatch, 2, 8)
    assert resolve_sharding("auto", "cuda", teachers) == "tp"
    assert resolve_sharding("tp", "cuda", teachers) == "tp"
    with pytest.raises(ValueError, match="one process per node"):
        resolve_sharding("device_map", "cuda", teachers)
    torchrun_env(monkeypatch, 2, 8, rank=10, world=16)
    with pytest.raises(ValueError, match="several nodes: use --teacher-sharding device_map"):
        resolve_sharding("tp", "cuda", teachers)
    monkeypatch.setattr("deltakd.cache.build.forward.has_tp_plan", lambda p: False)
    torchrun_env(monkeypatch, 2, 8)
    with pytest.raises(ValueError, match="no tensor-parallel plan"):
        resolve_sharding("tp", "cuda", teachers)


def test_sharded_loading_hands_the_choice_to_transformers(tiny, monkeypatch):
    from transformers import AutoModelForCausalLM

    from deltakd.cache.build.forward import load_model

    seen = []

    class Fake(torch.nn.Module):
        def to(self, *a, **k):
            seen.append(("to", a))
            return self

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda path, **kw: seen.append(kw) or Fake())
    load_model(tiny["teacher_ft"], None, "bfloat16", "device_map")
    assert seen == [{"dtype": torch.bfloat16, "device_map": "auto"}]  # placed by accelerate, never moved after
    seen.clear()
    monkeypatch.setenv("WORLD_SIZE", "8")
    load_model(tiny["teacher_ft"], None, "bfloat16", "tp")
    cfg = seen[0].get("distributed_config")
    assert (
        (cfg.tp_plan, cfg.tp_size) == ("auto", 8)
        if cfg is not None
        else (seen[0]["tp_plan"], seen[0]["tp_size"]) == ("auto", 8)
    )
    assert len(seen) == 1
    seen.clear()
    load_model(tiny["teacher_ft"], torch.device("cpu"), "float32")
    assert seen == [{"dtype": torch.float32}, ("to", (torch.device("cpu"),))]
