"""Benchmark code that other figures rest on: the online full-vocabulary reference of quality.py."""

from __future__ import annotations

import sys

import pytest
import torch

from deltakd.cache.format.reader import CacheReader
from deltakd.student.data import StreamingLoader
from deltakd.student.trainer import TrainConfig, Trainer

# Launches processes, servers or whole pipelines: the full suite runs it, the quick tier does not.
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def exact_cache(tiny, tmp_path_factory):
    """A cache whose support is the whole vocabulary, values in float32: the cached twin of the online reference."""
    from deltakd.cache.build.builder import CacheBuildConfig, build_cache

    out = tmp_path_factory.mktemp("exact") / "c"
    build_cache(
        CacheBuildConfig(
            teacher_ft=tiny["teacher_ft"],
            teacher_base=tiny["teacher_base"],
            data=tiny["data"],
            out=str(out),
            student_base=tiny["student_base"],
            support="topk",
            top_k=tiny["vocab"],
            mode="sequential",
            tail_samples=0,
            max_length=64,
            dtype="float32",
        )
    )
    return str(out)


@pytest.mark.parametrize(
    "opts",
    [
        dict(loss="kd"),
        dict(loss="kd", divergence="rkl"),
        dict(loss="p1", alpha=1.5),
        dict(loss="p3", alpha=0.5),
        dict(w_sft=0.3, w_kd=1.0, w_p3=1.0),
    ],
)
def test_online_reference_equals_a_full_vocabulary_cache(tiny, exact_cache, tmp_path, opts):
    """Same batch, same student: the online targets (three frozen models, full vocabulary, the cache's floor) give the
    loss and gradient of a cache that stores the whole vocabulary; a wrong model, floor or row order would not."""
    from benchmarks.online_ref import OnlineTrainer

    cfg = TrainConfig(
        cache=exact_cache,
        student=tiny["student_base"],
        out=str(tmp_path / "r"),
        batch_tokens=256,
        chunk_rows=17,
        **opts,
    )
    cached = Trainer(cfg)
    floor = cached.reader.floor
    online = OnlineTrainer(cfg, tiny["teacher_ft"], tiny["teacher_base"], tiny["student_base"], floor=floor)
    assert floor is not None and cached.spec.floor == online.spec.floor == floor
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


def test_online_reference_differs_from_a_truncated_cache(tiny, cache_dir, tmp_path):
    """The comparison can fail: on a top-16 union cache the online P1 loss is not the cached one."""
    from benchmarks.online_ref import OnlineTrainer

    cfg = TrainConfig(
        cache=cache_dir, student=tiny["student_base"], out=str(tmp_path / "r"), loss="p1", batch_tokens=256
    )
    batch = next(iter(StreamingLoader(Trainer(cfg).reader, batch_tokens=256, with_student=True, seed=0)))
    with torch.no_grad():
        a = Trainer(cfg).forward_loss(batch)[1]
        floor = CacheReader(cache_dir).floor
        b = OnlineTrainer(cfg, tiny["teacher_ft"], tiny["teacher_base"], tiny["student_base"], floor).forward_loss(
            batch
        )[1]
    assert not torch.allclose(a, b, rtol=1e-4)


def test_real_pair_smoke_runs_end_to_end_on_a_stand_in(tmp_path, capsys):
    """benchmarks/real_pair.py --smoke on a tiny stand-in for SmolLM2-Instruct: every stage of the GPU script runs."""
    import json
    import random

    from benchmarks import real_pair
    from deltakd.demo.tiny import save_checkpoint, tiny_llama, train_tokenizer

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


PEERS_REASON = 'the peer comparison needs trl and liger-kernel: pip install -e ".[peers]"'


def _peer_reference(h_s, w_s, h_t, w_t, divergence):
    """Mean D over the rows and its gradient w.r.t. (h_s, w_s), in float64 on the full vocabulary."""
    hs, ws = h_s.double().requires_grad_(True), w_s.double().requires_grad_(True)
    ls = torch.log_softmax(hs @ ws.T, -1)
    lt = torch.log_softmax(h_t.double() @ w_t.double().T, -1)
    p, q = (lt, ls) if divergence == "fkl" else (ls, lt)
    loss = (p.exp() * (p - q)).sum(-1).mean()
    return (loss.detach(), *torch.autograd.grad(loss, (hs, ws)))


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_peer_losses_are_deltakds_objective(divergence):
    """TRL's DistillationTrainer loss and Liger's fused-linear JSD at the beta that names `divergence` compute
    deltakd's `--loss kd --divergence <divergence>` on the same student/teacher hidden states and heads: values and
    gradients equal a float64 full-vocabulary reference. Without this, train_step.py --only peers could time
    different objectives. 4100 rows cross TRL's 4096-row tile; chunks of 1000 cross Liger's and ours."""
    pytest.importorskip("trl", reason=PEERS_REASON)
    pytest.importorskip("liger_kernel.chunked_loss", reason=PEERS_REASON)
    from benchmarks import peers

    g = torch.Generator().manual_seed(0)
    N, Hs, Ht, V = 4100, 16, 24, 500  # the teacher is wider than the student, like the benchmark's
    h_s, h_t = torch.randn(N, Hs, generator=g), torch.randn(N, Ht, generator=g)
    w_s, w_t = torch.randn(V, Hs, generator=g) * 0.4, torch.randn(V, Ht, generator=g) * 0.4
    nxt = torch.randint(0, V, (N,), generator=g)
    ref = _peer_reference(h_s, w_s, h_t, w_t, divergence)
    other = _peer_reference(h_s, w_s, h_t, w_t, "rkl" if divergence == "fkl" else "fkl")
    assert not torch.isclose(ref[0], other[0], rtol=1e-2), "fkl and rkl must differ here, or the check cannot fail"
    beta = peers.BETA[divergence]

    def run(kind):
        hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        if kind == "trl":
            loss = peers.trl_loss(hs, ws, h_t, w_t, beta=beta)
        elif kind == "liger":
            loss = peers.liger_loss(hs, ws, h_t, w_t, nxt, beta=beta, chunk_size=1000)
        else:
            head = torch.nn.Linear(Hs, V, bias=False)
            head.weight = torch.nn.Parameter(ws)
            loss = peers.deltakd_loss(hs, head, h_t, w_t, nxt, divergence=divergence, chunk_rows=1000)
        loss.backward()
        return loss.detach().double(), hs.grad.double(), (head.weight.grad if kind == "deltakd" else ws.grad).double()

    for kind in ("deltakd", "trl", "liger"):
        loss, g_h, g_w = run(kind)
        torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=0, msg=f"{kind} {divergence} loss")
        torch.testing.assert_close(g_h, ref[1], rtol=1e-4, atol=1e-9, msg=f"{kind} {divergence} d/dhidden")
        torch.testing.assert_close(g_w, ref[2], rtol=1e-4, atol=1e-8, msg=f"{kind} {divergence} d/dhead")


def test_peers_missing_is_an_actionable_error(monkeypatch):
    """Without trl/liger the peer rows are refused with the install command, not silently dropped."""
    from benchmarks import peers

    monkeypatch.setitem(sys.modules, "trl", None)  # import trl now raises ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[peers\]"'):
        peers.require()
