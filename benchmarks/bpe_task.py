"""A seeded task with a realistic vocabulary: an 8k byte-level BPE, checkpoints pretrained on its corpus.

    OMP_NUM_THREADS=1 python -m benchmarks.bpe_task --out runs/bpe_task   # ~12 min on a shared CPU; reused if present

(One thread: on a CPU shared with other jobs, two torch threads ran 10-20x slower than one.)

The same kind of task as scripts/demo/synthetic.py (invented creatures whose facts are stated
in a pretraining corpus and asked about in instructions; word-list tasks), made
large enough that the vocabulary is no longer small: a lexicon of several thousand
invented words with Zipf frequencies fills a third of the corpus (chronicle
sentences), creatures have invented homes and foods, and the word tasks draw from the
lexicon. The tokenizer is a byte-level BPE of 8192 entries trained on the corpus and
the training instructions (SmolLM2's 49152-entry tokenizer would need a model 6x
wider in its head, which does not fit a CPU time budget).

Checkpoints, as in the paper's setting: a teacher base and a smaller student base
both pretrained on the same corpus; the teacher then finetuned on the instruction
train split. Facts of a third of the creatures are never asked about in training
(only stated in the corpus); validation and test ask only about those, and about
unseen word lists. The design is fixed before any objective is run on it: sizes
and steps were set by time per step, not by any student's score.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

COLORS = "red blue green yellow purple orange black white grey brown pink golden".split()
SIZES = "tiny small large huge".split()
LEGS = ["two", "four", "six", "eight", "no"]
SYL = (
    "ka lo mi ru ze ta vo ni pu sha gri fen dor bel wix tor ana el quo vin sar mek lu bra sti "
    "gon pel rix tha zu ol dra ke fi nor"
).split()
TEACHER = dict(hidden=128, layers=4, heads=4)
STUDENT = dict(hidden=48, layers=2, heads=4)
VOCAB = 8192
# The broad variant's student base (`quality.py online --task bpe-broad`): pretrained for 1/8 of
# the steps, fixed before any student was trained on it, so that its next-token entropy on the
# instructions is several nats, like SmolLM2's broad stand-in student (3.7 nats).
BROAD_STUDENT_STEPS = 100


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(SYL) for _ in range(rng.randint(lo, hi)))


def lexicon(rng: random.Random, n: int, lo: int = 2, hi: int = 3, avoid: set = frozenset()) -> list[str]:
    out, seen = [], set(avoid)
    while len(out) < n:
        w = _word(rng, lo, hi)
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def make_task(seed: int, n_creatures: int, n_lex: int, n_docs: int):
    rng = random.Random(seed)
    names = lexicon(rng, n_creatures, 2, 3)
    homes = ["the " + w for w in lexicon(rng, 60, 2, 3, set(names))]
    foods = lexicon(rng, 40, 2, 2, set(names))
    lex = lexicon(rng, n_lex, 1, 3, set(names) | set(foods))
    zipf = [1.0 / (i + 1) for i in range(len(lex))]
    kb = [
        {
            "name": n,
            "color": rng.choice(COLORS),
            "home": rng.choice(homes),
            "food": rng.choice(foods),
            "size": rng.choice(SIZES),
            "legs": rng.choice(LEGS),
        }
        for n in names
    ]
    docs = []
    for _ in range(n_docs):
        r = rng.random()
        if r < 0.6:
            c = rng.choice(kb)
            n = c["name"]
            fs = [
                f"The {n} is {c['color']}.",
                f"The {n} lives in {c['home']}.",
                f"The {n} eats {c['food']}.",
                f"The {n} is {c['size']}.",
                f"The {n} has {c['legs']} legs.",
                f"A {c['size']} {c['color']} {n} was seen in {c['home']} eating {c['food']}.",
            ]
            rng.shuffle(fs)
            docs.append(" ".join(fs[: rng.randint(2, 5)]))
        elif r < 0.9:  # chronicle: Zipf-distributed lexicon words in loose sentences (the long vocabulary tail)
            sents = []
            for _ in range(rng.randint(2, 4)):
                ws = rng.choices(lex, weights=zipf, k=rng.randint(4, 9))
                sents.append(" ".join(ws).capitalize() + ".")
            docs.append(" ".join(sents))
        else:
            ws = rng.sample(lex[:2000], rng.randint(3, 6))
            docs.append(" ".join(ws) + ". " + " ".join(sorted(ws)) + ". " + " ".join(reversed(ws)) + ".")
    return kb, lex, docs


def instruction(kb: list[dict], lex: list[str], rng: random.Random) -> tuple[dict, str | None]:
    kind = rng.choice(["color", "home", "food", "describe", "describe", "reverse", "sort", "count"])
    c = rng.choice(kb)
    n = c["name"]
    if kind == "color":
        return {"prompt": f"What color is the {n}?", "response": f"The {n} is {c['color']}."}, n
    if kind == "home":
        return {"prompt": f"Where does the {n} live?", "response": f"The {n} lives in {c['home']}."}, n
    if kind == "food":
        return {"prompt": f"What does the {n} eat?", "response": f"The {n} eats {c['food']}."}, n
    if kind == "describe":
        return {
            "prompt": f"Describe the {n}.",
            "response": f"The {n} is a {c['size']} {c['color']} creature that lives in {c['home']} "
            f"and eats {c['food']}. It has {c['legs']} legs.",
        }, n
    ws = rng.sample(lex[:2000], rng.randint(3, 6))
    if kind == "reverse":
        return {"prompt": f"Reverse the words: {' '.join(ws)}", "response": " ".join(reversed(ws))}, None
    if kind == "sort":
        return {"prompt": f"Sort the words: {' '.join(ws)}", "response": " ".join(sorted(ws))}, None
    return {"prompt": f"How many words are in: {' '.join(ws)}", "response": f"There are {len(ws)} words."}, None


def write_data(
    out: Path,
    seed: int = 0,
    n_creatures: int = 150,
    n_lex: int = 6000,
    n_docs: int = 12000,
    n_train: int = 3000,
    n_val: int = 100,
    n_test: int = 200,
) -> dict:
    rng_i = random.Random(seed + 7)
    kb, lex, docs = make_task(seed, n_creatures, n_lex, n_docs)
    from deltakd.demo.synthetic import split_instructions

    splits = split_instructions(
        lambda: instruction(kb, lex, rng_i), {c["name"] for c in kb[: len(kb) // 3]}, n_train, n_val, n_test
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text("\n".join(docs) + "\n")
    paths = {"corpus": str(out / "corpus.txt")}
    for name, rows in splits.items():
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        paths[name] = str(out / f"{name}.jsonl")
    return paths


def build(
    out: str | Path,
    seed: int = 0,
    steps: int = 800,
    sft_steps: int = 300,
    batch: int = 16,
    student_steps: int | None = None,
) -> dict:
    """Build (or reuse) the task; returns the paths of its checkpoints and data files.

    `student_steps` (default `steps`) pretrains the student base for fewer steps: a broad
    base, as small pretrained bases are on instruction data (BROAD_STUDENT_STEPS)."""
    import torch

    from deltakd.cache.format.records import encode_record, read_records
    from deltakd.demo.synthetic import lm_train
    from deltakd.demo.tiny import save_checkpoint, tiny_llama, train_tokenizer

    out = Path(out)
    paths = {k: str(out / k) for k in ("teacher_base", "teacher_ft", "student_base")} | {
        k: str(out / "data" / f"{k}.jsonl") for k in ("train", "validation", "test")
    }
    if (out / "TASK.json").exists():
        return paths
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    data = write_data(out / "data", seed)
    docs = Path(data["corpus"]).read_text().splitlines()
    train_texts = [(r := json.loads(l))["prompt"] + " " + r["response"] for l in open(data["train"])]
    tok = train_tokenizer(docs + train_texts, VOCAB, out / "tokenizer")
    pre = [
        (
            ids := [tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"][:126] + [tok.eos_token_id],
            [1] * len(ids),
        )
        for d in docs
    ]
    sft = []
    for r in read_records(data["train"]):
        ids, plen, _ = encode_record(tok, r, 128)
        sft.append((ids, [0] * plen + [1] * (len(ids) - plen)))
    teacher = tiny_llama(len(tok), seed=seed + 1, max_positions=256, tokenizer=tok, **TEACHER)
    lm_train(teacher, pre, steps, 3e-3, batch, seed, "teacher base")
    save_checkpoint(teacher, tok, out / "teacher_base")
    lm_train(teacher, sft, sft_steps, 1e-3, batch, seed + 1, "teacher sft")
    save_checkpoint(teacher, tok, out / "teacher_ft")
    student = tiny_llama(len(tok), seed=seed + 2, max_positions=256, tokenizer=tok, **STUDENT)
    lm_train(student, pre, steps if student_steps is None else student_steps, 3e-3, batch, seed + 2, "student base")
    save_checkpoint(student, tok, out / "student_base")
    (out / "TASK.json").write_text(
        json.dumps(
            {
                "seed": seed,
                "steps": steps,
                "student_steps": steps if student_steps is None else student_steps,
                "sft_steps": sft_steps,
                "batch": batch,
                "teacher": TEACHER,
                "student": STUDENT,
                "vocab": len(tok),
                "corpus_docs": len(docs),
                "mean_doc_tokens": sum(len(p[0]) for p in pre) / len(pre),
                "build_seconds": time.perf_counter() - t0,
            },
            indent=1,
        )
    )
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bpe_task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=800, help="pretraining steps of each base model")
    ap.add_argument("--sft-steps", type=int, default=300, help="SFT steps of the teacher")
    ap.add_argument(
        "--student-steps",
        type=int,
        default=None,
        help=f"pretraining steps of the student base (broad: {BROAD_STUDENT_STEPS})",
    )
    ap.add_argument("--data-only", action="store_true", help="write the data and train the tokenizer only (sizing)")
    a = ap.parse_args(argv)
    if a.data_only:
        from deltakd.demo.tiny import train_tokenizer

        d = write_data(Path(a.out) / "data", a.seed)
        docs = Path(d["corpus"]).read_text().splitlines()
        t0 = time.perf_counter()
        tok = train_tokenizer(
            docs + [(r := json.loads(l))["prompt"] + " " + r["response"] for l in open(d["train"])],
            VOCAB,
            Path(a.out) / "tokenizer",
        )
        lens = [len(tok(x, add_special_tokens=False)["input_ids"]) for x in docs[:2000]]
        print(
            json.dumps(
                {
                    "vocab": len(tok),
                    "docs": len(docs),
                    "mean_tokens": sum(lens) / len(lens),
                    "tokenizer_s": time.perf_counter() - t0,
                }
            )
        )
        return
    print(json.dumps(build(a.out, a.seed, a.steps, a.sft_steps, student_steps=a.student_steps), indent=1))


if __name__ == "__main__":
    main()
