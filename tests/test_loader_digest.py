"""The loader's batch sequence is frozen: a sha256 of every batch of a few epochs, pinned.

Every tensor of every batch goes into the digest (ids, attention and loss masks, every
target: support ids and values, valid and sampled masks, sample_tau, tails, tail_star,
next tokens; each with its dtype and shape), with the example ids, the loader position
and the host-side counts. The caches are the committed tiny ones (tests/data/cache_v2,
made by tests/data/make_cache_v2.py: lockstep, union support, tail samples in about half
the rows, student arrays with exact target tails, 6 shards; and tests/data/cache_v1),
so the digests depend on the loader and the reader alone, never on the builder.

The pinned digests were computed by the loader at commit 802a85b, before the loader was
vectorised: a faster loader must give exactly these batches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from deltakd.cache.format.reader import CacheReader
from deltakd.student.data import StreamingLoader

DATA = Path(__file__).parent / "data"

# name -> (cache, loader arguments); every case streams whole epochs.
CASES = {
    "one_rank": ("cache_v2", dict(batch_tokens=160, with_student=True, epochs=3)),
    "one_rank_no_student": ("cache_v2", dict(batch_tokens=160, with_student=False, epochs=2)),
    "rank0_of_2": ("cache_v2", dict(batch_tokens=160, with_student=True, world=2, rank=0, epochs=3)),
    "rank1_of_2": ("cache_v2", dict(batch_tokens=160, with_student=True, world=2, rank=1, epochs=3)),
    "accum2": ("cache_v2", dict(batch_tokens=160, with_student=True, accum=2, epochs=3)),
    # 3 ranks x 2: a rank's lanes are not one contiguous block, and short lanes borrow batches.
    "rank1_of_3_accum2": ("cache_v2", dict(batch_tokens=200, with_student=True, world=3, rank=1, accum=2, epochs=2)),
    # Small windows (several per shard), a held-out split, other seed.
    "windows_train": ("cache_v2", dict(batch_tokens=256, window=4, seed=5, eval_percent=25.0, epochs=2)),
    "eval_split": ("cache_v2", dict(batch_tokens=256, shuffle=False, split="eval", eval_percent=25.0, epochs=1)),
    "no_shuffle": ("cache_v2", dict(batch_tokens=100, shuffle=False, with_student=True, epochs=1)),
    # Resumed in the middle of a shard of the second epoch.
    "resumed": (
        "cache_v2",
        dict(
            batch_tokens=160,
            with_student=True,
            world=2,
            rank=1,
            epochs=3,
            state={"epoch": 1, "shard": 2, "batch": 2, "index": 31},  # rank 0 saved it,
        ),
    ),
    "v1": ("cache_v1", dict(batch_tokens=64, with_student=True, epochs=2)),
}

# Computed by the loader at commit 802a85b (before this file existed), see the module docstring.
PINNED = {
    "one_rank": (63, "2635f7e69cfac09c4b94e559a42cc46f88b096122b832218a5c564d076bab9dd"),
    "one_rank_no_student": (42, "7e77f7a0900a4f11ac1d3201198ceb934fc1a354d27f4df3fb3303393f639b32"),
    "rank0_of_2": (32, "7e5b7aacdf1a39faed825381ec0c0acdb04ee9854864383efef8bb15cbfa0c57"),
    "rank1_of_2": (31, "fb9b60b8ea8babc57f5d2df73d1577300c8d5b1bccd256c293655fb529e4a509"),
    "accum2": (63, "d09d9b9dcf5e975be65b47a5247b9b024a5f1c3f46dbe4ed2cc27834d7de3229"),
    "rank1_of_3_accum2": (21, "3df669f21993213eefab0d3a6b7cc632120254d338911db9729371643b687dbe"),
    "windows_train": (20, "548031ba1b72c015d91556213299dff0460eb52b42ae89d8cb2e7a6dd021ead7"),
    "eval_split": (6, "44b2ead3d33ae9b33255b69be42ffc4335cf52b73c891c927426d7d534af09a7"),
    "no_shuffle": (32, "6287f551ff521b84696c5612a2bc0519c18ab8b17e6996d1a110ba741d8b023a"),
    "resumed": (15, "dd6f7ca3007c9cd6dedfea0c81e6166ac1412083e63294c0710adac55229576d"),
    "v1": (4, "7816b51062b4783ad2a12ccbd2a96783f0cc03a4a08aba565cc2f13fefd5d3b2"),
}


def batch_digest(h, b) -> None:
    """Feed one batch into a sha256: every tensor with its name, dtype and shape, the ids, position and counts."""

    def tensor(name: str, t: torch.Tensor) -> None:
        t = t.contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    tensor("input_ids", b.input_ids)
    tensor("attention_mask", b.attention_mask)
    tensor("loss_mask", b.loss_mask)
    for k in sorted(b.targets):
        tensor(f"targets.{k}", b.targets[k])
    h.update(json.dumps([b.example_ids, b.state, list(b.counts)], sort_keys=True).encode())


def digest(case: str) -> tuple[int, str]:
    cache, kw = CASES[case]
    h, n = hashlib.sha256(), 0
    for b in StreamingLoader(CacheReader(DATA / cache), **kw):
        batch_digest(h, b)
        n += 1
    return n, h.hexdigest()


@pytest.mark.parametrize("case", sorted(CASES))
def test_batches_are_the_pinned_ones(case):
    assert digest(case) == tuple(PINNED[case])


@pytest.mark.parametrize("case", ["one_rank", "rank1_of_3_accum2", "resumed"])
def test_half_targets_widened_on_the_device_are_the_pinned_batches(case):
    """half_targets (what the trainer uses on a GPU): the 16-bit log-probs travel as stored and Batch.to widens
    them; after .to() every batch is the pinned one."""
    cache, kw = CASES[case]
    h, n, half = hashlib.sha256(), 0, 0
    for b in StreamingLoader(CacheReader(DATA / cache), half_targets=True, **kw):
        half += sum(t.dtype == torch.float16 for t in b.targets.values())
        batch_digest(h, b.to("cpu"))
        n += 1
    assert half >= 3 * n  # logp_ft, logp_base, logp_s0 (where student arrays are read) travel in 16 bits
    assert (n, h.hexdigest()) == tuple(PINNED[case])


def test_digest_sees_one_changed_value():
    """The digest is not blind: one flipped bit of one target changes it."""
    loader = StreamingLoader(CacheReader(DATA / "cache_v2"), batch_tokens=160, with_student=True, epochs=1)
    b = next(iter(loader))
    loader.close()  # its prefetch thread would go on reading the cache under later tests
    h1, h2 = hashlib.sha256(), hashlib.sha256()
    batch_digest(h1, b)
    b.targets["logp_s0"].view(torch.int32)[0, 0] ^= 1
    batch_digest(h2, b)
    assert h1.hexdigest() != h2.hexdigest()


if __name__ == "__main__":  # prints PINNED for the loader checked out
    print("PINNED = {")
    for c in CASES:
        print(f"    {c!r}: {digest(c)!r},")
    print("}")
