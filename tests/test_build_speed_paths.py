"""The builder's fast row code (cache/build/rows.py) against the plain formulas, to the bit.

`reference_rows` is the definition of every stored value: log_softmax, top-k on (rows, V)
masks, priority sampling with torch's exponential_ noise, support_logprobs on each
distribution. The fast code must give the same tensors bit for bit (same keys, dtypes,
shapes and bits), on inputs built to hit its corner cases: equal values at the top-k
boundary, −inf logits, a chunk of one row, vocabularies above and below the size where
the CPU shortcuts start, one and two threads.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from deltakd.cache.build import rows as fast
from deltakd.cache.format.support import floored_shift, pad_ragged, support_logprobs


@torch.no_grad()
def reference_rows(
    logits,
    support,
    k,
    alphas,
    floor,
    samples=0,
    min_tail=0.0,
    generator=None,
    mass=0.0,
    min_k=1,
    proposal="teacher",
    proposal_alpha=1.0,
):
    """lockstep_rows as the plain formulas over whole (c, V) tensors (see rows.lockstep_rows)."""
    lp = {r: x.sub_(x.logsumexp(1, keepdim=True)) for r, x in logits.items()}
    c, V = lp["ft"].shape
    kk = min(k, V)
    mask = torch.zeros((c, V), dtype=torch.bool)

    def add_top(x, norm):
        """Mark x's top-k ids; with `mass`, those of the fewest (at least min_k, ties kept) whose
        probability exp(value − norm) reaches it, one row at a time."""
        v, i = x.topk(kk, dim=1)
        if mass <= 0:
            mask.scatter_(1, i, True)
            return
        v = v - norm
        for row in range(c):
            cum, n = v[row].exp().cumsum(0), 0  # float32 running sums, in order
            while n < kk and float(cum[n]) < mass:
                n += 1
            n = min(max(n + 1, min(min_k, kk)), kk)
            mask[row, i[row][v[row] >= v[row, n - 1]]] = True
            mask[row, i[row, 0]] = True  # the top id, even where the values are not numbers (+inf targets)

    for r in ("ft",) if support == "topk" else tuple(lp):
        add_top(lp[r], 0.0)
    star = "s0" in lp and len(alphas) > 0
    if star:
        shift = floored_shift(lp["ft"], lp["base"], floor)
        if support == "union":
            for a in alphas:
                t = lp["s0"] + a * shift
                add_top(t, t.logsumexp(1, keepdim=True))
    out = {}
    if samples > 0:
        source, total, rows = lp["ft"], None, None
        if proposal != "teacher":  # π* at that α, unnormalised
            source = lp["s0"] + proposal_alpha * shift
            total = source.logsumexp(1)
        if proposal == "mixture":  # ½·πT/T_T + ½·π*/T_* on the tail; rows where either tail holds min_tail
            neg = torch.full((), float("-inf"))
            tails = [torch.where(mask, neg, x) for x in (lp["ft"], source)]
            masses = [t.logsumexp(1, keepdim=True) for t in tails]
            parts = [t - torch.where(m == neg, math.inf, m) for t, m in zip(tails, masses)]
            source = torch.logaddexp(*parts) - math.log(2.0)
            rows = torch.maximum(masses[0][:, 0], masses[1][:, 0] - total) >= math.log(max(min_tail, 1e-30))
            total = None
        drawn, out["sample_tau"] = reference_sample_tail(source, mask, samples, min_tail, generator, total, rows)
        out["sample_len"] = drawn.sum(1)
        mask = torch.cat([mask, drawn], dim=1)  # sampled ids after the top-k ids under one nonzero()
    lengths = mask.sum(1)
    cols = mask.nonzero(as_tuple=True)[1] % V
    idx, valid = pad_ragged(lengths)
    ids = cols[idx]
    out["len"] = lengths
    if star:
        tails = []
        for a in alphas:
            _, t, log_z, _ = support_logprobs(lp["s0"] + a * shift, ids, valid)
            tails.append(t + log_z)
        out["tail_star"] = torch.stack(tails, dim=1)
    out["ids"] = ids[valid]
    for r in tuple(lp):
        vals, tail, _, _ = support_logprobs(lp.pop(r), ids, valid)
        out[r], out[f"tail_{r}"] = vals[valid], tail
    return out


def reference_sample_tail(lt, support, m, min_tail, generator, log_total=None, rows=None):
    c, V = lt.shape
    neg = torch.full((), float("-inf"))
    tail = torch.where(support, neg, lt)
    if rows is None:
        mass = tail.logsumexp(1) if log_total is None else tail.logsumexp(1) - log_total
        rows = mass >= math.log(max(min_tail, 1e-30))
    pri = tail.add_(torch.empty_like(lt).exponential_(generator=generator))
    top = pri.topk(min(m + 1, V), dim=1)
    take = torch.isfinite(top.values[:, :m]) & rows[:, None]
    drawn = torch.zeros((c, V), dtype=torch.bool)
    drawn.scatter_(1, top.indices[:, :m], take)
    tau = top.values[:, m] if top.values.shape[1] > m else torch.full((c,), float("-inf"))
    return drawn, torch.where(rows, tau, neg)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def assert_same_bits(a: dict, b: dict):
    """Same keys in the same order, dtypes, shapes and bits; a NaN matches a NaN of any sign, as
    no NaN is ever stored (the builder stops on it: builder._check_finite)."""
    assert list(a) == list(b)
    for key in a:
        x, y = a[key], b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        if x.is_floating_point():
            assert torch.equal(x.isnan(), y.isnan()), key
            x, y = (t.nan_to_num(nan=123.0, posinf=float("inf"), neginf=float("-inf")) for t in (x, y))
        assert torch.equal(bits(x), bits(y)), key


def chunk(c: int, V: int, seed: int, roles=("ft", "base", "s0"), ties: bool = True, neg_inf: bool = True):
    """Logits of a realistic spread, with boundary ties and −inf entries planted in some rows."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for j, r in enumerate(roles):
        x = torch.randn(c, V, generator=g) * (2.0 + j)
        if ties and c > 1:  # copies of a row's top values: equal log-probs at and around the k boundary
            top = x[0].topk(min(20, V)).indices
            x[0, torch.randperm(V, generator=g)[:8]] = float(x[0, top[15 % len(top)]])
            x[1, : V // 2] = float(x[1, 0])
        if neg_inf and c > 2:
            x[2, torch.randperm(V, generator=g)[: V // 3]] = float("-inf")
        out[r] = x
    return out


CASES = [
    # c, V, k, support, samples, floor, alphas, with student base
    (37, 40000, 16, "union", 16, -12.0, (0.5, 1.0, 1.5), True),
    (20, 32000, 64, "union", 16, -12.0, (0.5, 1.0, 1.5), True),
    (1, 40000, 16, "union", 16, -12.0, (0.5, 1.0, 1.5), True),
    (65, 9000, 8, "union", 5, None, (1.0,), True),
    (33, 5000, 16, "topk", 16, -12.0, (0.5, 1.0, 1.5), True),
    (9, 6000, 16, "union", 0, -12.0, (0.5, 1.0, 1.5), False),
    (300, 662, 16, "union", 16, -12.0, (0.5, 1.0, 1.5), True),
    (7, 50, 16, "union", 16, -12.0, (0.5, 1.0, 1.5), True),
    (5, 40, 64, "union", 16, -12.0, (1.0,), True),  # k and samples beyond the vocabulary
]
# With --top-mass: c, V, k, support, samples, floor, alphas, with student base, mass, min_k
MASS_CASES = [
    (37, 40000, 32, "union", 16, -16.0, (0.5, 1.0, 1.5), True, 0.9, 12),
    (65, 9000, 16, "union", 5, None, (1.0,), True, 0.5, 1),
    (33, 5000, 16, "topk", 16, -12.0, (0.5, 1.0, 1.5), True, 0.9, 4),
    (300, 662, 32, "union", 16, -16.0, (0.5, 1.0, 1.5), True, 0.95, 8),
    (1, 40000, 16, "union", 0, -16.0, (1.0,), True, 0.9, 2),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("c,V,k,support,samples,floor,alphas,student", CASES)
def test_lockstep_rows_equal_the_plain_formulas_to_the_bit(threads, c, V, k, support, samples, floor, alphas, student):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        roles = ("ft", "base", "s0") if student else ("ft", "base")
        for seed in range(2):
            x = chunk(c, V, seed, roles)
            args = (support, k, alphas if student else (), floor, samples, 0.01)
            ref = reference_rows({r: z.clone() for r, z in x.items()}, *args, torch.Generator().manual_seed(seed))
            got = fast.lockstep_rows({r: z.clone() for r, z in x.items()}, *args, torch.Generator().manual_seed(seed))
            assert_same_bits(ref, got)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("c,V,k,support,samples,floor,alphas,student,mass,min_k", MASS_CASES)
def test_rows_by_mass_equal_the_plain_formulas_to_the_bit(
    monkeypatch, threads, c, V, k, support, samples, floor, alphas, student, mass, min_k
):
    """--top-mass: the same bits as the plain formulas, on the CPU path and (one thread) the accelerator path."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for accelerator in (False, True) if threads == 1 else (False,):
            if accelerator:
                monkeypatch.setattr(fast, "cpu_paths", lambda device: False)
            x = chunk(c, V, 3)
            args = (support, k, alphas, floor, samples, 0.01)
            kw = dict(mass=mass, min_k=min_k)
            ref = reference_rows({r: z.clone() for r, z in x.items()}, *args, torch.Generator().manual_seed(2), **kw)
            got = fast.lockstep_rows(
                {r: z.clone() for r, z in x.items()}, *args, torch.Generator().manual_seed(2), **kw
            )
            assert_same_bits(ref, got)
            full = fast.lockstep_rows({r: z.clone() for r, z in x.items()}, *args, torch.Generator().manual_seed(2))
            if support == "union" and c > 1:  # the mass changes the support: the check can fail
                assert not torch.equal(got["len"], full["len"])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("proposal", ["target", "mixture"])
@pytest.mark.parametrize("accelerator", [False, True])
@pytest.mark.parametrize(
    "c,V,k,samples,mass", [(37, 40000, 16, 16, 0.0), (300, 662, 16, 16, 0.0), (65, 9000, 32, 5, 0.9)]
)
def test_draws_from_the_target_equal_the_plain_formulas_to_the_bit(
    monkeypatch, proposal, accelerator, c, V, k, samples, mass
):
    """--tail-proposal target and mixture: the ids drawn from π*'s tail (α 1), or from half πT's and half
    π*'s, the same bits as the plain formulas, on the CPU path and the accelerator path; and not the draws
    from πT's tail (the check can fail)."""
    if accelerator:
        monkeypatch.setattr(fast, "cpu_paths", lambda device: False)
    x = chunk(c, V, 4)
    args = ("union", k, (0.5, 1.0, 1.5), -16.0, samples, 0.01)
    kw = dict(mass=mass, min_k=8 if mass else 1)
    ref = reference_rows(
        {r: z.clone() for r, z in x.items()}, *args, torch.Generator().manual_seed(3), **kw, proposal=proposal
    )
    got = fast.lockstep_rows(
        {r: z.clone() for r, z in x.items()}, *args, torch.Generator().manual_seed(3), **kw, proposal=proposal
    )
    assert_same_bits(ref, got)
    teacher = fast.lockstep_rows({r: z.clone() for r, z in x.items()}, *args, torch.Generator().manual_seed(3), **kw)
    assert teacher["ids"].shape != got["ids"].shape or not torch.equal(teacher["ids"], got["ids"])


def test_by_mass_keeps_the_fewest_ids_holding_the_mass():
    logp = torch.tensor(
        [[0.5, 0.3, 0.1, 0.05, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2], [0.97, 0.01, 0.01, 0.005, 0.005]]
    ).log()
    ids = torch.tensor([[9, 8, 7, 6, 5]]).expand(3, 5)
    kept = fast.by_mass(logp, ids, 0.85, 2)
    # row 0: 0.5 + 0.3 + 0.1 reaches 0.85 with 3 ids; row 1: 5 equal values, 0.85 needs all five
    # (ties kept); row 2: one id holds 0.97, but min_k is 2, and the third ties with the second;
    # the cut ids repeat the first.
    assert kept.tolist() == [[9, 8, 7, 9, 9], [9, 8, 7, 6, 5], [9, 8, 7, 9, 9]]
    assert torch.equal(fast.by_mass(logp, ids, 0.0, 2), ids)


@pytest.mark.parametrize("c,V,k,support,samples,floor,alphas,student", [CASES[0], CASES[3], CASES[4], CASES[6]])
def test_the_accelerator_path_equals_the_plain_formulas_too(
    monkeypatch, c, V, k, support, samples, floor, alphas, student
):
    """What runs off a CPU (whole chunks, torch.topk, torch.logsumexp, exponential_, targets formed
    twice), run here on a CPU: the same bits (the device's own kernels are not exercised)."""
    monkeypatch.setattr(fast, "cpu_paths", lambda device: False)
    x = chunk(c, V, 5)
    args = (support, k, alphas, floor, samples, 0.01)
    ref = reference_rows({r: z.clone() for r, z in x.items()}, *args, torch.Generator().manual_seed(1))
    got = fast.lockstep_rows({r: z.clone() for r, z in x.items()}, *args, torch.Generator().manual_seed(1))
    assert_same_bits(ref, got)


def test_row_blocks_never_leave_one_row_alone():
    for c in range(1, 40):
        for rows in (2, 3, 5, 16):
            blocks = fast.row_blocks(c, rows)
            assert [i for sl in blocks for i in range(sl.start, sl.stop)] == list(range(c))
            assert all(sl.stop - sl.start >= 2 for sl in blocks) or c == 1


@pytest.mark.parametrize("V,k", [(32000, 64), (32000, 17), (50000, 16), (6000, 1), (300, 16)])
def test_topk_exact_gives_torch_topk_values_and_index_set(V, k):
    g = torch.Generator().manual_seed(V + k)
    x = torch.randn(40, V, generator=g)
    x[0, :50] = x[0].max()  # ties at the top, across the boundary
    x[1, torch.randperm(V, generator=g)[: k + 3]] = 9.0  # more equal maxima than k
    x[2, :] = float("-inf")
    x[2, :3] = 1.0
    x[3, 7] = float("nan")
    x[4] = x[4].round()  # many ties everywhere
    ref_v, ref_i = x.topk(k, dim=1)
    got_v, got_i = fast.topk_exact(x, k)
    assert torch.equal(bits(ref_v), bits(got_v))
    assert torch.equal(ref_i.sort(1).values, got_i.sort(1).values)


@pytest.mark.parametrize("midpoint_ulps", [fast.MIDPOINT_ULPS, 2**28])
def test_exponential_exact_draws_exponential_and_leaves_the_generator_there(monkeypatch, midpoint_ulps):
    """Bit for bit; with a margin of 2^28 ulps every element takes the C library's log1p (the fix-up path)."""
    monkeypatch.setattr(fast, "MIDPOINT_ULPS", midpoint_ulps)
    shape = (97, 32000) if midpoint_ulps == fast.MIDPOINT_ULPS else (3, 5000)
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ref = torch.empty(shape).exponential_(generator=a)
    got = fast.exponential_exact(shape, b, "cpu")
    assert torch.equal(bits(ref), bits(got))
    assert torch.equal(a.get_state(), b.get_state())
    assert fast._cpu_draws_match()


def test_compare_caches_finds_one_changed_value(cache_dir, tmp_path):
    """The identity check used on whole caches: a copy compares identical; one changed stored value does not."""
    import shutil

    import zarr

    from benchmarks.compare_caches import compare

    copy = tmp_path / "copy"
    shutil.copytree(cache_dir, copy)
    assert compare(Path(cache_dir), copy)["problems"] == []
    arr = zarr.open_array(str(copy / "shards" / "shard-00000" / "logp_ft"), mode="r+")
    arr[3] = arr[3] - 1
    problems = compare(Path(cache_dir), copy)["problems"]
    assert any(p.startswith("shards/shard-00000/logp_ft:") for p in problems), problems
