"""Evaluation (hand-computed ROUGE-L), the CLI, and the quick end-to-end demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deltakd.student.eval import read_eval_examples, rouge_l

# Launches processes, servers or whole pipelines: the full suite runs it, the quick tier does not.
pytestmark = pytest.mark.integration

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "self_inst_user_oriented_instructions.jsonl"


@pytest.mark.parametrize(
    "pred,ref,expected",
    [
        # LCS "the cat on the mat" = 5 of 6 tokens on both sides: P = R = F = 5/6.
        ("the cat sat on the mat", "the cat is on the mat", 100 * 5 / 6),
        # Reversed: LCS 1 of 4: F = 1/4.
        ("a b c d", "d c b a", 25.0),
        # LCS 2 ("b d"), P = 2/2, R = 2/4: F = 2PR/(P+R) = 2/3.
        ("b d", "a b c d", 100 * 2 / 3),
        ("Same Words.", "same words", 100.0),  # rouge-score lowercases and drops punctuation
        ("", "anything here", 0.0),
    ],
)
def test_rouge_l_against_hand_computed_values(pred, ref, expected):
    assert rouge_l(pred, ref) == pytest.approx(expected, abs=1e-9)


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not beside the checkout")
def test_reads_the_self_instruct_set():
    ex = read_eval_examples(str(SHARED))
    n_inst = sum(len(json.loads(l)["instances"]) for l in SHARED.read_text().splitlines() if l.strip())
    assert len(ex) == n_inst >= 252
    rec, ref = ex[0]
    assert rec.messages[0][0] == "user" and ref and rec.response == ref


def test_cli_help_lists_every_verb():
    out = subprocess.run([sys.executable, "-m", "deltakd.cli", "--help"], capture_output=True, text=True).stdout
    listed = out[out.index("{") + 1 : out.index("}")].split(",")  # argparse's "{cache,train,eval,demo}"
    assert sorted(listed) == ["cache", "demo", "eval", "train"]


def test_cli_inspect_and_bad_input_message(cache_dir, tmp_path):
    cli = [sys.executable, "-m", "deltakd.cli", "cache", "inspect", cache_dir]
    out = subprocess.run(cli + ["--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout.strip().splitlines()[-1])
    assert s["sequences"] == 60 and s["k"] == 16 and 0 < s["bytes_per_supervised_token"]
    qs = list(s["topk_mass_quantiles"].values())
    assert all(0 < q <= 1 for q in qs) and qs == sorted(qs) and s["mean_kl_ft_base"] > 0
    ex = subprocess.run(cli + ["--example", "0", "--plot", str(tmp_path / "p.png")], capture_output=True, text=True)
    assert ex.returncode == 0 and "supervised" in ex.stdout and "->" in ex.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltakd.cli",
            "train",
            "--cache",
            str(tmp_path),
            "--student",
            "x",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "no manifest.json" in bad.stderr and "Traceback" not in bad.stderr


def test_quick_demo_end_to_end(tmp_path):
    from deltakd.demo.pipeline import DemoConfig, run_demo

    work = tmp_path / "demo"
    rep = run_demo(DemoConfig(workdir=str(work), quick=True))
    report = work / "report"
    for f in ("summary.md", "loss_curves.png", "cache_histograms.png", "cache_inspect.txt", "rouge.json"):
        assert (report / f).stat().st_size > 0, f
    rouge = json.loads((report / "rouge.json").read_text())
    assert set(rouge) == {"teacher_ft", "student_base", "sft", "kd", "delta_p1", "recipe_kd", "recipe_p1"}
    assert all(0 <= v <= 100 for v in rouge.values())
    # The shipped teacher was finetuned on this task: it must beat its own untuned student base.
    assert rouge["teacher_ft"] > rouge["student_base"]
    for name in ("sft", "kd", "delta_p1", "recipe_kd", "recipe_p1"):
        rows = [json.loads(l) for l in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert any("loss" in r for r in rows) and any("eval_tokens" in r for r in rows)
        assert (work / "runs" / name / "final" / "model.safetensors").exists()
    assert json.loads((work / "runs" / "recipe_p1" / "metrics.jsonl").read_text().splitlines()[0])["weights"] == {
        "sft": 0.5,
        "p1": 0.5,
    }
    summary = (report / "summary.md").read_text()
    # The paragraph names the winner and compares the two recipes with the numbers of the table.
    assert "best student is" in summary and f"{rouge['recipe_p1']:.1f} against {rouge['recipe_kd']:.1f}" in summary
    assert "0.5*sft + 0.5*kd (divergence fkl, tail bucket)" in summary
    # The paragraph's "why" figures cover every supervised position; the finetuned teacher knows the task
    # better than the untuned student base.
    from deltakd.demo.pipeline import target_agreement

    agree = target_agreement(work / "cache", 1.0)
    assert agree["positions"] == json.loads((work / "cache" / "manifest.json").read_text())["totals"]["n_supervised"]
    assert 0 <= agree["student_base_top1"] < agree["teacher_top1"] <= 1
    assert 0 < agree["delta_target_p_ref"] <= 1 and 0 <= agree["delta_target_top1"] <= 1
    per_example = [json.loads(l) for l in (work / "eval" / "delta_p1-final.jsonl").read_text().splitlines()]
    assert len(per_example) == 12 and {"prompt", "reference", "output", "rougeL"} <= set(per_example[0])
    # A second run reuses every finished stage.
    stamp = (work / "runs" / "kd" / "metrics.jsonl").stat().st_mtime
    run_demo(DemoConfig(workdir=str(work), quick=True))
    assert (work / "runs" / "kd" / "metrics.jsonl").stat().st_mtime == stamp
    assert "teacher_ft" in rep["table"]
