"""The cache builder against a float64 full-vocabulary recomputation, plus resume,
distributed, add-student, validate and the refusals of bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deltakd.cache.build.add_student import AddStudentConfig, add_student
from deltakd.cache.build.builder import CacheBuildConfig, build_cache
from deltakd.cache.format import schema
from deltakd.cache.format.reader import CacheReader
from deltakd.cache.format.records import DataError
from deltakd.cache.format.validate import validate
from deltakd.runtime.checkpoints import CheckpointError
from deltakd.student.objective import TailProposal

TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}  # relative rounding of each value dtype


def build(tiny, out, student=True, **kw):
    if kw.get("mode") == "sequential":
        kw.setdefault("tail_samples", 0)  # samples are drawn in lockstep builds only
    cfg = CacheBuildConfig(
        teacher_ft=tiny["teacher_ft"],
        teacher_base=tiny["teacher_base"],
        data=tiny["data"],
        out=str(out),
        student_base=tiny["student_base"] if student else None,
        **{"top_k": 16, "max_length": 64, "batch_size": 3, "shard_tokens": 200, "chunk_rows": 7, **kw},
    )
    return build_cache(cfg)


def cache_content(path) -> dict:
    """Every array of every shard, by shard and array name (manifests may differ in timings)."""
    root = Path(path)
    out = {}
    for d in (schema.TEACHER_DIR, schema.STUDENT_DIR):
        for g in sorted((root / d).glob("shard-*")):
            names = [p.name for p in g.iterdir() if p.is_dir()]
            for n, a in schema.read_group(g, names).items():
                out[f"{d}/{g.name}/{n}"] = a
    return out


def assert_same_content(a, b):
    ca, cb = cache_content(a), cache_content(b)
    assert sorted(ca) == sorted(cb)
    for k in ca:
        np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)


def full_logprobs64(path, tokens, vocab):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    with torch.no_grad():
        return torch.log_softmax(m(tokens[None]).logits[0, :, :vocab], -1)


def reference_sources(lT, lB, lS, support, alphas, floor):
    """The distributions whose top-k make up the support, float64 log-probs (L, V) each."""
    if support == "topk":
        return [lT]
    shift = lT.clamp_min(floor) - lB.clamp_min(floor)
    return [lT, lB, lS] + [torch.log_softmax(lS + a * shift, -1) for a in alphas]


def top_by_mass(x, k, mass, min_k):
    """How many of x's top-k ids (float64 log-probs) hold `mass`, at least min_k."""
    cum = x.topk(k).values.exp().cumsum(0)
    return min(max(int((cum < mass).sum()) + 1, min_k), k)


