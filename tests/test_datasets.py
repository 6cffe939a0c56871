"""--data beyond JSONL: Parquet, Arrow, save_to_disk and Hub datasets give the records (and the cache) of the same
JSONL; field mapping; content identity; one-line errors naming the row; streaming. Everything is written here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import write_data

from deltakd.cache.build.builder import CacheBuildConfig, build_cache
from deltakd.cache.build.plan import scan
from deltakd.cache.format import schema
from deltakd.cache.format.records import DataError, Fields, data_sha256, read_records
from deltakd.cache.format.sources import DataSource, open_records

datasets = pytest.importorskip("datasets", reason="pip install 'deltakd[datasets]'")
pa = pytest.importorskip("pyarrow")
pytest.importorskip("pyarrow.parquet")  # pa.parquet


def rows_of(jsonl) -> list[dict]:
    """The JSONL's objects as table rows: every column in every row (null where a record has no such field)."""
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines()]
    keys = sorted({k for r in rows for k in r})
    return [{k: r.get(k) for k in keys} for r in rows]


def write_sources(jsonl, d: Path) -> dict[str, str]:
    """The same records as a Parquet file, a Parquet folder (two files), an Arrow stream file, and save_to_disk
    folders (a Dataset, and a DatasetDict whose train split is these records)."""
    ds = datasets.Dataset.from_list(rows_of(jsonl))
    d.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(d / "train.parquet"))
    (d / "pq").mkdir()
    half = len(ds) // 2
    ds.select(range(half)).to_parquet(str(d / "pq" / "train-00000-of-00002.parquet"))
    ds.select(range(half, len(ds))).to_parquet(str(d / "pq" / "train-00001-of-00002.parquet"))
    table = ds.data.table
    with pa.ipc.new_stream(str(d / "train.arrow"), table.schema) as w:
        w.write_table(table)
    ds.save_to_disk(str(d / "disk"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(d / "dict"))
    return {k: str(d / k) for k in ("train.parquet", "pq", "train.arrow", "disk", "dict")}


@pytest.fixture(scope="module")
def sources(tiny, tmp_path_factory):
    return write_sources(tiny["data"], tmp_path_factory.mktemp("sources"))


def test_every_source_gives_the_records_and_shards_of_the_jsonl(tiny, sources):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["teacher_ft"])
    ref = read_records(tiny["data"])
    ref_plan = scan(DataSource(tiny["data"]), tok, 64, 200, progress=False)
    for name, path in sources.items():
        stream = open_records(DataSource(path))
        assert list(stream) == ref, name
        assert stream.identity["hash_of"] == "records" and stream.n_records == len(ref)
        plan = scan(DataSource(path), tok, 64, 200, progress=False)  # the token ids of every shard, by digest
        assert (plan.sizes, plan.digests, plan.n_truncated) == (ref_plan.sizes, ref_plan.digests, ref_plan.n_truncated)
    digests = {open_records(DataSource(p)).identity is None for p in sources.values()}  # set only after a pass
    assert digests == {True}
    test = list(open_records(DataSource(sources["dict"], split="test")))
    assert test == ref[:3]
    assert list(open_records(DataSource(sources["dict"], default_split="test"))) == ref[:3]  # eval's default


def test_jsonl_keeps_its_identity_and_other_sources_hash_their_records(tiny, sources):
    stream = open_records(DataSource(tiny["data"]))
    list(stream)
    # Exactly what caches built from JSONL have always recorded, so that they still resume.
    assert stream.identity == {"path": str(Path(tiny["data"]).resolve()), "sha256": data_sha256(tiny["data"])}
    shas = set()
    for p in sources.values():
        s = open_records(DataSource(p))
        list(s)
        shas.add(s.identity["sha256"])
    assert len(shas) == 1  # one content, one hash, whatever the container


