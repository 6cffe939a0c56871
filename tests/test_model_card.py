"""The model card of every export: its YAML header, its facts, its evaluation table, its counts across a resume."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import short_run, write_data

from deltakd.student.eval import EvalConfig, run_eval
from deltakd.student.model_card import hub_id_of
from deltakd.student.trainer import train

run_cfg = short_run


def header_and_body(card: Path) -> tuple[dict, str]:
    text = card.read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


@pytest.fixture(scope="module")
def run(tiny, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "run"
    cfg = run_cfg(tiny, cache_dir, out)
    res = train(cfg)
    return cfg, res


def test_the_export_carries_a_hugging_face_model_card(run, cache_dir):
    cfg, res = run
    head, body = header_and_body(Path(cfg.out) / "final" / "README.md")
    assert head["library_name"] == "transformers"
    assert head["base_model"] == cfg.student  # a local folder: the path as given
    assert {"distillation", "knowledge-distillation", "deltakd", "sft"} <= set(head["tags"])
    assert "delta-kd" not in head["tags"] and "datasets" not in head  # KD only; a local JSONL is no Hub dataset
    assert head["pipeline_tag"] == "text-generation"
    manifest = json.loads((Path(cache_dir) / "manifest.json").read_text())
    assert f"`{cfg.objective()}`" in body
    assert hashlib.sha256((Path(cache_dir) / "manifest.json").read_bytes()).hexdigest() in body
    for ck in manifest["checkpoints"].values():
        assert ck["path"] in body and ck["weights_sha256"][:16] in body
    assert manifest["data"]["sha256"] in body and manifest["data"]["path"] in body
    assert f"{manifest['totals']['n_supervised']} supervised" in body
    assert "4 optimizer steps over " in body
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert f"| eval_kd | {rows[-1]['eval_kd']:.6g} |" in body and f"| loss | {rows[-2]['loss']:.6g} |" in body
    assert "Not evaluated yet" in body


def test_eval_fills_in_the_evaluation_table_and_leaves_other_cards_alone(run, tiny, tmp_path):
    cfg, _ = run
    final = Path(cfg.out) / "final"
    card = final / "README.md"
    teacher_card = Path(tiny["teacher_ft"]) / "README.md"
    teacher_card.write_text("# a card deltakd did not write\n")
    try:
        test = write_data(tmp_path / "test.jsonl", n=3, seed=7)
        ecfg = dict(models=(str(final), tiny["teacher_ft"]), data=test, out=str(tmp_path / "e"), max_new_tokens=4)
        res = run_eval(EvalConfig(**ecfg))
        assert [r["card_updated"] for r in res] == [True, False]
        assert teacher_card.read_text() == "# a card deltakd did not write\n"
        run_eval(EvalConfig(**ecfg))  # the same data and decoding again: the row is replaced
        run_eval(EvalConfig(**(ecfg | {"sample": True, "seeds": (0, 1), "models": (str(final),)})))
    finally:
        teacher_card.unlink()
    head, body = header_and_body(card)
    assert head["library_name"] == "transformers"  # the header is untouched
    table = [line for line in body.splitlines() if line.startswith(f"| `{test}`")]
    assert len(table) == 2 and "greedy, 4 new tokens" in table[0] and "sampling" in table[1]
    assert f"{res[0]['rougeL']:.2f} |" in table[0] and "Not evaluated yet" not in body


def test_a_resumed_run_counts_the_tokens_of_the_whole_run(run, tiny, cache_dir, tmp_path):
    cfg, _ = run
    other = tmp_path / "resumed"
    (other / "checkpoints").mkdir(parents=True)
    shutil.copytree(Path(cfg.out) / "checkpoints" / "step-000002", other / "checkpoints" / "step-000002")
    shutil.copy(Path(cfg.out) / "metrics.jsonl", other / "metrics.jsonl")
    train(run_cfg(tiny, cache_dir, other))
    whole = header_and_body(Path(cfg.out) / "final" / "README.md")[1]
    resumed = header_and_body(other / "final" / "README.md")[1]
    line = lambda body: next(l for l in body.splitlines() if "optimizer steps over" in l)  # noqa: E731
    assert line(resumed) == line(whole) and " 0 tokens" not in line(whole)


def test_the_base_model_is_a_hub_id_when_one_is_known(tmp_path):
    assert hub_id_of("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    snap = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert hub_id_of(str(snap)) == "HuggingFaceTB/SmolLM2-135M"
    assert hub_id_of(str(tmp_path)) is None
