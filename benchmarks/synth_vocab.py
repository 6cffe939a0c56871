"""A synthetic task at a realistic vocabulary (32k) for the timing and memory benchmarks.

Word-level tokenizer over 32000 made-up words, random Llama teachers and student,
random prompt/response records. Distributions are meaningless; shapes and costs are real.
"""

from __future__ import annotations

import json
import random
import resource
from pathlib import Path


def word_tokenizer(vocab: int, out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(out))
    return fast


def make(
    root: str | Path, vocab: int = 32000, n_records: int = 256, teacher=(256, 4), student=(128, 2), seed: int = 0
) -> dict:
    from deltakd.demo.tiny import save_checkpoint, tiny_llama

    root = Path(root)
    if (root / "DONE.json").exists():
        return json.loads((root / "DONE.json").read_text())
    rng = random.Random(seed)
    tok = word_tokenizer(vocab, root / "tok")
    paths = {}
    for name, (h, l), s in (("teacher_ft", teacher, 1), ("teacher_base", teacher, 2), ("student_base", student, 3)):
        paths[name] = save_checkpoint(
            tiny_llama(vocab, hidden=h, layers=l, heads=4, seed=seed + s, tokenizer=tok), tok, root / name
        )
    with open(root / "train.jsonl", "w") as f:
        for _ in range(n_records):
            w = lambda n: " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(n))  # noqa: E731
            f.write(json.dumps({"prompt": w(rng.randint(16, 64)), "response": w(rng.randint(48, 192))}) + "\n")
    paths["data"] = str(root / "train.jsonl")
    (root / "DONE.json").write_text(json.dumps(paths))
    return paths


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(work: Path) -> tuple[dict, Path]:
    from deltakd.cache.build.builder import CacheBuildConfig, build_cache

    paths = make(work / "synth")
    cache = work / "cache"
    if not (cache / "manifest.json").exists():
        build_cache(
            CacheBuildConfig(
                teacher_ft=paths["teacher_ft"],
                teacher_base=paths["teacher_base"],
                student_base=paths["student_base"],
                data=paths["data"],
                out=str(cache),
                top_k=64,
                max_length=256,
                batch_size=8,
            )
        )
    return paths, cache


def batches(cache: Path, n: int, batch_tokens: int):
    from deltakd.cache.format.reader import CacheReader
    from deltakd.student.data import StreamingLoader

    out = []
    loader = StreamingLoader(CacheReader(cache), batch_tokens=batch_tokens, with_student=True, seed=0)
    for b in loader:
        out.append(b)
        if len(out) == n:
            loader.close()  # stop its prefetch thread: the benchmark times what comes after
            return out