def test_field_mapping_and_trl_layouts(tiny, tmp_path):
    ref = read_records(tiny["data"])
    plain = [r for r in ref if r.messages[0][1] and len(r.messages) == 1]
    rows = [{"instruction": r.messages[0][1], "output": r.response, "id": i} for i, r in enumerate(plain)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "alpaca.parquet"))
    fields = Fields(prompt="instruction", response="output")
    got = list(open_records(DataSource(str(tmp_path / "alpaca.parquet"), fields=fields)))
    assert [(g.messages, g.response) for g in got] == [(r.messages, r.response) for r in plain]
    # TRL's prompt-completion, plain and conversational, read with no options.
    trl = tmp_path / "trl.jsonl"
    with open(trl, "w") as f:
        for r in plain:
            f.write(json.dumps({"prompt": r.messages[0][1], "completion": r.response}) + "\n")
            f.write(
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": r.messages[0][1]}],
                        "completion": [{"role": "assistant", "content": r.response}],
                    }
                )
                + "\n"
            )
    got = read_records(trl)
    assert [(g.messages, g.response) for g in got[::2]] == [(r.messages, r.response) for r in plain]
    assert [(g.messages, g.response) for g in got[1::2]] == [(r.messages, r.response) for r in plain]
    # Other field names on JSONL: the identity hashes the records and names the fields.
    mapped = tmp_path / "alpaca.jsonl"
    mapped.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = open_records(DataSource(str(mapped), fields=fields))
    list(s)
    assert s.identity["fields"]["prompt"] == "instruction" and s.identity["hash_of"] == "records"


