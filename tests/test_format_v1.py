"""A tiny cache of format version 1, committed in tests/data/cache_v1, must stay readable.

It was built once with tiny random checkpoints (k = 4, float16, 4 records, 2 shards);
the golden numbers below were read from it right after that build. They freeze the
on-disk layout; test_cache.py checks that the builder's values are right.
"""

from pathlib import Path

import pytest

from deltakd.cache.format.reader import CacheReader
from deltakd.cache.format.validate import validate

V1 = Path(__file__).parent / "data" / "cache_v1"


def test_version_1_cache_is_readable_and_valid():
    assert validate(V1) == []
    r = CacheReader(V1)
    assert r.manifest["format_version"] == 1 and r.k == 4 and len(r) == 4 and r.has_student
    assert r.shard_names == ["shard-00000", "shard-00001"]
    s = next(r.iter_sequences())
    assert s.example_id == 0
    assert s.tokens[:8].tolist() == [225, 267, 86, 79, 73, 88, 269, 263]
    assert s.logp_ft[0].tolist() == pytest.approx([-5.44140625, -5.44921875, -5.44921875, -5.47265625])
    assert s.delta[0].tolist() == pytest.approx([0.04949951171875, 0.30517578125, 0.2325439453125, 0.2232666015625])
    assert s.tail_s0[0].item() == pytest.approx(-0.01348114013671875)
    assert int(s.loss_mask.sum()) == len(s.topk_ids)