@pytest.mark.parametrize(
    "support,mode,dtype,samples,mass",
    [
        # The default build (union, lockstep, tail samples) runs in the quick tier; the other layouts in the full suite.
        pytest.param("topk", "sequential", "float32", 0, 0.0, marks=pytest.mark.integration),
        pytest.param("topk", "sequential", "float16", 0, 0.0, marks=pytest.mark.integration),
        pytest.param("topk", "lockstep", "bfloat16", 0, 0.0, marks=pytest.mark.integration),
        pytest.param("union", "lockstep", "float32", 0, 0.0, marks=pytest.mark.integration),
        pytest.param("union", "lockstep", "float16", 0, 0.0, marks=pytest.mark.integration),
        ("union", "lockstep", "float32", 5, 0.0),
        ("union", "lockstep", "float32", 5, 0.05),  # --top-mass 0.05 --min-k 3: the tiny models are broad
    ],
)
def test_cached_values_equal_float64_full_vocabulary(tiny, tmp_path, support, mode, dtype, samples, mass):
    min_tail, min_k = 0.2, 3
    kw = dict(top_mass=mass, min_k=min_k) if mass else {}
    build(
        tiny,
        tmp_path / "c",
        dtype=dtype,
        support=support,
        mode=mode,
        tail_samples=samples,
        sample_min_tail=min_tail,
        **kw,
    )
    r = CacheReader(tmp_path / "c")
    V, k, tol, floor = tiny["vocab"], r.k, TOL[dtype], schema.parse_floor(CacheBuildConfig.floor)
    alphas = (0.5, 1.0, 1.5)
    assert r.vocab_size == V and r.has_student and len(r) == 24 and r.support == support
    assert r.alphas == (alphas if mode == "lockstep" else ()) and r.floor == floor
    n_checked = widths = n_sampled_rows = 0
    cut_rows = 0
    for seq in r.iter_sequences():
        lT = full_logprobs64(tiny["teacher_ft"], seq.tokens, V)
        lB = full_logprobs64(tiny["teacher_base"], seq.tokens, V)
        lS = full_logprobs64(tiny["student_base"], seq.tokens, V)
        pos = seq.loss_mask.nonzero()[:, 0]
        assert len(pos) == len(seq.support_ids) > 0
        for row, t in enumerate(pos.tolist()):
            all_ids = seq.support_ids[row][seq.valid[row]]
            n_s = int(seq.sampled[row].sum()) if samples else 0
            ids, drawn = all_ids[: len(all_ids) - n_s], all_ids[len(all_ids) - n_s :]
            assert torch.all(ids[1:] > ids[:-1]), "ids ascend within a row, no repeats"
            widths = max(widths, len(ids))
            if samples:
                # Drawn ids: after the top-k ids, ascending, none of them in the top-k support;
                # drawn (as many as the tail has, up to m) exactly where πT's tail holds >= min_tail.
                assert torch.all(drawn[1:] > drawn[:-1]) and not set(drawn.tolist()) & set(ids.tolist())
                assert seq.sampled[row][len(all_ids) - n_s : len(all_ids)].all()
                det_rest = torch.ones(V, dtype=torch.bool)
                det_rest[ids] = False
                tail_mass = float(lT[t][det_rest].exp().sum())
                if tail_mass >= min_tail * (1 + 1e-4):
                    assert n_s == min(samples, int(det_rest.sum())), (n_s, tail_mass)
                    n_sampled_rows += 1
                    # τ is the (m+1)-th priority πT/u: every drawn id's priority is above it.
                    assert (not torch.isfinite(seq.sample_tau[row])) == (int(det_rest.sum()) <= samples)
                elif tail_mass <= min_tail * (1 - 1e-4):
                    assert n_s == 0 and torch.isneginf(seq.sample_tau[row])
            # The support is exactly the union of each source's top-k (ties within 1e-5 either way);
            # by mass, of each source's top n, n from the mass (within a float32 running sum's error).
            sources = reference_sources(lT[t], lB[t], lS[t], support, alphas, floor)
            lo = [top_by_mass(x, k, mass * (1 - 1e-4), min_k) if mass else k for x in sources]
            hi = [top_by_mass(x, k, mass * (1 + 1e-4), min_k) if mass else k for x in sources]
            for x, n in zip(sources, lo):
                assert int((x[ids] >= x.topk(n).values[-1] - 1e-5).sum()) >= n
            kth = [x.topk(n).values[-1] for x, n in zip(sources, hi)]
            cut_rows += any(n < k for n in hi)
            assert all(any(x[y] >= kx - 1e-5 for x, kx in zip(sources, kth)) for y in ids.tolist())
            ids = all_ids  # every value below is stored on the drawn ids too, and the tails exclude them
            rest = torch.ones(V, dtype=torch.bool)
            rest[ids] = False
            K = len(ids)
            pairs = [
                (seq.logp_ft[row][:K], lT[t][ids]),
                (seq.logp_base[row][:K], lB[t][ids]),
                (seq.logp_s0[row][:K], lS[t][ids]),
                (seq.tail_ft[row], lT[t][rest].logsumexp(0)),
                (seq.tail_base[row], lB[t][rest].logsumexp(0)),
                (seq.tail_s0[row], lS[t][rest].logsumexp(0)),
            ]
            if mode == "lockstep":
                shift = lT[t].clamp_min(floor) - lB[t].clamp_min(floor)
                pairs += [(seq.tail_star[row, i], (lS[t] + a * shift)[rest].logsumexp(0)) for i, a in enumerate(alphas)]
            for cached, ref in pairs:
                np.testing.assert_allclose(cached.double().numpy(), ref.numpy(), rtol=tol, atol=tol)
            assert torch.isneginf(seq.logp_ft[row][K:]).all()
            n_checked += 1
        # Alignment: position t predicts token t+1, which belongs to the response.
        assert not seq.loss_mask[-1]
    assert n_checked == r.manifest["totals"]["n_supervised"]
    if mass:  # the mass cut some source short of k ids in some rows, and the support follows it (above)
        assert r.manifest["top_mass"] == mass and r.manifest["min_k"] == min_k
        assert cut_rows > 0
    else:
        assert widths == k if support == "topk" else widths > k
    if samples:
        assert r.manifest["tail_samples"] == samples and n_sampled_rows > 0
    assert validate(tmp_path / "c") == []


