"""The loader's fast reads against simple references: padded rows from stored entries in every
value dtype, range reads that skip whole chunks, and the finiteness check on stored bits."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from deltakd.cache.format import schema
from deltakd.cache.format.reader import CacheReader, ShardData, read_ranges
from deltakd.cache.format.schema import CacheFormatError
from deltakd.student.data import StreamingLoader

V2 = Path(__file__).parent / "data" / "cache_v2"


def _reference_rows(lengths, ids, values, sample_len, rows):
    """Per-row padding, one row at a time: ids repeat the row's first id, values are -inf."""
    ent = np.concatenate([[0], np.cumsum(lengths)])
    K = max((int(lengths[r]) for r in rows), default=0)
    out_ids = np.zeros((len(rows), K), np.int64)
    out_val = np.full((len(rows), K), -np.inf, np.float32)
    valid = np.zeros((len(rows), K), bool)
    sampled = np.zeros((len(rows), K), bool)
    for i, r in enumerate(rows):
        e, n = int(ent[r]), int(lengths[r])
        out_ids[i] = ids[e]
        out_ids[i, :n] = ids[e : e + n]
        out_val[i, :n] = values[e : e + n]
        valid[i, :n] = True
        sampled[i, n - int(sample_len[r]) : n] = True
    return out_ids, out_val, valid, sampled


@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("kept_as_stored", [True, False])
@pytest.mark.parametrize("widen", [True, False])
def test_rows_pad_like_a_per_row_reference(value_dtype, kept_as_stored, widen):
    g = np.random.default_rng(0)
    S = 40
    lengths = g.integers(1, 12, S)
    sample_len = np.minimum(g.integers(0, 4, S), lengths)
    E = int(lengths.sum())
    ids = g.integers(0, 60000, E).astype(np.uint16)
    stored_vals = schema.encode_values(torch.randn(E) * 4 - 6, value_dtype)
    decoded = schema.decode_values(stored_vals, value_dtype)  # exactly what a batch must hold
    arrays = {
        "support_len": torch.from_numpy(lengths.astype(np.int64)),
        "sample_len": torch.from_numpy(sample_len.astype(np.int64)),
        "sample_tau": torch.randn(S),
        "tail_ft": torch.randn(S),
    }
    stored = {}
    if kept_as_stored:
        stored = {"support_ids": ids, "logp_ft": stored_vals}
    else:
        arrays |= {"support_ids": torch.from_numpy(ids.astype(np.int64)), "logp_ft": decoded}
    shard = ShardData(arrays, np.array([0, S]), torch.from_numpy(np.r_[0, np.cumsum(lengths)]), stored, value_dtype)
    for rows in ([3], [5, 6, 7, 20, 21, 2, 39, 0], list(range(S)), []):
        got = shard.rows(np.array(rows, dtype=np.int64), widen)
        ref_ids, ref_val, ref_valid, ref_sampled = _reference_rows(lengths, ids, decoded.numpy(), sample_len, rows)
        # widen=False carries 16-bit stored values as they are (the device widens them): the same values.
        half = not widen and kept_as_stored and value_dtype != "float32"
        want = {"float16": torch.float16, "bfloat16": torch.bfloat16}[value_dtype] if half else torch.float32
        assert got["support_ids"].dtype == torch.int64 and got["logp_ft"].dtype == want
        assert np.array_equal(got["support_ids"].numpy(), ref_ids)
        assert np.array_equal(got["logp_ft"].float().numpy(), ref_val)
        assert np.array_equal(got["valid"].numpy(), ref_valid)
        assert np.array_equal(got["sampled"].numpy(), ref_sampled)
        assert torch.equal(got["tail_ft"], arrays["tail_ft"][rows])


