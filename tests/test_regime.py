"""The regime world (benchmarks/regime_task.py) is built as its design says; `quality.py regime --smoke` runs."""

from __future__ import annotations

import json
import math
import re

import pytest

from benchmarks import regime_task as rt


def test_world_follows_its_design():
    """Disjoint sets; each corpus states only its base's creatures; training asks only about A ∪ C and never a held
    question, yet states every held fact in some answer; no test prompt is a training prompt; per-set test sizes."""
    w = rt.make_world()
    sets = {k: set(v) for k, v in w["sets"].items()}
    assert [len(sets[s]) for s in "ASC"] == [14, 13, 13] and not (sets["A"] & sets["S"] or sets["S"] & sets["C"])
    assert not sets["A"] & sets["C"]
    for key, known in (("corpus_teacher", sets["A"] | sets["C"]), ("corpus_student", sets["S"] | sets["C"])):
        words = {x for d in w[key] for x in re.findall(r"\w+", d)}
        named = words & (sets["A"] | sets["S"] | sets["C"])
        assert named == known, key
    asked = {rt.about(r["prompt"]) for r in w["train"]}
    assert {n for n, _ in asked if n} == sets["A"] | sets["C"]
    for name, kinds in w["held"].items():
        assert not {(name, k) for k in kinds} & asked
    describe = {rt.about(r["prompt"])[0]: r["response"] for r in w["train"] if rt.about(r["prompt"])[1] == "describe"}
    in_train = {x for r in w["train"] for x in re.findall(r"\w+", r["prompt"] + " " + r["response"])}
    test = w["test"]
    for t in test:
        name = rt.about(t["prompt"])[0]
        if t["set"] in ("A", "C"):
            assert t["answer"] in describe[name]  # the held fact is stated in the distillation data
        if t["set"] == "S":
            assert name not in in_train
    assert not {t["prompt"] for t in test} & {r["prompt"] for r in w["train"]}
    assert {s: sum(t["set"] == s for t in test) for s in rt.SETS} == {"A": 28, "S": 39, "C": 26, "words": 60}


def test_judge_applies_the_decision_rule():
    """'at least' fails only beyond the summed seed spreads; 'level' fails beyond it either way."""
    ps = {
        "p1_a1.0": {"S": [50, 52, 54], "A": [40, 40, 40], "C": [70, 71, 72]},
        "kd_fkl": {"S": [60, 60, 60], "A": [41, 41, 41], "C": [60, 61, 62]},
    }
    v = {(x["set"], x["x"]): x for x in rt.judge(ps)}
    assert v["S", "p1_a1.0"]["held"] is False and v["S", "p1_a1.0"]["d"] == -8 and v["S", "p1_a1.0"]["spread"] == 2
    assert v["A", "kd_fkl"]["held"] is True
    assert v["C", "p1_a1.0"]["held"] is False
    assert v["S", "lam0.5_p1_a1.0"]["held"] is None


@pytest.mark.integration
def test_regime_smoke_runs_end_to_end(tmp_path, capsys):
    """`quality.py regime --smoke`: tiny world, cache, six students, per-set ROUGE-L and KL, the predictions judged."""
    from benchmarks import quality

    quality.main_regime(["--smoke", "--workdir", str(tmp_path)])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["benchmark"] == "quality_regime" and out["seeds"] == [0]
    assert set(out["variants"]) == set(quality.REGIME_VARIANTS)
    for name, v in out["variants"].items():
        (run,) = v["per_seed"]
        assert set(run["sets"]) == set(run["kl"]) == set(rt.SETS), name
        assert all(0 <= x["rougeL"] <= 100 and x["n"] == 3 for x in run["sets"].values())
        assert all(math.isfinite(k) and k >= -1e-6 for s in run["kl"].values() for k in s.values())
    assert all(s["kl_t"] < 1e-6 for s in out["reference"]["teacher_ft"]["kl"].values())
    assert len(out["predictions"]) == len(rt.PREDICTIONS) and all(
        p["held"] in (True, False) for p in out["predictions"]
    )
    # A second call reuses every finished stage and trains nothing.
    quality.main_regime(["--smoke", "--workdir", str(tmp_path), "--report-only"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["variants"] == out["variants"]
