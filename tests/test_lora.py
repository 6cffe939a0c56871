"""LoRA students: only the adapter trains and the loss falls; the export is the adapter (and, with --merge, a merged
student whose logits equal base + adapter); a killed run resumes identically; DDP and FSDP equal one process."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import short_run

from deltakd.student.data import StreamingLoader
from deltakd.student.trainer import Trainer, train

peft = pytest.importorskip("peft", reason="pip install 'deltakd[lora]'")


def lora_cfg(tiny, cache_dir, out, **kw):
    lora = dict(lora_r=4, lora_alpha=8.0, lora_dropout=0.1, eval_percent=10.0, lr=1e-2)
    return short_run(tiny, cache_dir, out, **{**lora, **kw})


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_only_the_adapter_trains_and_the_loss_falls(tiny, cache_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    tr = Trainer(lora_cfg(tiny, cache_dir, tmp_path / "r", lora_dropout=0.0, warmup_steps=0, max_steps=12))
    start = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    trainable = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any("lm_head" in n or "embed" in n for n in trainable)  # the fused head and embedding stay frozen
    assert {id(p) for g in tr.opt.param_groups for p in g["params"]} == {id(p) for p in tr.params}
    batch = next(iter(StreamingLoader(tr.reader, **tr.train_loader_kw)))

    def loss_of(b) -> float:
        with torch.no_grad():
            weighted, _ = tr.forward_loss(b)
        return float(weighted) / b.n_supervised

    before = loss_of(batch)
    for _ in range(12):
        tr.train_step([batch])
    # 0.5*SFT + 0.5*KD of a random 2-layer student, its SFT near log V: 2.86 -> 2.76 (measured), a rank-4 adapter
    assert loss_of(batch) < before - 0.05, (before, loss_of(batch))
    base = dict(AutoModelForCausalLM.from_pretrained(tiny["student_base"]).named_parameters())
    for n, p in tr.model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, start[n]), n
        else:
            assert torch.equal(p, start[n]), n  # frozen, bit for bit
            assert torch.equal(p, base[n.replace(".base_layer", "")]), n


def test_the_fused_loss_skips_a_frozen_head_and_gives_the_same_hidden_gradient():
    from test_losses import cached_targets, dists

    from deltakd.student.objective import LossSpec, chunked_loss

    torch.manual_seed(0)
    lT, lB, lS0 = (x.float() for x in dists(5, n=37, v=50))
    tg = cached_targets(lT, lB, lS0, 8, torch.randint(0, 50, (37,)))
    head = torch.nn.Linear(16, 60, bias=True)
    h = torch.randn(37, 16, requires_grad=True)
    spec = LossSpec(weights={"sft": 0.3, "kd": 1.0, "p1": 1.0}, chunk_rows=5)
    (want,) = torch.autograd.grad(chunked_loss(h, head, tg, spec, 50)[0], [h])
    head.requires_grad_(False)
    chunked_loss(h, head, tg, spec, 50)[0].backward()
    assert head.weight.grad is None and head.bias.grad is None
    torch.testing.assert_close(h.grad, want, rtol=0, atol=0)


@pytest.fixture(scope="module")
def merged_run(tiny, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    train(lora_cfg(tiny, cache_dir, out, merge=True))
    return out


def test_the_export_is_the_adapter_and_a_merged_student_equal_to_base_plus_adapter(merged_run, tiny):
    import yaml
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    final = merged_run / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= {
        p.name for p in final.iterdir()
    }
    assert not (final / "model.safetensors").exists()
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        Path(tiny["student_base"]).resolve()
    )
    head = yaml.safe_load((final / "README.md").read_text().split("---")[1])
    assert head["library_name"] == "peft" and {"lora", "peft", "distillation"} <= set(head["tags"])
    merged_head = yaml.safe_load((final / "merged" / "README.md").read_text().split("---")[1])
    assert merged_head["library_name"] == "transformers"

    ids = torch.tensor([[1, 5, 9, 12, 7, 3, 20, 4]])
    base = AutoModelForCausalLM.from_pretrained(tiny["student_base"]).eval()
    with_adapter = PeftModel.from_pretrained(base, str(final)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(final / "merged")).eval()
    with torch.no_grad():
        want = with_adapter(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        # transformers loads the adapter folder itself (with peft installed), base from adapter_config.json.
        direct = AutoModelForCausalLM.from_pretrained(str(final)).eval()
        torch.testing.assert_close(direct(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    # The merged weights are W + (alpha / r) B A, computed here from the adapter file alone.
    adapter = load_file(str(final / "adapter_model.safetensors"))
    plain = AutoModelForCausalLM.from_pretrained(tiny["student_base"]).state_dict()
    merged_sd = merged.state_dict()
    n_adapted = 0
    for k, a in adapter.items():
        if ".lora_A." not in k:
            continue
        name = k.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = adapter[k.replace(".lora_A.", ".lora_B.")]
        assert b.abs().max() > 0  # trained away from its zero start
        torch.testing.assert_close(merged_sd[f"{name}.weight"], plain[f"{name}.weight"] + (8.0 / 4) * b @ a)
        n_adapted += 1
    assert n_adapted == 2 * 7  # all-linear: q, k, v, o, gate, up, down in each of the two layers
    assert torch.equal(merged_sd["lm_head.weight"], plain["lm_head.weight"])


def test_eval_reads_the_adapter_and_the_merged_student(merged_run, tmp_path, capsys):
    from conftest import write_data

    from deltakd.cli import main

    test = write_data(tmp_path / "test.jsonl", n=3, seed=4)
    final = merged_run / "final"
    argv = ["eval", "--model", str(final), "--model", str(final / "merged"), "--data", test, "--out", str(tmp_path)]
    assert main(argv + ["--max-new-tokens", "4"]) == 0
    res = json.loads((tmp_path / "summary.json").read_text())["results"]
    assert res[0]["rougeL"] == pytest.approx(res[1]["rougeL"])  # greedy: the same student either way
    assert "greedy, 4 new tokens" in (final / "README.md").read_text()


def test_a_killed_lora_run_resumes_identically(merged_run, tiny, cache_dir, tmp_path):
    """Resumed from its step-2 checkpoint (the adapter and the optimizer only), with dropout on: the same run."""
    from safetensors.torch import load_file

    ckpt = merged_run / "checkpoints" / "step-000002"
    assert {p.name for p in ckpt.iterdir()} == {"adapter.safetensors", "optimizer.pt", "rng.pt", "state.json"}
    out = tmp_path / "resumed"
    shutil.copytree(ckpt, out / "checkpoints" / "step-000002")
    shutil.copy(merged_run / "metrics.jsonl", out / "metrics.jsonl")
    train(lora_cfg(tiny, cache_dir, out, merge=True))
    a, b = metrics(merged_run), metrics(out)
    assert [m["step"] for m in b if "loss" in m] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", "kd", "grad_norm", "eval_kd"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-6), (x["step"], key)
    wa = load_file(str(merged_run / "final" / "adapter_model.safetensors"))
    wb = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_settings_are_checked(tiny, cache_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--merge merges a LoRA adapter"):
        lora_cfg(tiny, cache_dir, tmp_path / "a", lora_r=0, merge=True)
    with pytest.raises(ValueError, match="lora_dropout"):
        lora_cfg(tiny, cache_dir, tmp_path / "a", lora_dropout=1.0)
    with pytest.raises(ValueError, match="lm_head is the output layer"):
        Trainer(lora_cfg(tiny, cache_dir, tmp_path / "b", lora_targets="q_proj,lm_head"))
    with pytest.raises(ValueError, match="--lora-targets nope"):
        Trainer(lora_cfg(tiny, cache_dir, tmp_path / "c", lora_targets="nope"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ValueError, match=r"--lora-r needs the peft package: pip install 'deltakd\[lora\]'"):
        train(lora_cfg(tiny, cache_dir, tmp_path / "d"))
    assert not (tmp_path / "d" / "checkpoints").exists()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = {**os.environ, "DELTAKD_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
COMMON = ["--loss", "kd", "--lam", "0.5", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--merge"]
COMMON += ["--max-steps", "3", "--batch-tokens", "256", "--log-every", "1", "--eval-percent", "10", "--lr", "1e-2"]
COMMON += ["--warmup-steps", "1"]


@pytest.fixture(scope="module")
def one_process(tiny, cache_dir, tmp_path_factory):
    """The reference: one process accumulating the two micro-batches that two ranks take one each."""
    out = tmp_path_factory.mktemp("lora-one") / "run"
    args = ["train", "--cache", cache_dir, "--student", tiny["student_base"], *COMMON, "--grad-accum", "2"]
    res = subprocess.run([sys.executable, "-m", "deltakd.cli", *args, "--out", str(out)], capture_output=True,
                         text=True, env=ENV)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.integration  # torchrun, 2 ranks on CPU (gloo)
@pytest.mark.parametrize("mode", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])  # ddp: suite time; -m slow
def test_two_ranks_train_the_same_adapter_as_one_process(tiny, cache_dir, one_process, tmp_path, mode):
    from safetensors.torch import load_file

    two = tmp_path / mode
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port())]
    args = ["train", "--cache", cache_dir, "--student", tiny["student_base"], *COMMON, "--parallel", mode]
    res = subprocess.run(launch + ["-m", "deltakd.cli", *args, "--out", str(two)], capture_output=True, text=True,
                         env=ENV)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = [m for m in metrics(one_process) if "loss" in m], [m for m in metrics(two) if "loss" in m]
    assert [m["step"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-7), (mode, x["step"], key)
    # The export (gathered from the shards under FSDP): the same adapter and the same merged student.
    for rel in ("final/adapter_model.safetensors", "final/merged/model.safetensors"):
        wa, wb = load_file(str(one_process / rel)), load_file(str(two / rel))
        assert set(wa) == set(wb), rel
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)