def test_range_reads_decode_only_the_chunks_that_hold_rows(tmp_path):
    a = np.arange(1000, dtype=np.int64) * 3
    g = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=3)
    g.create_array("x", shape=a.shape, dtype=a.dtype, chunks=(50,))[...] = a
    seen, orig = set(), zarr.storage.LocalStore.get

    async def get(self, key, *args, **kwargs):
        if key.startswith("x/c/"):
            seen.add(int(key.split("/")[-1]))
        return await orig(self, key, *args, **kwargs)

    zarr.storage.LocalStore.get = get
    try:
        cases = [
            ([0], [1000]),  # everything: one read
            ([10, 60, 64, 880], [20, 64, 64, 1000]),  # an empty range; chunks 2..16 hold none of the rows
            ([149], [151]),  # across a chunk boundary
            ([], []),
        ]
        for starts, ends in cases:
            seen.clear()
            got = read_ranges(tmp_path / "g", "x", np.array(starts, np.int64), np.array(ends, np.int64))
            want = np.concatenate([a[:0]] + [a[s:e] for s, e in zip(starts, ends)])
            assert np.array_equal(got, want) and got.dtype == a.dtype
            held = {i // 50 for s, e in zip(starts, ends) for i in range(s, e)}
            assert held <= seen and len(seen - held) <= 1, (starts, seen - held)  # at most one chunk between runs
    finally:
        zarr.storage.LocalStore.get = orig


@pytest.mark.parametrize(
    "fault,raised",
    [(ConnectionResetError("peer reset"), ConnectionResetError), (OSError("bad chunk"), CacheFormatError)],
)
def test_a_range_read_tells_a_network_fault_from_a_damaged_cache(tmp_path, monkeypatch, fault, raised):
    """A store that stops answering mid-read goes up as itself (with what was being read), so the run
    says so in one line; anything else is a damaged array, named."""
    a = np.arange(100, dtype=np.int64)
    g = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=3)
    g.create_array("x", shape=a.shape, dtype=a.dtype, chunks=(50,))[...] = a

    orig = zarr.storage.LocalStore.get

    async def get(self, key, *args, **kwargs):
        if str(self.root).startswith(str(tmp_path)) and key.startswith("x/c/"):  # this array's chunks only:
            raise type(fault)(*fault.args)  # a loader thread of another test may read through LocalStore too
        return await orig(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", get)
    with pytest.raises(raised) as info:
        read_ranges(tmp_path / "g", "x", np.array([10], np.int64), np.array([20], np.int64))
    if raised is CacheFormatError:
        assert "x: cannot read rows" in str(info.value)
    else:
        assert info.value.deltakd_doing.startswith("reading ") and info.value.deltakd_doing.endswith("/x")


@pytest.mark.parametrize(("group", "array", "value"), [("student", "logp_s0", np.nan), ("shards", "logp_ft", np.inf)])
def test_a_non_finite_stored_entry_stops_the_loader(tmp_path, group, array, value):
    cache = tmp_path / "c"
    shutil.copytree(V2, cache)
    g = zarr.open_group(zarr.storage.LocalStore(str(cache / group / "shard-00003")), mode="r+")
    g[array][17] = value  # a valid chunk (its crc32c matches), holding a non-finite log-prob
    with pytest.raises(CacheFormatError, match=rf"shard shard-00003, array {array}: 1 NaN/Inf values"):
        list(StreamingLoader(CacheReader(cache), batch_tokens=160, with_student=True, epochs=1))
    # Not checked when verification is off (only to measure its cost): the value reaches the batch.
    bad = [
        b
        for b in StreamingLoader(CacheReader(cache, verify=False), batch_tokens=160, with_student=True, epochs=1)
        if not torch.isfinite(b.targets[array][b.targets["valid"]]).all()
    ]
    assert len(bad) == 1


@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, None])
def test_stored_bits_check_agrees_with_the_decoded_check(value_dtype, bad):
    from deltakd.cache.format import integrity

    x = torch.linspace(-30, -1e-3, 999)
    if bad is not None:
        x[500] = bad
    stored = {"logp_ft": schema.encode_values(x, value_dtype), "support_ids": np.arange(999, dtype=np.uint16)}
    manifest = {"value_dtype": value_dtype, "format_version": 2}
    if bad is None:
        integrity.check_stored(Path("c"), "s", stored, manifest)
        return
    with pytest.raises(CacheFormatError, match=r"shard s, array logp_ft: 1 NaN/Inf values \(first at row 500\)"):
        integrity.check_stored(Path("c"), "s", stored, manifest)
