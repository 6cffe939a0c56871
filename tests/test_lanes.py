"""The loader's lanes: each rank decodes only its ~1/world of a shard, the plan depends on
world × accum alone, every row once per epoch, and one lane is the plan of earlier versions."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import pytest
from conftest import same_batches, write_data

from deltakd.cache.format import schema
from deltakd.cache.format.reader import CacheReader
from deltakd.student.data import (
    StreamingLoader,
    in_split,
    interleave,
    lane_range_of,
    lane_ranges,
    plan_lanes,
)


def _old_plan_shard(lengths, rows, batch_tokens, window, rng):
    """plan_shard as it was before lanes (a frozen copy: the reference for M = 1)."""
    if rng is not None:
        rows = rows[rng.permutation(len(rows))]
    batches = []
    for s in range(0, len(rows), window):
        w = rows[s : s + window]
        w = w[np.argsort(lengths[w], kind="stable")]
        cur, longest = [], 0
        for r in w.tolist():
            longest_new = max(longest, int(lengths[r]))
            if cur and longest_new * (len(cur) + 1) > batch_tokens:
                batches.append(cur)
                cur, longest_new = [], int(lengths[r])
            cur.append(r)
            longest = longest_new
        if cur:
            batches.append(cur)
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def test_one_lane_is_the_plan_of_earlier_versions(cache_dir):
    reader = CacheReader(cache_dir)
    kw = dict(batch_tokens=150, seed=7, eval_percent=20.0, epochs=2)
    got = [b.example_ids for b in StreamingLoader(reader, **kw)]
    ref = []
    for epoch in range(2):
        for sp, name in enumerate(reader.shard_order(shuffle=True, seed=7, epoch=epoch)):
            a = reader.read_shard(name, student=False, arrays=["seq_offsets", "loss_mask", "example_ids"]).arrays
            ex = a["example_ids"].numpy()
            rows = np.nonzero(in_split(ex, "train", 20.0))[0]
            plan = _old_plan_shard(
                np.diff(a["seq_offsets"].numpy()), rows, 150, 256, np.random.default_rng([7, epoch, sp])
            )
            ref += [[int(ex[r]) for r in b] for b in plan]
    assert got == ref
    # And directly, on a larger synthetic shard with several windows.
    lengths = np.random.default_rng(0).integers(5, 300, 1000)
    rows = np.arange(1000)[::2]
    assert plan_lanes(lengths, rows, 2048, 64, np.random.default_rng([1, 2, 3]), 1) == [
        _old_plan_shard(lengths, rows, 2048, 64, np.random.default_rng([1, 2, 3]))
    ]


def test_lane_ranges_balance_tokens_and_tolerate_few_rows():
    lengths = np.random.default_rng(1).integers(10, 200, 300)
    rows = np.arange(300)
    pieces = lane_ranges(lengths, rows, 4)
    assert np.array_equal(np.concatenate(pieces), rows)  # contiguous, in order, nothing lost
    tokens = [int(lengths[p].sum()) for p in pieces]
    assert max(tokens) - min(tokens) <= 2 * lengths.max()
    few = lane_ranges(lengths, rows[:3], 8)
    assert len(few) == 8 and sorted(np.concatenate(few).tolist()) == [0, 1, 2]
    assert [len(p) for p in lane_ranges(lengths, rows[:0], 4)] == [0] * 4
    lanes = plan_lanes(lengths, rows[:3], 4096, 256, np.random.default_rng(0), 8)
    assert sorted(len(b) for b in lanes) == [0] * 5 + [1] * 3  # one batch per non-empty lane
    for first in range(8):
        assert sorted(sum(interleave(lanes, first), [])) == [0, 1, 2]


# m -> the worlds that get one block each: products of m's smallest prime factors, and m.
ONE_BLOCK = {2: [1, 2], 4: [1, 2, 4], 6: [1, 2, 6], 8: [1, 2, 4, 8], 12: [1, 2, 4, 12], 16: [1, 2, 4, 8, 16]}


@pytest.mark.parametrize("m", sorted(ONE_BLOCK))
def test_a_rank_s_lanes_are_one_block_of_the_shard(m):
    where = lane_range_of(m)
    assert sorted(where) == list(range(m))
    for world in ONE_BLOCK[m]:
        for r in range(world):
            mine = sorted(where[lane] for lane in range(r, m, world))
            assert mine == list(range(mine[0], mine[0] + m // world)), (m, world, r, mine)
    if m == 6:  # 3 ranks x 2: not a product of the smallest factors, a rank gets two blocks
        assert sorted(where[lane] for lane in range(0, 6, 3)) == [0, 4]


def test_interleave_reads_each_lane_in_turn_and_substitutes_least():
    # Lanes of 3, 2, 4, 3 batches from position offset 1: lane (1 + p) % 4 while it has batches.
    lanes = [[[10 * k + j] for j in range(n)] for k, n in enumerate((3, 2, 4, 3))]
    out = interleave(lanes, first=1)
    assert sorted(sum(out, [])) == sorted(sum(sum(lanes, []), []))
    lane_of = [b[0] // 10 for b in out]
    assert lane_of[:8] == [1, 2, 3, 0, 1, 2, 3, 0]  # round robin while every lane has batches
    wanted = Counter((1 + p) % 4 for p in range(len(out)))  # positions per lane: 3, 3, 3, 3
    shortfall = sum(max(0, wanted[k] - len(lanes[k])) for k in range(4))
    assert sum(a != (1 + p) % 4 for p, a in enumerate(lane_of)) == shortfall == 1
    for k in range(4):  # each lane's batches in their own order
        assert [b for b in out if b[0] // 10 == k] == lanes[k]


@pytest.mark.parametrize("world_size,accum", [(1, 1), (2, 1), (4, 1), (2, 2), (3, 2), (8, 2)])
def test_every_row_once_per_epoch_across_ranks(cache_dir, world_size, accum):
    reader = CacheReader(cache_dir)
    kw = dict(batch_tokens=150, seed=3, eval_percent=10.0, epochs=2, world=world_size, accum=accum)
    loaders = [StreamingLoader(reader, rank=r, **kw) for r in range(world_size)]
    per_rank = [list(ld) for ld in loaders]
    all_ids = set(int(s.example_id) for s in reader.iter_sequences())
    train = {i for i in all_ids if in_split(np.array([i]), "train", 10.0)[0]}
    for epoch in (0, 1):
        seen = [i for b in sum(per_rank, []) if b.state["epoch"] == epoch for i in b.example_ids]
        assert sorted(seen) == sorted(train)
    idx = sorted(b.state["index"] for b in sum(per_rank, []))
    assert idx == list(range(1, len(idx) + 1))  # the global list, split between the ranks
    assert len(idx) == 2 * loaders[0].batches_per_epoch()
    for r, mine in enumerate(per_rank):  # striping: rank r holds the indices r, r + world, ...
        assert all((b.state["index"] - 1) % world_size == r for b in mine)


def test_two_ranks_accumulating_two_equal_one_rank_accumulating_four(cache_dir):
    reader = CacheReader(cache_dir)
    kw = dict(batch_tokens=150, with_student=True, seed=11, epochs=2)
    one = list(StreamingLoader(reader, accum=4, **kw))
    for r in range(2):
        same_batches(list(StreamingLoader(reader, rank=r, world=2, accum=2, **kw)), one[r::2])
    # With more ranks than rows in a shard (empty lanes) too.
    one = list(StreamingLoader(reader, accum=16, **kw))
    for r in (0, 5):
        same_batches(list(StreamingLoader(reader, rank=r, world=8, accum=2, **kw)), one[r::8])


# ---------------------------------------------------------------- decoded chunks
@pytest.fixture(scope="module")
def chunky_cache(tiny, tmp_path_factory):
    """Two large shards whose arrays are cut into many small chunks (as a 65536-token shard is into ~10)."""
    from deltakd.cache.build.builder import CacheBuildConfig, build_cache

    mp = pytest.MonkeyPatch()
    mp.setattr(schema, "ENTRY_CHUNK_ROWS", 2048)
    mp.setattr(schema, "SUP_CHUNK_ROWS", 64)
    mp.setattr(schema, "TOKEN_CHUNK_ROWS", 128)
    out = tmp_path_factory.mktemp("chunky") / "c"
    data = write_data(tmp_path_factory.mktemp("chunky-data") / "train.jsonl", n=80, seed=2)
    try:
        build_cache(
            CacheBuildConfig(
                teacher_ft=tiny["teacher_ft"],
                teacher_base=tiny["teacher_base"],
                data=data,
                out=str(out),
                student_base=tiny["student_base"],
                top_k=16,
                max_length=64,
                shard_tokens=1600,
            )
        )
    finally:
        mp.undo()
    return str(out)


ENTRY = ("support_ids", "logp_ft", "logp_base", "logp_s0")


def _decoded_chunks(monkeypatch, fn) -> dict:
    """(shard, array) -> the set of chunks zarr fetched (and so decoded) while fn ran."""
    import zarr

    seen = defaultdict(set)
    orig = zarr.storage.LocalStore.get

    async def get(self, key, *a, **k):
        parts = key.split("/")
        if len(parts) >= 3 and parts[-2] == "c":
            seen[self.root.name, parts[0]].add(parts[-1])
        return await orig(self, key, *a, **k)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", get)
    fn()
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_rank_decodes_only_its_share_of_each_shard(chunky_cache, monkeypatch, world_size):
    reader = CacheReader(chunky_cache)
    chunk = {}
    for name in reader.shard_names:
        for sub in (schema.TEACHER_DIR, schema.STUDENT_DIR):
            for arr in ENTRY:
                meta = reader.root / sub / name / arr / "zarr.json"
                if meta.exists():
                    chunk[name, arr] = json.loads(meta.read_text())["chunk_grid"]["configuration"]["chunk_shape"][0]
    kw = dict(batch_tokens=400, with_student=True, seed=1, epochs=1)
    whole = _decoded_chunks(monkeypatch, lambda: list(StreamingLoader(reader, **kw)))
    n_chunks = {k: len(v) for k, v in whole.items() if k in chunk}
    assert len(n_chunks) == len(chunk) and sum(n >= 16 for n in n_chunks.values()) >= 8  # the premise: many chunks
    got = []
    part = _decoded_chunks(monkeypatch, lambda: got.extend(StreamingLoader(reader, rank=0, world=world_size, **kw)))
    lanes = lane_range_of(world_size)
    total = extra = 0
    for sp, name in enumerate(reader.shard_order(shuffle=True, seed=1, epoch=0)):
        full = reader.read_shard(name)
        ent = full.entry_offsets.numpy()[full.sup_offsets]  # sequence -> its first entry
        row_of = {int(e): i for i, e in enumerate(full.arrays["example_ids"])}
        used = {row_of[e] for b in got if b.state["shard"] == sp for e in b.example_ids}
        lengths = np.diff(full.arrays["seq_offsets"].numpy())
        own = set(lane_ranges(lengths, np.arange(full.n_seqs), world_size)[lanes[0]].tolist())  # rank 0's lane

        def chunks(rows, c, ent=ent):
            return {k for r in rows if ent[r + 1] > ent[r] for k in range(ent[r] // c, (ent[r + 1] - 1) // c + 1)}

        for arr in ENTRY:
            c, n = chunk[name, arr], n_chunks[name, arr]
            # Exactly the chunks holding the entries of its rows: no gap between two runs of rows is decoded.
            assert part[name, arr] == {str(k) for k in chunks(used, c)}, (name, arr)
            # Its own lane is one block of ~1/world of the shard; rows of another lane (a position
            # whose lane ran out took a batch of another) cost the chunks they sit in.
            block = chunks(range(min(own), max(own) + 1), c) if own else set()
            outside = chunks(used - own, c) - block
            # (a run of x chunks' worth of entries starts inside a chunk: it touches up to x + 2)
            assert len(block) <= n / world_size + 2, (name, arr, len(block), n)
            assert len(part[name, arr]) <= len(block) + len(outside)
            total, extra = total + len(part[name, arr]), extra + len(outside)
    # Over the epoch: ~1/world of the chunks plus two per shard and array, and the few substitutions.
    n_all = sum(n_chunks.values())
    print(
        f"world {world_size}: decoded {total} of {n_all} entry chunks ({total / n_all:.2f}); "
        f"{extra} for rows of another lane"
    )
    assert total <= n_all / world_size + 2 * len(n_chunks) + extra
    assert extra <= 0.25 * total


def test_a_resume_with_another_world_or_accumulation_is_refused(tiny, cache_dir, tmp_path):
    """The batch order depends on M = world × grad_accum: a resume that changes M is refused, naming the fix."""
    import dataclasses

    from deltakd.student.checkpointing import find_resume
    from deltakd.student.trainer import TrainConfig

    cfg = TrainConfig(cache=cache_dir, student=tiny["student_base"], out=str(tmp_path), loss="kd", grad_accum=2)
    ck = tmp_path / "checkpoints" / "step-000004"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text(
        json.dumps({"step": 4, "loader": {}, "config": dataclasses.asdict(cfg), "world_size": 2})
    )
    assert find_resume(tmp_path, cfg, world=2) == ck
    # M = ranks x grad_accum decides the batch order: 2 x 2 resumes as 4 x 1 or 1 x 4, never as 4 x 2.
    assert find_resume(tmp_path, dataclasses.replace(cfg, grad_accum=1), world=4) == ck
    assert find_resume(tmp_path, dataclasses.replace(cfg, grad_accum=4), world=1) == ck
    with pytest.raises(ValueError, match=r"2 x 2 = 4 -> 4 x 2 = 8, which changes the batch order; pass --grad-accum 1"):
        find_resume(tmp_path, cfg, world=4)
    with pytest.raises(ValueError, match=r"no --grad-accum keeps M = 4 on 3 ranks"):
        find_resume(tmp_path, cfg, world=3)
    with pytest.raises(ValueError, match=r"2 x 2 = 4 -> 2 x 4 = 8"):
        find_resume(tmp_path, dataclasses.replace(cfg, grad_accum=4), world=2)