@pytest.mark.parametrize(
    "rows,match",
    [
        (
            [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": None}],
            r"bad\.parquet row 1: record has no resp",
        ),
        (
            [{"prompt": "a", "response": "b"}, {"prompt": "b", "response": "c"}, {"prompt": "c", "response": "  "}],
            r"bad\.parquet row 2: record has no response",
        ),
        ([{"text": "a"}], r"bad\.parquet row 0: record has neither 'prompt' nor 'messages'.*--prompt-field"),
        ([{"messages": [{"role": "user", "content": "a"}]}], r"row 0: record has no response"),
    ],
)
def test_bad_rows_are_named_on_one_line(tiny, tmp_path, capsys, rows, match):
    from deltakd.cli import main

    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(DataError, match=match):
        list(open_records(DataSource(str(path))))
    argv = ["cache", "build", "--teacher-ft", tiny["teacher_ft"], "--teacher-base", tiny["teacher_base"]]
    assert main(argv + ["--data", str(path), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("deltakd:")]  # beside a progress bar's remains
    assert "Traceback" not in err and len(lines) == 1 and "row" in lines[0], err
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_missing_library_unknown_split_and_empty_sets_are_refused(tiny, sources, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no split 'validation' \\(splits: train, test\\)"):
        list(open_records(DataSource(sources["dict"], split="validation")))
    empty = tmp_path / "empty.parquet"
    datasets.Dataset.from_list([{"prompt": "a", "response": "b"}]).select([]).to_parquet(str(empty))
    with pytest.raises(DataError, match="no records"):
        list(open_records(DataSource(str(empty))))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match=r"pip install 'deltakd\[datasets\]'"):
        list(open_records(DataSource(sources["train.parquet"])))
    assert len(read_records(tiny["data"])) == 24  # JSONL needs no extra


def build(tiny, data, out, **kw) -> dict:
    cfg = dict(
        top_k=8, max_length=64, batch_size=4, shard_tokens=200, tail_samples=0, support="topk", mode="sequential"
    )
    return build_cache(
        CacheBuildConfig(
            teacher_ft=tiny["teacher_ft"], teacher_base=tiny["teacher_base"], data=data, out=str(out), **cfg | kw
        )
    )


def cache_arrays(root) -> dict:
    out = {}
    for g in sorted((Path(root) / schema.TEACHER_DIR).glob("shard-*")):
        names = [p.name for p in g.iterdir() if p.is_dir()]
        out |= {f"{g.name}/{n}": a for n, a in schema.read_group(g, names).items()}
    return out


@pytest.fixture(scope="module")
def jsonl_cache(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("jc") / "c"
    return build(tiny, tiny["data"], out), out


@pytest.mark.parametrize("name", ["train.parquet", "dict"])
def test_the_cache_of_a_dataset_equals_the_cache_of_its_jsonl(tiny, sources, jsonl_cache, tmp_path, name):
    ref_manifest, ref = jsonl_cache
    m = build(tiny, sources[name], tmp_path / "c")
    a, b = cache_arrays(ref), cache_arrays(tmp_path / "c")
    assert sorted(a) == sorted(b) and len(a) > 10
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert m["totals"] == ref_manifest["totals"] and m["summary"]["n_records"] == 24
    assert m["data"]["hash_of"] == "records" and m["data"]["format"] == ("parquet" if "parquet" in name else "disk")


def test_a_changed_dataset_at_the_same_path_is_another_cache(tiny, tmp_path):
    data = tmp_path / "train.parquet"
    rows = rows_of(tiny["data"])
    datasets.Dataset.from_list(rows).to_parquet(str(data))
    build(tiny, str(data), tmp_path / "c", student_base=None)
    rows[5] = {**rows[5], "response": (rows[5]["response"] or "x") + " changed"}
    datasets.Dataset.from_list(rows).to_parquet(str(data))
    before = sorted(p.name for p in (tmp_path / "c" / schema.TEACHER_DIR).iterdir())
    with pytest.raises(ValueError, match="other inputs or settings \\(differs in: data"):
        build(tiny, str(data), tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c" / schema.TEACHER_DIR).iterdir()) == before


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_planning_memory_does_not_grow_with_the_data(tiny, tmp_path, kind):
    """Pass 1 holds one shard: its Python peak is flat from N to 4N records (a plan in memory grows 4x).
    Parquet is read a row group at a time (here 100 rows; writers use up to a million): large files have many."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["teacher_ft"])
    peaks = []
    for n in (250, 1000):
        path = write_data(tmp_path / f"d{n}.jsonl", n=n, seed=2)
        if kind == "parquet":
            table = pa.Table.from_pylist(rows_of(path))
            pa.parquet.write_table(table, tmp_path / f"d{n}.parquet", row_group_size=100)
            path = str(tmp_path / f"d{n}.parquet")
        list(open_records(DataSource(path)))  # warm caches and imports outside the measurement
        tracemalloc.start()
        plan = scan(DataSource(path), tok, 64, 300, progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert plan.n_records == n and plan.n_shards > 10
    assert peaks[1] < 1.5 * peaks[0], peaks


@pytest.mark.integration  # a subprocess: the Hub libraries read HF_HOME and offline mode when imported
def test_a_hub_dataset_is_read_offline_from_the_local_cache(tiny, jsonl_cache, tmp_path):
    import pyarrow.parquet as pq

    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "datasets--myorg--tiny-sft"
    commit = "0123456789abcdef0123456789abcdef01234567"
    files = repo / "snapshots" / commit / "data"
    files.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    table = pa.Table.from_pylist(rows_of(tiny["data"]))
    pq.write_table(table, files / "train-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 3), files / "test-00000-of-00001.parquet")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = [sys.executable, "-m", "deltakd.cli", "cache", "build", "--teacher-ft", tiny["teacher_ft"]]
    args += ["--teacher-base", tiny["teacher_base"], "--data", "hf:myorg/tiny-sft", "--out", str(tmp_path / "c")]
    args += ["--top-k", "8", "--max-length", "64", "--batch-size", "4", "--shard-tokens", "200"]
    args += ["--tail-samples", "0", "--support", "topk", "--mode", "sequential"]
    res = subprocess.run(args, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = cache_arrays(jsonl_cache[1]), cache_arrays(tmp_path / "c")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["data"]["path"] == "hf:myorg/tiny-sft" and m["data"]["split"] == "train"


def test_a_hub_dataset_neither_reachable_nor_cached_is_refused_on_one_line(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'myorg/absent' on the Hub (OfflineModeIsEnabled)")

    def not_cached(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    with pytest.raises(DataError, match=r"hf:myorg/absent: not reachable .* not in the local Hugging Face cache"):
        list(open_records(DataSource("hf:myorg/absent")))
