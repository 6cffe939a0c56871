"""How tests/data/cache_v2 was made (kept for the record; the committed bytes are the fixture).

    python tests/data/make_cache_v2.py OUT

A default (lockstep, union, tail samples) format-2 cache with student-base arrays and
exact target tails, from tiny random checkpoints: 48 records in 4 shards. The loader's
batch digests (tests/test_loader_digest.py) are pinned on the committed copy, so they
never depend on what a later builder writes: do not rebuild it to refresh the test.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

WORDS = (
    "alpha beta gamma delta river stone cloud seven green light north market tiny paper "
    "count list reverse upper lower answer question what is the of and to"
).split()


def main(out: str) -> None:
    from deltakd.cache.build.builder import CacheBuildConfig, build_cache
    from deltakd.demo.tiny import save_checkpoint, tiny_llama, train_tokenizer

    rng = random.Random(0)
    sentence = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = train_tokenizer([sentence(20) for _ in range(200)], 300, root / "tok")
        V = len(tok)
        paths = {
            name: save_checkpoint(tiny_llama(V, hidden=hidden, seed=seed, tokenizer=tok), tok, root / name)
            for name, hidden, seed in (("teacher_ft", 48, 1), ("teacher_base", 48, 2), ("student_base", 32, 3))
        }
        with open(root / "train.jsonl", "w") as f:
            for i in range(48):
                # A few long responses so that batches mix lengths (and some hold one sequence).
                resp = sentence(rng.randint(2, 10) * (4 if i % 9 == 0 else 1))
                f.write(json.dumps({"prompt": sentence(rng.randint(2, 8)), "response": resp}) + "\n")
        build_cache(
            CacheBuildConfig(
                teacher_ft=paths["teacher_ft"],
                teacher_base=paths["teacher_base"],
                student_base=paths["student_base"],
                data=str(root / "train.jsonl"),
                out=out,
                top_k=4,
                tail_samples=6,
                sample_min_tail=0.94,  # about half the rows draw samples: sampled masks of both kinds
                max_length=64,
                shard_tokens=400,
            )
        )


if __name__ == "__main__":
    main(sys.argv[1])