@pytest.mark.integration  # builds several caches or kills a build
def test_lockstep_equals_sequential_for_topk(tiny, tmp_path):
    build(tiny, tmp_path / "lock", support="topk", mode="lockstep", dtype="float32", tail_samples=0)
    build(tiny, tmp_path / "seq", support="topk", mode="sequential", dtype="float32")
    a, b = cache_content(tmp_path / "lock"), cache_content(tmp_path / "seq")
    # Only lockstep sees the three distributions at once, so only it stores pi*'s exact tails: one
    # tail_star per student shard, and every other array of both caches is the same.
    student_shards = sorted(g.name for g in (tmp_path / "lock" / schema.STUDENT_DIR).glob("shard-*"))
    assert student_shards
    assert sorted(set(a) - set(b)) == [f"{schema.STUDENT_DIR}/{g}/tail_star" for g in student_shards]
    assert not set(b) - set(a)
    for key in b:
        if a[key].dtype.kind == "f":
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_k_equal_to_vocabulary_has_empty_tail(tiny, tmp_path):
    build(tiny, tmp_path / "c", student=False, top_k=10_000, dtype="float32")
    r = CacheReader(tmp_path / "c")
    assert r.k == tiny["vocab"]
    seq = next(r.iter_sequences())
    assert torch.isneginf(seq.tail_ft).all() and torch.isneginf(seq.tail_base).all()
    np.testing.assert_allclose(seq.logp_ft.exp().sum(1).numpy(), 1.0, rtol=1e-5)
    assert validate(tmp_path / "c") == []


def _cli(*args, env=None):
    return [sys.executable, "-m", "deltakd.cli", *args]


