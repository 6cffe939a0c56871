"""Shared fixtures: a tiny tokenizer, tiny random Llama checkpoints and a JSONL data file."""

from __future__ import annotations

import json
import random

import pytest
import torch

WORDS = (
    "alpha beta gamma delta river stone cloud seven green light north market tiny paper "
    "count list reverse upper lower answer question what is the of and to"
).split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_data(path, n=24, seed=0, long_every=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            resp = sentence(rng, rng.randint(3, 12) * (6 if long_every and i % long_every == 0 else 1))
            if i % 3 == 0:
                rec = {
                    "messages": [
                        {"role": "user", "content": sentence(rng, rng.randint(2, 8))},
                        {"role": "assistant", "content": resp},
                    ]
                }
            else:
                rec = {"prompt": sentence(rng, rng.randint(2, 8)), "response": resp}
            f.write(json.dumps(rec) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tokenizer + teacher_ft / teacher_base / student_base checkpoints + data."""
    from deltakd.demo.tiny import save_checkpoint, tiny_llama, train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    tok = train_tokenizer([sentence(rng, 20) for _ in range(200)], 300, root / "tok")
    V = len(tok)
    # The teachers' output layer is padded beyond the tokenizer: those rows must be masked.
    ft = tiny_llama(V + 13, hidden=48, seed=1, tokenizer=tok)
    base = tiny_llama(V + 13, hidden=48, seed=2, tokenizer=tok)
    s0 = tiny_llama(V, hidden=32, seed=3, tokenizer=tok)
    paths = {
        "teacher_ft": save_checkpoint(ft, tok, root / "teacher_ft"),
        "teacher_base": save_checkpoint(base, tok, root / "teacher_base"),
        "student_base": save_checkpoint(s0, tok, root / "student_base"),
        "data": write_data(root / "train.jsonl", n=24, long_every=7),
        "root": root,
        "vocab": V,
    }
    return paths


@pytest.fixture(scope="session")
def cache_dir(tiny, tmp_path_factory):
    """A cache with student-base arrays, several shards, k = 16."""
    from deltakd.cache.build.builder import CacheBuildConfig, build_cache

    out = tmp_path_factory.mktemp("cache") / "c"
    data = write_data(tmp_path_factory.mktemp("data") / "train.jsonl", n=60, seed=1)
    build_cache(
        CacheBuildConfig(
            teacher_ft=tiny["teacher_ft"],
            teacher_base=tiny["teacher_base"],
            data=data,
            out=str(out),
            student_base=tiny["student_base"],
            top_k=16,
            max_length=64,
            shard_tokens=300,
        )
    )
    return str(out)


def same_batches(mine, ref):
    """Two lists of loader batches are the same batches: ids, masks, every target tensor, global index."""
    assert len(mine) == len(ref) > 0
    for a, b in zip(mine, ref):
        assert a.example_ids == b.example_ids
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
        assert torch.equal(a.loss_mask, b.loss_mask)
        assert a.targets.keys() == b.targets.keys()
        assert all(torch.equal(a.targets[k], b.targets[k]) for k in a.targets)
        assert a.state["index"] == b.state["index"]  # the global position, whatever the rank


def short_run(tiny, cache_dir, out, **kw):
    """A 4-step KD + SFT run on the tiny world that saves at step 2 and evaluates a little: `kw` overrides."""
    from deltakd.student.trainer import TrainConfig

    base = dict(
        cache=cache_dir,
        student=tiny["student_base"],
        out=str(out),
        loss="kd",
        lam=0.5,
        max_steps=4,
        batch_tokens=256,
        log_every=1,
        save_every=2,
        eval_batches=2,
        warmup_steps=1,
    )
    return TrainConfig(**{**base, **kw})
