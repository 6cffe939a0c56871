"""The student trainer: alignment, normalisation, exact resume, data parallel, refusals."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltakd.cache.format.reader import CacheReader
from deltakd.cache.format.schema import CacheFormatError
from deltakd.student.data import StreamingLoader
from deltakd.student.trainer import TrainConfig, Trainer, train


def cfg_for(tiny, cache_dir, out, **kw):
    base = dict(
        cache=cache_dir,
        student=tiny["student_base"],
        out=str(out),
        loss="p1",
        max_steps=6,
        batch_tokens=256,
        grad_accum=2,
        log_every=1,
        save_every=3,
        eval_percent=10.0,
        eval_batches=2,
        warmup_steps=2,
        lr=1e-3,
        chunk_rows=13,
    )
    return TrainConfig(**{**base, **kw})


def test_loader_aligns_targets_with_positions(cache_dir):
    reader = CacheReader(cache_dir)
    by_id = {s.example_id: s for s in reader.iter_sequences()}
    seen = 0
    for b in StreamingLoader(reader, batch_tokens=200, with_student=True, epochs=1, seed=3):
        rows = 0
        for i, ex in enumerate(b.example_ids):
            ref = by_id[ex]
            n = len(ref.tokens)
            assert torch.equal(b.input_ids[i, :n], ref.tokens)
            assert not b.attention_mask[i, n:].any() and not b.loss_mask[i, n:].any()
            pos = ref.loss_mask.nonzero()[:, 0]
            assert torch.equal(b.loss_mask[i].nonzero()[:, 0], pos)
            m = len(pos)
            # Row r of the targets belongs to position pos[r], which predicts token pos[r] + 1.
            assert torch.equal(b.targets["next_tokens"][rows : rows + m], ref.tokens[pos + 1])
            K = ref.support_ids.shape[1]  # the batch pads supports to its widest row, the sequence to its own
            assert not b.targets["valid"][rows : rows + m, K:].any()
            assert torch.equal(b.targets["valid"][rows : rows + m, :K], ref.valid)
            for key in ("support_ids", "logp_ft", "logp_base", "logp_s0"):
                got = b.targets[key][rows : rows + m, :K]
                assert torch.equal(got[ref.valid], getattr(ref, key)[ref.valid]), key
            for key in ("tail_ft", "tail_base", "tail_s0", "tail_star"):
                assert torch.equal(b.targets[key][rows : rows + m], getattr(ref, key)), key
            rows += m
            seen += 1
        assert rows == b.n_supervised and b.input_ids.numel() <= 200 or len(b.example_ids) == 1
    assert seen == len(reader)


def test_loader_resumes_at_the_exact_batch(cache_dir):
    reader = CacheReader(cache_dir)
    full = [b.example_ids for b in StreamingLoader(reader, batch_tokens=150, epochs=2, seed=1)]
    cut = 7
    state = None
    for i, b in enumerate(StreamingLoader(reader, batch_tokens=150, epochs=2, seed=1)):
        if i == cut - 1:
            state = b.state
            break
    rest = [b.example_ids for b in StreamingLoader(reader, batch_tokens=150, epochs=2, seed=1, state=state)]
    assert full[cut:] == rest
    # A second epoch visits the same sequences in another order.
    n = len(full) // 2
    assert sorted(sum(full[:n], [])) == sorted(sum(full[n:], [])) and full[:n] != full[n:]


def _widen(key, t, K):
    """Pad a batch's (n, K') support tensors to width K the way the loader pads (see cache/format/support.py)."""
    if key not in ("support_ids", "valid", "sampled", "logp_ft", "logp_base", "logp_s0") or t.shape[1] == K:
        return t
    none = torch.zeros(t.shape[0], K - t.shape[1], dtype=torch.bool)
    fill = {"support_ids": t[:, :1].expand(-1, K - t.shape[1]), "valid": none, "sampled": none}
    extra = fill.get(key, torch.full((t.shape[0], K - t.shape[1]), float("-inf")))
    return torch.cat([t, extra], dim=1)


def _grads(tr, micro):
    tr.opt.zero_grad()
    res = tr.train_step(micro)
    return torch.cat([p.grad.flatten() for p in tr.params]).clone(), res


def test_one_batch_of_n_equals_n_micro_batches(tiny, cache_dir, tmp_path):
    """Normalisation is per step: a 1xN and an Nx1 split give the same gradient."""
    tr = Trainer(
        cfg_for(tiny, cache_dir, tmp_path / "a", loss=None, w_kd=1.0, w_p3=1.0, w_sft=0.5, lr=0.0, warmup_steps=0)
    )
    batches = [b for _, b in zip(range(4), StreamingLoader(tr.reader, batch_tokens=120, with_student=True, seed=0))]
    assert len({b.n_supervised for b in batches}) > 1  # unequal token counts make the test meaningful
    # Merge the four micro-batches into one padded batch.
    L = max(b.input_ids.shape[1] for b in batches)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, L - t.shape[1]), value=v)  # noqa: E731
    from deltakd.student.data import Batch

    K = max(b.targets["support_ids"].shape[1] for b in batches)
    merged = Batch(
        torch.cat([pad(b.input_ids, 0) for b in batches]),
        torch.cat([pad(b.attention_mask, 0) for b in batches]),
        torch.cat([pad(b.loss_mask, False) for b in batches]),
        {k: torch.cat([_widen(k, b.targets[k], K) for b in batches]) for k in batches[0].targets},
        [],
        {},
    )
    g_n, r_n = _grads(tr, batches)
    g_1, r_1 = _grads(tr, [merged])
    torch.testing.assert_close(g_n, g_1, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(r_n["term_sums"], r_1["term_sums"], rtol=1e-5, atol=1e-6)


def _metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration  # several training runs
def test_killed_and_resumed_run_matches_uninterrupted(tiny, cache_dir, tmp_path):
    ref = train(cfg_for(tiny, cache_dir, tmp_path / "ref"))
    cfg = cfg_for(tiny, cache_dir, tmp_path / "run")
    # Stop after step 4 (checkpoint at 3), as a crash would; then resume with the same command.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "deltakd.cli", "train"]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is not None and not isinstance(v, bool):
            args += ["--" + f.name.replace("_", "-"), str(v)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("step=4 "):
            proc.kill()
            break
    proc.wait()
    assert (Path(cfg.out) / "checkpoints" / "step-000003").is_dir()
    assert not (Path(cfg.out) / "final").exists()
    res = subprocess.run(args, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    a = [m for m in _metrics(tmp_path / "ref") if "loss" in m]
    b = [m for m in _metrics(cfg.out) if "loss" in m]
    assert [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b):
        for key in ("loss", "p1", "grad_norm", "lr"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    assert ref["eval_p1"] == pytest.approx(_metrics(cfg.out)[-1]["eval_p1"], rel=1e-5)


@pytest.mark.integration  # several training runs
def test_two_ranks_match_one_rank_with_the_same_global_batch(tiny, cache_dir, tmp_path):
    env = {**os.environ, "DELTAKD_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    common = [
        "--cache",
        cache_dir,
        "--student",
        tiny["student_base"],
        "--loss",
        "kd+p3",
        "--max-steps",
        "3",
        "--batch-tokens",
        "256",
        "--log-every",
        "1",
        "--eval-percent",
        "10",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "1",
    ]
    one = subprocess.run(
        [sys.executable, "-m", "deltakd.cli", "train", *common, "--grad-accum", "2", "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    # The tiny base is broad, but the default cache's draws (half πT, half π*) carry P3's tail: no notice.
    assert "the student base keeps a median" not in one.stdout
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29631",
            "-m",
            "deltakd.cli",
            "train",
            *common,
            "--grad-accum",
            "1",
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = [m for m in _metrics(tmp_path / "one") if "loss" in m]
    b = [m for m in _metrics(tmp_path / "two") if "loss" in m]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in ("loss", "kd", "p3", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-4), (x["step"], key)


def test_final_student_loads_with_from_pretrained(tiny, cache_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train(cfg_for(tiny, cache_dir, tmp_path / "r", loss="kd", max_steps=2, divergence="rkl"))
    final = tmp_path / "r" / "final"
    assert (final / "model.safetensors").exists() and (final / "train_config.json").exists()
    m = AutoModelForCausalLM.from_pretrained(final)
    AutoTokenizer.from_pretrained(final)
    assert m.config.vocab_size == AutoModelForCausalLM.from_pretrained(tiny["student_base"]).config.vocab_size
    rec = _metrics(tmp_path / "r")[1]  # [0] names the objective (test_the_mix_is_printed_and_logged_first)
    for key in ("step", "lr", "grad_norm", "loss", "kd", "tokens_per_s", "peak_mem_mb", "eta_s"):
        assert key in rec


def _mix(**kw):
    return TrainConfig(cache="c", student="s", out="o", **kw).weights()


def test_weight_resolution():
    """A preset alone, named weights alone (the whole mix), the lam recipe; everything else refused."""
    assert _mix() == {"p1": 1.0}
    assert _mix(loss="kd+p3") == {"kd": 1.0, "p3": 1.0}
    # Named weights are the whole mix: the default preset p1 does not creep in.
    assert _mix(w_sft=0.5, w_kd=0.5) == {"sft": 0.5, "kd": 0.5}
    assert _mix(w_kd=1.0, w_p3=0.0) == {"kd": 1.0}
    assert _mix(loss="kd", lam=0.2) == {"sft": 0.2, "kd": pytest.approx(0.8)}
    assert _mix(lam=0.5) == {"sft": 0.5, "p1": 0.5}  # D defaults to the default preset, p1
    assert _mix(loss="kd+p3", lam=0.25) == {"sft": 0.25, "kd": 0.75, "p3": 0.75}
    assert _mix(loss="p1", lam=0.0) == {"p1": 1.0} and _mix(loss="p1", lam=1.0) == {"sft": 1.0}
    with pytest.raises(
        ValueError, match=r"would train 0\.5\*sft \+ 0\.5\*kd \+ 1\*p1.*drop --loss to train 0\.5\*sft \+ 0\.5\*kd"
    ):
        _mix(loss="p1", w_sft=0.5, w_kd=0.5)
    with pytest.raises(ValueError, match="--lam sets every weight"):
        _mix(loss="kd", lam=0.5, w_sft=0.1)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
            _mix(loss="kd", lam=bad)
    with pytest.raises(ValueError, match="--loss must be one of kd, p1"):
        _mix(loss="sft", lam=0.5)
    with pytest.raises(ValueError, match="every loss weight is zero"):
        _mix(w_sft=0.0)
    cfg = TrainConfig(cache="c", student="s", out="o", loss="p1", lam=0.5, alpha=1.5)
    assert cfg.objective() == "0.5*sft + 0.5*p1 (divergence fkl, alpha 1.5, tail bucket)"


def test_the_mix_is_printed_and_logged_first(tiny, cache_dir, tmp_path):
    cfg = cfg_for(tiny, cache_dir, tmp_path / "m", loss=None, w_sft=0.5, w_kd=0.5, max_steps=2)
    args = [sys.executable, "-m", "deltakd.cli", "train"]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is not None and not isinstance(v, bool):
            args += ["--" + f.name.replace("_", "-"), str(v)]
    res = subprocess.run(args, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "objective: 0.5*sft + 0.5*kd (divergence fkl, tail bucket)" in res.stdout
    rows = _metrics(cfg.out)
    assert rows[0] == {
        "step": 0,
        "objective": "0.5*sft + 0.5*kd (divergence fkl, tail bucket)",
        "weights": {"sft": 0.5, "kd": 0.5},
    }
    assert {"sft", "kd"} <= set(rows[1]) and "p1" not in rows[1]  # the terms trained are the terms named
    # The same options with a preset are refused before anything runs, showing the mix they would have trained.
    bad = subprocess.run(args + ["--loss", "p1", "--out", str(tmp_path / "m2")], capture_output=True, text=True)
    assert bad.returncode != 0 and "would train 0.5*sft + 0.5*kd + 1*p1" in bad.stderr
    assert not (tmp_path / "m2").exists()


def test_dry_run_reports_and_writes_no_checkpoint(tiny, cache_dir, tmp_path):
    res = train(cfg_for(tiny, cache_dir, tmp_path / "d", dry_run=True))
    assert res["dry_run"] and res["peak_mem_mb"] > 0 and res["student_base_arrays"] == "cache"
    assert not (tmp_path / "d" / "checkpoints").exists()


def test_online_student_base_equals_cached(tiny, tmp_path):
    from deltakd.cache.build.builder import CacheBuildConfig, build_cache

    # Online, lS0 comes without the exact target tails (they need the teachers too): compare
    # with a cache that has none either (one model at a time).
    cache = tmp_path / "seq"
    build_cache(
        CacheBuildConfig(
            teacher_ft=tiny["teacher_ft"],
            teacher_base=tiny["teacher_base"],
            data=tiny["data"],
            out=str(cache),
            student_base=tiny["student_base"],
            support="topk",
            mode="sequential",
            tail_samples=0,
            max_length=64,
        )
    )
    a = train(cfg_for(tiny, str(cache), tmp_path / "a", max_steps=2, log_every=1))
    b = train(cfg_for(tiny, str(cache), tmp_path / "b", max_steps=2, student_base_online=tiny["student_base"]))
    assert a["eval_p1"] == pytest.approx(b["eval_p1"], rel=2e-3)  # cache holds float16 values


def test_refusals(tiny, cache_dir, tmp_path):
    from deltakd.cache.build.builder import CacheBuildConfig, build_cache
    from deltakd.demo.tiny import save_checkpoint, tiny_llama, train_tokenizer

    no_s0 = tmp_path / "nos0"
    build_cache(
        CacheBuildConfig(
            teacher_ft=tiny["teacher_ft"],
            teacher_base=tiny["teacher_base"],
            data=tiny["data"],
            out=str(no_s0),
            top_k=8,
            max_length=48,
        )
    )
    with pytest.raises(CacheFormatError, match="deltakd cache add-student"):
        Trainer(cfg_for(tiny, str(no_s0), tmp_path / "x"))
    Trainer(cfg_for(tiny, str(no_s0), tmp_path / "x", loss="kd"))  # KD needs no student base
    tok = train_tokenizer(["other words entirely"] * 5, 270, tmp_path / "t2")
    other = save_checkpoint(tiny_llama(len(tok), tokenizer=tok), tok, tmp_path / "other")
    with pytest.raises(CacheFormatError, match="another tokenizer"):
        Trainer(cfg_for(tiny, cache_dir, tmp_path / "y", student=other))
    with pytest.raises(CacheFormatError, match="no manifest.json"):
        Trainer(cfg_for(tiny, str(tmp_path), tmp_path / "z"))
    train(cfg_for(tiny, cache_dir, tmp_path / "w", max_steps=1))
    with pytest.raises(ValueError, match="other settings .*alpha"):
        train(cfg_for(tiny, cache_dir, tmp_path / "w", max_steps=1, alpha=0.5))


def test_non_finite_loss_stops_before_the_step(tiny, cache_dir, tmp_path):
    tr = Trainer(cfg_for(tiny, cache_dir, tmp_path / "n"))
    with torch.no_grad():
        tr.model.get_output_embeddings().weight[3] = float("inf")
    before = [p.detach().clone() for p in tr.params]
    b = next(iter(StreamingLoader(tr.reader, batch_tokens=256, with_student=True)))
    with pytest.raises(FloatingPointError, match="non-finite loss at step 1"):
        tr.train_step([b])
    assert all(torch.equal(x, p.detach()) for x, p in zip(before, tr.params))


def test_config_file_with_command_line_override(tiny, cache_dir, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'cache = "{cache_dir}"\nstudent = "{tiny["student_base"]}"\nloss = "kd"\n'
        f'divergence = "jsd"\njsd_beta = 0.3\nbatch_tokens = 256\neval_percent = 10.0\n'
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltakd.cli",
            "train",
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "o"),
            "--dry-run",
            "--divergence",
            "skew_fkl",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads(res.stdout[res.stdout.index("{") :])
    assert rep["dry_run"] and set(rep["loss_terms"]) == {"kd"}
    saved = json.loads((tmp_path / "o" / "train_config.json").read_text())
    assert saved["divergence"] == "skew_fkl" and saved["jsd_beta"] == 0.3


def test_gradient_checkpointing_gives_the_same_step_and_bf16_runs(tiny, cache_dir, tmp_path):
    plain = train(cfg_for(tiny, cache_dir, tmp_path / "a", dry_run=True))
    ckpt = train(cfg_for(tiny, cache_dir, tmp_path / "b", dry_run=True, grad_checkpointing=True))
    assert ckpt["loss_terms"]["p1"] == pytest.approx(plain["loss_terms"]["p1"], rel=1e-5)
    assert ckpt["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
    bf16 = train(cfg_for(tiny, cache_dir, tmp_path / "c", dry_run=True, bf16=True))
    assert bf16["loss_terms"]["p1"] == pytest.approx(plain["loss_terms"]["p1"], rel=0.05)


def test_settings_the_cache_cannot_serve_are_refused(tiny, cache_dir, tmp_path):
    with pytest.raises(CacheFormatError, match="alphas 0.5, 1, 1.5 only"):
        Trainer(cfg_for(tiny, cache_dir, tmp_path / "a", alpha=0.7))
    built = CacheReader(cache_dir).floor  # the build's default floor
    with pytest.raises(CacheFormatError, match=f"computed with floor {built}"):
        Trainer(cfg_for(tiny, cache_dir, tmp_path / "f", floor="-8"))
    with pytest.raises(CacheFormatError, match="cannot be re-tempered"):
        Trainer(cfg_for(tiny, cache_dir, tmp_path / "t", loss="kd", temperature=2.0))
    with pytest.raises(ValueError, match="0 < beta < 1"):
        cfg_for(tiny, cache_dir, tmp_path / "j", loss="kd", divergence="jsd", jsd_beta=1.0)
    # Served: an alpha of the grid, the cache's floor, renormalised tails at another temperature.
    assert Trainer(cfg_for(tiny, cache_dir, tmp_path / "ok", alpha=1.5)).spec.star_col == 2
    assert (
        Trainer(cfg_for(tiny, cache_dir, tmp_path / "r", loss="kd", temperature=2.0, tail="renorm")).spec.floor == built
    )


def test_tied_embeddings_checkpoint_and_resume(tiny, cache_dir, tmp_path):
    """A student whose output head is its input embedding (SmolLM2, Llama-3.2, Gemma) saves a training
    checkpoint (safetensors refuses shared tensors) and resumes with the head still tied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from deltakd.demo.tiny import save_checkpoint
    from deltakd.student.checkpointing import load_training_state, save_training_state

    tok = AutoTokenizer.from_pretrained(tiny["student_base"])
    torch.manual_seed(0)
    tied = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=tiny["vocab"],
            hidden_size=32,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    student = save_checkpoint(tied, tok, tmp_path / "tied")
    cfg = cfg_for(tiny, cache_dir, tmp_path / "run", student=student, max_steps=2, save_every=1)
    train(cfg)
    tr = Trainer(cfg)
    step, _ = load_training_state(Path(cfg.out) / "checkpoints" / "step-000002", tr)
    assert step == 2
    emb, head = tr.model.get_input_embeddings().weight, tr.model.get_output_embeddings().weight
    assert emb.data_ptr() == head.data_ptr()
    assert not torch.equal(emb, tied.get_input_embeddings().weight)  # the trained weights came back
    save_training_state(tr)  # and saving again works