def _build_args(tiny, out, **kw):
    opts = {
        "top_k": 16,
        "max_length": 64,
        "batch_size": 2,
        "shard_tokens": 120,
        "chunk_rows": 7,
        **({"tail_samples": 0} if kw.get("mode") == "sequential" else {}),
        **kw,
    }
    args = [
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


@pytest.mark.integration  # builds several caches or kills a build
@pytest.mark.parametrize(
    "kill_when,mode,support",
    [("staged", "sequential", "topk"), ("committed", "sequential", "topk"), ("committed", "lockstep", "union")],
)
def test_killed_build_resumes_to_identical_content(tiny, tmp_path, kill_when, mode, support):
    ref = tmp_path / "ref"
    build(tiny, ref, shard_tokens=120, batch_size=2, mode=mode, support=support)
    out = tmp_path / "killed"
    args = _build_args(tiny, out, mode=mode, support=support)
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            staged = list((out / "stage").glob("*/*.npz")) if (out / "stage").exists() else []
        except FileNotFoundError:  # a shard's stage folder removed by its commit while being listed
            staged = []
        committed = (
            [d for d in (out / schema.TEACHER_DIR).glob("shard-?????")] if (out / schema.TEACHER_DIR).exists() else []
        )
        if (kill_when == "staged" and staged) or (kill_when == "committed" and committed):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the build finished before it could be killed; " + proc.stderr.read().decode()[-500:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / schema.MANIFEST).exists()
    res = subprocess.run(_cli(*args), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_same_content(ref, out)
    assert validate(out) == []
    assert not list(out.rglob("*.partial"))


@pytest.mark.integration  # builds several caches or kills a build
def test_two_ranks_give_the_same_content_as_one(tiny, tmp_path):
    # Bit-identical content needs the same float reduction order: one thread everywhere.
    env = {**os.environ, "DELTAKD_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    res = subprocess.run(_cli(*_build_args(tiny, ref, batch_size=2)), capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "ddp"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29617",
            "-m",
            "deltakd.cli",
            *_build_args(tiny, out, batch_size=2),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_content(ref, out)
    m = json.loads((out / schema.MANIFEST).read_text())
    assert m["summary"]["world_size"] == 2 and m["totals"]["n_seqs"] == 24


@pytest.mark.integration  # builds several caches or kills a build
def test_add_student_equals_building_with_the_student(tiny, tmp_path):
    build(tiny, tmp_path / "with", support="topk", mode="sequential")
    build(tiny, tmp_path / "later", student=False, support="topk", mode="sequential")
    assert not CacheReader(tmp_path / "later").has_student
    # manifest.alphas: the grid asked for, even where no tails were stored for it (FORMAT.md).
    assert CacheReader(tmp_path / "later").manifest["alphas"] == [0.5, 1.0, 1.5]
    add_student(AddStudentConfig(cache=str(tmp_path / "later"), student_base=tiny["student_base"], batch_size=5))
    assert_same_content(tmp_path / "with", tmp_path / "later")
    assert validate(tmp_path / "later") == []
    # Replacing with another student (here: the teacher base, same tokenizer) rewrites the arrays.
    add_student(AddStudentConfig(cache=str(tmp_path / "later"), student_base=tiny["teacher_base"]))
    m = CacheReader(tmp_path / "later").manifest
    assert m["student"]["checkpoint"]["path"] == str(Path(tiny["teacher_base"]).resolve())
    assert validate(tmp_path / "later") == []
    assert not (tmp_path / "later" / "stage").exists()


def _edited(path: Path, edit) -> list[str]:
    """validate() of the cache with one JSON file edited, then the file restored."""
    text = path.read_text()
    obj = json.loads(text)
    edit(obj)
    path.write_text(json.dumps(obj))
    try:
        return validate(path.parent)
    finally:
        path.write_text(text)


def test_manifest_arrays_and_build_file_agree(tiny, tmp_path, capsys):
    out = tmp_path / "u"
    build(tiny, out)
    m = CacheReader(out).manifest
    assert m["alphas"] == m["student"]["alphas"] == [0.5, 1.0, 1.5]
    assert not any(p.name.startswith(".deltakd") for p in out.iterdir())  # no lock left in a finished cache
    # Chunks hold min(rows, N) rows (FORMAT.md, Codec).
    z = json.loads((out / "shards" / "shard-00000" / "tokens" / "zarr.json").read_text())
    n_tokens = m["shards"][0]["n_tokens"]
    assert z["chunk_grid"]["configuration"]["chunk_shape"] == [min(n_tokens, schema.TOKEN_CHUNK_ROWS)]
    # add-student with the cache's own student: nothing to do, nothing rewritten.
    before = (out / schema.MANIFEST).read_bytes()
    add_student(AddStudentConfig(cache=str(out), student_base=tiny["student_base"]))
    assert "nothing to do" in capsys.readouterr().err
    assert (out / schema.MANIFEST).read_bytes() == before and validate(out) == []
    # What validate finds: a manifest that hides exact tails there (the add-student of earlier
    # versions wrote that), sample arrays it does not announce, a build.json that disagrees.
    hidden = "\n".join(_edited(out / schema.MANIFEST, lambda m: m["student"].update(alphas=[])))
    assert "shard-00000 (student): holds tail_star (3 exact target tails per row)" in hidden
    assert "the alphas of the build's exact target tails is [0.5, 1.0, 1.5], the manifest says []" in hidden
    samples = "\n".join(_edited(out / schema.MANIFEST, lambda m: m.update(tail_samples=0)))
    assert (
        "holds tail-sample array sample_len" in samples
        and f"tail_samples is {m['tail_samples']}, the manifest says 0" in samples
    )
    assert "n_shards is 99" in "\n".join(_edited(out / schema.BUILD_FILE, lambda b: b.update(n_shards=99)))


@pytest.mark.integration  # builds several caches or kills a build
def test_add_student_on_a_union_cache_says_what_it_cannot_provide(tiny, tmp_path, capsys):
    build(tiny, tmp_path / "u", tail_proposal="teacher")  # the default's draws from π* refuse add-student
    assert CacheReader(tmp_path / "u").alphas == (0.5, 1.0, 1.5)
    add_student(AddStudentConfig(cache=str(tmp_path / "u"), student_base=tiny["teacher_base"]))
    err = capsys.readouterr().err
    assert "union support" in err and "exact target tails" in err and "Rebuild with --student-base" in err
    r = CacheReader(tmp_path / "u")
    assert r.alphas == () and r.has_student and validate(tmp_path / "u") == []
    # build.json still describes the build (its student, its tails); exact tails announced for
    # another student's arrays would be a lie validate names.
    assert json.loads((tmp_path / "u" / schema.BUILD_FILE).read_text())["alphas"] == [0.5, 1.0, 1.5]
    lie = _edited(tmp_path / "u" / schema.MANIFEST, lambda m: m["student"].update(alphas=[0.5, 1.0, 1.5]))
    assert any("come from `deltakd cache add-student`" in p for p in lie), lie
    assert (
        r.read_shard(r.shard_names[0]).arrays["logp_s0"].shape == r.read_shard(r.shard_names[0]).arrays["logp_ft"].shape
    )


def test_validate_names_the_shard_and_array_of_a_flipped_byte(tiny, tmp_path):
    build(tiny, tmp_path / "c")
    assert validate(tmp_path / "c") == []
    chunk = next(
        p for p in (tmp_path / "c" / schema.TEACHER_DIR / "shard-00001" / "logp_base" / "c").rglob("*") if p.is_file()
    )
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    problems = validate(tmp_path / "c")
    assert problems and "shard-00001" in problems[0] and "logp_base" in problems[0]
    res = subprocess.run(_cli("cache", "validate", str(tmp_path / "c")), capture_output=True, text=True)
    assert res.returncode == 1 and "shard-00001" in res.stderr


def test_refuses_a_folder_built_with_other_settings(tiny, tmp_path):
    build(tiny, tmp_path / "c")
    m = build(tiny, tmp_path / "c")  # same settings: a no-op resume that keeps the provenance whole
    assert m["data"]["path"] == str(Path(tiny["data"]).resolve()) and m["summary"]["shards_built_this_run"] == 0
    with pytest.raises(ValueError, match="other inputs or settings.*k"):
        build(tiny, tmp_path / "c", top_k=8)


def test_truncation_is_counted(tiny, tmp_path):
    m = build(tiny, tmp_path / "c", max_length=24)
    assert m["summary"]["n_truncated"] > 0
    r = CacheReader(tmp_path / "c")
    assert all(len(s.tokens) <= 24 and s.loss_mask.any() for s in r.iter_sequences())
    assert len(r) == 24  # truncated, none dropped


def _bad_input(tiny, tmp_path, **over):
    args = {
        "teacher_ft": tiny["teacher_ft"],
        "teacher_base": tiny["teacher_base"],
        "data": tiny["data"],
        "out": str(tmp_path / "c"),
        **over,
    }
    build_cache(CacheBuildConfig(**args))


def test_refuses_mismatched_tokenizers(tiny, tmp_path):
    from deltakd.demo.tiny import save_checkpoint, tiny_llama, train_tokenizer

    other_tok = train_tokenizer(["completely different words here"] * 10, 280, tmp_path / "tok2")
    other = save_checkpoint(tiny_llama(len(other_tok), tokenizer=other_tok), other_tok, tmp_path / "other")
    with pytest.raises(CheckpointError, match="tokenizers of teacher_base .* differ"):
        _bad_input(tiny, tmp_path, teacher_base=other)
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_refuses_a_vocabulary_smaller_than_the_tokenizer(tiny, tmp_path):
    from transformers import AutoTokenizer

    from deltakd.demo.tiny import save_checkpoint, tiny_llama

    tok = AutoTokenizer.from_pretrained(tiny["teacher_ft"])
    small = save_checkpoint(tiny_llama(tiny["vocab"] - 5, tokenizer=tok), tok, tmp_path / "small")
    with pytest.raises(CheckpointError, match="output rows but its tokenizer has"):
        _bad_input(tiny, tmp_path, teacher_base=small)


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "no records"),
        ('{"prompt": "a", "response": "b"}\n{"prompt": "oops"\n', r"train.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "response": "b"}\n{"prompt": "no answer"}\n', r"train.jsonl:2: record has no response"),
        ('{"text": "x"}\n', r"train.jsonl:1: record has neither"),
    ],
)
def test_refuses_bad_data_with_file_and_line(tiny, tmp_path, content, match):
    p = tmp_path / "train.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        _bad_input(tiny, tmp_path, data=str(p))
    with pytest.raises(DataError, match="cannot read"):
        _bad_input(tiny, tmp_path, data=str(tmp_path / "missing.jsonl"))


def test_nan_teacher_stops_with_the_example_id(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(tiny["teacher_base"])
    with torch.no_grad():
        m.lm_head.weight[5] = float("nan")
    m.save_pretrained(tmp_path / "nan")
    AutoTokenizer.from_pretrained(tiny["teacher_base"]).save_pretrained(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match="base checkpoint produced NaN/Inf log-probs for example"):
        _bad_input(tiny, tmp_path, teacher_base=str(tmp_path / "nan"))


def test_reader_refuses_unfinished_and_future_caches(tiny, tmp_path):
    with pytest.raises(schema.CacheFormatError, match="no manifest.json"):
        CacheReader(tmp_path)
    build(tiny, tmp_path / "c", student=False)
    m = json.loads((tmp_path / "c" / schema.MANIFEST).read_text())
    m["format_version"] = 99
    (tmp_path / "c" / schema.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(schema.CacheFormatError, match="format version 99"):
        CacheReader(tmp_path / "c")


@pytest.mark.parametrize("kind", ["target", "mixture"])
def test_a_cache_drawing_from_the_target_is_recorded_validated_and_trained_from(kind, tiny, tmp_path, monkeypatch):
    """--tail-proposal target or mixture: the manifest says so, validate agrees, the drawn ids differ from a
    build that draws from πT (same seeds), add-student refuses the cache, a student trains from it on P3 and
    on KD (which then reads lS0 to weigh the draws), and a setting the build cannot honour is refused before
    any work."""
    from deltakd.student import objective as O
    from deltakd.student.trainer import TrainConfig, Trainer

    build(tiny, tmp_path / "t", tail_proposal=kind)
    build(tiny, tmp_path / "p", tail_proposal="teacher")  # the same build drawing from πT
    r = CacheReader(tmp_path / "t")
    assert r.tail_proposal == kind and CacheReader(tmp_path / "p").tail_proposal == "teacher"
    assert "tail_proposal" not in json.loads((tmp_path / "p" / schema.MANIFEST).read_text())
    assert validate(tmp_path / "t") == []
    a, b = cache_content(tmp_path / "t"), cache_content(tmp_path / "p")
    assert not all(np.array_equal(a[k], b[k]) for k in a if k in b)
    with pytest.raises(schema.CacheFormatError, match=f"--tail-proposal {kind}"):
        add_student(AddStudentConfig(cache=str(tmp_path / "t"), student_base=tiny["teacher_base"]))
    assert validate(tmp_path / "t") == []  # nothing was written
    # A proposal this deltakd does not know is refused (its weights would be wrong), and one build.json
    # does not record is named by validate.
    unknown = _edited(tmp_path / "t" / schema.MANIFEST, lambda m: m.update(tail_proposal="student"))
    assert any("tail_proposal 'student' is not known" in p for p in unknown), unknown
    lie = _edited(tmp_path / "p" / schema.MANIFEST, lambda m: m.update(tail_proposal=kind))
    assert any(f"tail_proposal is None, the manifest says '{kind}'" in p for p in lie), lie
    for bad, match in (
        (dict(student=False), "--student-base"),
        (dict(tail_samples=0), "--tail-samples"),
        (dict(alphas="0.5,1.5"), "1 in --alphas"),
    ):
        with pytest.raises(ValueError, match=match):
            build(tiny, tmp_path / "bad", tail_proposal=kind, **bad)
    seen = []
    real = O.tail_cells_of
    monkeypatch.setattr(O, "tail_cells_of", lambda tg, spec: seen.append(spec.proposal) or real(tg, spec))
    for loss in ("p3", "kd"):
        cfg = TrainConfig(
            cache=str(tmp_path / "t"),
            student=tiny["student_base"],
            out=str(tmp_path / f"run-{loss}"),
            loss=loss,
            max_steps=2,
            batch_tokens=256,
            eval_percent=0,
        )
        tr = Trainer(cfg)
        assert tr.cache_s0  # KD too: the draws' weights need lS0
        tr.run()
    assert seen and set(seen) == {TailProposal(kind, 1.0, r.floor, r.alphas.index(1.0))}


def test_the_default_draws_from_the_mixture_where_the_build_can(tiny):
    """--tail-proposal auto: half πT, half π* where the build has what the mixture needs (a student base,
    a union support in lockstep, α 1 in the grid, samples); πT otherwise. What the user sets is kept."""
    kw = dict(teacher_ft=tiny["teacher_ft"], teacher_base=tiny["teacher_base"], data=tiny["data"], out="unused")
    s0 = tiny["student_base"]
    c = CacheBuildConfig(**kw, student_base=s0)
    assert (c.tail_proposal, c.top_k, c.tail_samples) == ("mixture", 16, 16)
    for other in (
        {},
        dict(student_base=s0, support="topk"),
        dict(student_base=s0, alphas="0.5,1.5"),
        dict(student_base=s0, tail_samples=0),
        dict(student_base=s0, mode="sequential", support="topk", tail_samples=0),
    ):
        assert CacheBuildConfig(**kw, **other).tail_proposal == "teacher", other
    assert CacheBuildConfig(**kw, student_base=s0, tail_proposal="target").tail_proposal == "target"
    assert CacheBuildConfig(**kw, student_base=s0, tail_proposal="teacher").tail_proposal == "teacher"
    with pytest.raises(ValueError, match="--tail-proposal mixture needs --student-base"):
        CacheBuildConfig(**kw, tail_proposal="mixture")
