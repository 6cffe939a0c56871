"""Benchmark code that other figures rest on: the online full-vocabulary reference of quality.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from deltakd.student.data import StreamingLoader
from deltakd.student.trainer import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(scope="module")
def exact_cache(world, tmp_path_factory):
    """A cache whose support is the whole vocabulary, values in float32: the cached twin of the online reference."""
    from deltakd.cache.builder import CacheBuildConfig, build_cache

    out = tmp_path_factory.mktemp("exact") / "c"
    build_cache(CacheBuildConfig(teacher_ft=world["teacher_ft"], teacher_base=world["teacher_base"], data=world["data"],
                                 out=str(out), student_base=world["student_base"], support="topk",
                                 top_k=world["vocab"], mode="sequential", tail_samples=0, max_length=64, dtype="float32"))
    return str(out)


@pytest.mark.parametrize("opts", [dict(loss="kd"), dict(loss="kd", divergence="rkl"), dict(loss="p1", alpha=1.5),
                                  dict(loss="p3", alpha=0.5), dict(w_sft=0.3, w_kd=1.0, w_p3=1.0)])
def test_online_reference_equals_a_full_vocabulary_cache(world, exact_cache, tmp_path, opts):
    """Same batch, same student: the online targets (three frozen models, full vocabulary, floor −12) give the
    loss and gradient of a cache that stores the whole vocabulary; a wrong model, floor or row order would not."""
    from online_ref import OnlineTrainer

    cfg = TrainConfig(cache=exact_cache, student=world["student_base"], out=str(tmp_path / "r"), batch_tokens=256,
                      chunk_rows=17, **opts)
    cached = Trainer(cfg)
    online = OnlineTrainer(cfg, world["teacher_ft"], world["teacher_base"], world["student_base"], floor=-12.0)
    assert cached.spec.floor == online.spec.floor == -12.0
    batch = next(iter(StreamingLoader(cached.reader, batch_tokens=256, with_student=True, seed=0)))
    out = []
    for tr in (cached, online):
        tr.model.zero_grad()
        total, sums = tr.forward_loss(batch)
        total.backward()
        out.append((sums.detach(), torch.cat([p.grad.flatten() for p in tr.model.parameters() if p.grad is not None])))
    assert out[0][0].abs().sum() > 0
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-3, atol=1e-6)


def test_online_reference_differs_from_a_truncated_cache(world, cache_dir, tmp_path):
    """The comparison can fail: on a top-16 union cache the online P1 loss is not the cached one."""
    from online_ref import OnlineTrainer

    cfg = TrainConfig(cache=cache_dir, student=world["student_base"], out=str(tmp_path / "r"), loss="p1",
                      batch_tokens=256)
    batch = next(iter(StreamingLoader(Trainer(cfg).reader, batch_tokens=256, with_student=True, seed=0)))
    with torch.no_grad():
        a = Trainer(cfg).forward_loss(batch)[1]
        b = OnlineTrainer(cfg, world["teacher_ft"], world["teacher_base"], world["student_base"], -12.0).forward_loss(batch)[1]
    assert not torch.allclose(a, b, rtol=1e-4)


def test_real_pair_smoke_runs_end_to_end_on_a_stand_in(tmp_path, capsys):
    """benchmarks/real_pair.py --smoke on a tiny stand-in for SmolLM2-Instruct: every stage of the GPU script runs."""
    import json
    import random

    import real_pair
    from deltakd.tiny import save_checkpoint, tiny_llama, train_tokenizer

    rng = random.Random(0)
    texts = [real_pair.task(rng, real_pair.WORDS)["prompt"] for _ in range(200)] + real_pair.HEAL_PROMPTS
    tok = train_tokenizer(texts + [t.upper() for t in texts], 400, tmp_path / "tok")
    inst = save_checkpoint(tiny_llama(len(tok), hidden=32, layers=4, seed=5, tokenizer=tok), tok, tmp_path / "instruct")
    real_pair.main(["--smoke", "--instruct", inst, "--workdir", str(tmp_path / "w")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["benchmark"] == "real_pair" and out["student_layers"] == 2 and out["teacher_layers"] == 4
    assert set(out["rougeL"]) == {"teacher_base", "teacher_ft", "student_base", "sft", "kd", "delta_p1", "kd+p3"}
    assert out["build_over_bare"] > 0 and out["train"]["online_p1"]["peak_mem_mb"] > 0
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "w" / "student_base").num_hidden_layers == 2