def test_mass_outside_is_what_the_stored_ids_leave(cache_dir):
    r = CacheReader(cache_dir)
    name = r.shard_names[1]
    t = r.read_shard(name).rows(torch.arange(int(r.read_shard(name).sup_offsets[-1])))
    held = torch.where(t["valid"], t["logp_s0"].double().exp(), torch.zeros((), dtype=torch.float64)).sum(1)
    outside = torch.from_numpy(r.mass_outside("s0", shard=1)).double()
    assert outside.shape == held.shape and float(outside.min()) > 0.05  # the tiny random student base is broad
    assert torch.allclose(held + outside, torch.ones_like(held), atol=5e-3)  # float16 storage


def test_broad_base_notice_names_the_objectives_that_read_the_tail(cache_dir, monkeypatch):
    from deltakd.student import trainer as T
    from deltakd.student.objective import LossSpec

    r = CacheReader(cache_dir)
    # A cache whose draws follow πT alone leaves P3's tail to the bucket.
    monkeypatch.setattr(CacheReader, "tail_proposal", property(lambda self: "teacher"))
    p3 = T.broad_base_notice(LossSpec(weights={"sft": 0.5, "p3": 0.5}), r)
    rkl = T.broad_base_notice(LossSpec(weights={"kd": 1.0}, divergence="rkl"), r)
    assert "P3" in p3 and str(r.root) in p3 and "rkl divergence" in rkl
    assert T.broad_base_notice(LossSpec(weights={"p1": 1.0}), r) is None  # forward KL: faithful
    assert "--tail-proposal target" in p3 and "--tail-proposal auto" in p3
    # Ids drawn with π* carry P3's tail: no note for P3 then, still one for reverse KL.
    for kind in ("target", "mixture"):
        monkeypatch.setattr(CacheReader, "tail_proposal", property(lambda self, k=kind: k))
        assert T.broad_base_notice(LossSpec(weights={"p3": 1.0}), r) is None
    both = T.broad_base_notice(LossSpec(weights={"p3": 0.5, "kd": 0.5}, divergence="rkl"), r)
    assert "On so broad a base, rkl divergence from a cache" in both
    monkeypatch.setattr(T, "BROAD_OUTSIDE", 1.01)  # no base is that broad: no notice
    assert T.broad_base_notice(LossSpec(weights={"p3": 1.0}), r) is None
