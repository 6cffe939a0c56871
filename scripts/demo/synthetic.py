"""A small synthetic task a CPU can learn in minutes: corpus, instructions, tokenizer, checkpoints.

    python -m deltakd.demo.synthetic --out scripts/demo/assets      # rebuild the shipped demo assets

Seeded and deterministic. A knowledge base of invented creatures is stated in a
pretraining corpus and asked about in instructions; other tasks transform word
lists. Answers can be partly right, so ROUGE-L separates good students from weak
ones. Checkpoints: a teacher base pretrained on the corpus, the teacher finetuned on
the instruction train split, and a student base (several times smaller) pretrained
on the same corpus. All share one byte-level BPE tokenizer.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COLORS = "red blue green yellow purple orange black white".split()
PLACES = "the forest|the desert|the river|the mountains|the swamp|the cave|the meadow|the sea|the ice|the city".split(
    "|"
)
FOODS = "berries|fish|leaves|seeds|insects|mushrooms|roots|honey".split("|")
SIZES = "tiny small large huge".split()
LEGS = ["two", "four", "six", "eight"]
WORDS = (
    "apple river stone cloud lamp tiger piano garden window rocket violet silver candle mirror "
    "button pepper island castle comet feather lemon marble saddle tunnel wagon zebra anchor bridge"
).split()
TEACHER = dict(hidden=128, layers=4, heads=4)
STUDENT = dict(hidden=48, layers=2, heads=4)


def creatures(rng: random.Random, n: int = 40) -> list[dict]:
    syl = "ka lo mi ru ze ta vo ni pu sha gri fen dor bel wix".split()
    names, out = set(), []
    while len(out) < n:
        name = "".join(rng.choice(syl) for _ in range(rng.choice((2, 3))))
        if name in names:
            continue
        names.add(name)
        out.append(
            {
                "name": name,
                "color": rng.choice(COLORS),
                "home": rng.choice(PLACES),
                "food": rng.choice(FOODS),
                "size": rng.choice(SIZES),
                "legs": rng.choice(LEGS),
            }
        )
    return out


def facts(c: dict) -> list[str]:
    n = c["name"]
    return [
        f"The {n} is {c['color']}.",
        f"The {n} lives in {c['home']}.",
        f"The {n} eats {c['food']}.",
        f"The {n} is {c['size']}.",
        f"The {n} has {c['legs']} legs.",
        f"A {c['size']} {c['color']} {n} was seen in {c['home']} eating {c['food']}.",
    ]


def corpus(kb: list[dict], rng: random.Random, n_docs: int = 3000) -> list[str]:
    docs = []
    for _ in range(n_docs):
        if rng.random() < 0.75:
            c = rng.choice(kb)
            fs = facts(c)
            rng.shuffle(fs)
            docs.append(" ".join(fs[: rng.randint(2, 5)]))
        else:
            ws = rng.sample(WORDS, rng.randint(3, 7))
            docs.append(" ".join(ws) + ". " + " ".join(sorted(ws)) + ". " + " ".join(reversed(ws)) + ".")
    return docs


def instruction(kb: list[dict], rng: random.Random) -> dict:
    kind = rng.choice(["color", "home", "food", "describe", "describe", "reverse", "sort", "count"])
    c = rng.choice(kb)
    n = c["name"]
    if kind == "color":
        return {"prompt": f"What color is the {n}?", "response": f"The {n} is {c['color']}."}
    if kind == "home":
        return {"prompt": f"Where does the {n} live?", "response": f"The {n} lives in {c['home']}."}
    if kind == "food":
        return {"prompt": f"What does the {n} eat?", "response": f"The {n} eats {c['food']}."}
    if kind == "describe":
        return {
            "prompt": f"Describe the {n}.",
            "response": f"The {n} is a {c['size']} {c['color']} creature that lives in {c['home']} "
            f"and eats {c['food']}. It has {c['legs']} legs.",
        }
    ws = rng.sample(WORDS, rng.randint(3, 6))
    if kind == "reverse":
        return {"prompt": f"Reverse the words: {' '.join(ws)}", "response": " ".join(reversed(ws))}
    if kind == "sort":
        return {"prompt": f"Sort the words: {' '.join(ws)}", "response": " ".join(sorted(ws))}
    return {"prompt": f"How many words are in: {' '.join(ws)}", "response": f"There are {len(ws)} words."}


def make_data(seed: int = 0, n_train: int = 2000, n_val: int = 100, n_test: int = 200):
    """Facts of a third of the creatures are never asked about in training (only stated
    in the corpus); validation and test ask about those and about unseen word lists."""
    rng = random.Random(seed)
    kb = creatures(rng)
    docs = corpus(kb, rng)

    def draw():
        ex = instruction(kb, rng)
        return ex, next((c["name"] for c in kb if f" {c['name']}" in ex["prompt"]), None)

    return kb, docs, split_instructions(draw, {c["name"] for c in kb[: len(kb) // 3]}, n_train, n_val, n_test)


def split_instructions(draw, held: set, n_train: int, n_val: int, n_test: int) -> dict:
    """Train / validation / test instructions from `draw()` -> (example, creature asked about or None).

    Training never asks about a `held` creature; validation and test ask only about held
    ones (or none) and never repeat a prompt seen before.
    """
    seen, splits = set(), {"train": [], "validation": [], "test": []}
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        while len(splits[split]) < n:
            ex, about = draw()
            if split == "train" and about in held:
                continue
            if split != "train" and (ex["prompt"] in seen or (about is not None and about not in held)):
                continue
            seen.add(ex["prompt"])
            splits[split].append(ex)
    return splits


def write_data(out: Path, seed: int = 0) -> dict:
    """Write corpus.txt and {train,validation,test}.jsonl; returns their paths."""
    kb, docs, splits = make_data(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text("\n".join(docs) + "\n")
    paths = {"corpus": str(out / "corpus.txt")}
    for name, rows in splits.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        paths[name] = str(out / f"{name}.jsonl")
    return paths


# ------------------------------------------------------------------ training the task's models
def lm_batch(rows, pad_id: int):
    """(input ids, attention mask, labels) of (ids, loss_mask) pairs, right-padded; labels −100 off the mask."""
    import torch

    L = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), L), -100, dtype=torch.long)
    att = torch.zeros(len(rows), L, dtype=torch.long)
    for i, (x, m) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        att[i, : len(x)] = 1
        lab[i, : len(x)] = torch.where(torch.tensor(m, dtype=torch.bool), torch.tensor(x), torch.tensor(-100))
    return ids, att, lab


def lm_train(model, sequences, steps: int, lr: float, batch: int, seed: int, desc: str):
    """Plain next-token training on (ids, loss_mask) pairs; used only to make the demo checkpoints."""
    import torch
    from tqdm import tqdm

    g = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for step in tqdm(range(steps), desc=desc, dynamic_ncols=True):
        ids, att, lab = lm_batch([sequences[g.randrange(len(sequences))] for _ in range(batch)], pad_id=0)
        for gr in opt.param_groups:
            gr["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return float(loss)


def build_checkpoints(out: str | Path, seed: int = 0, steps: int = 1500, sft_steps: int = 600) -> dict:
    import torch

    from deltakd.cache.format.records import encode_record, read_records
    from deltakd.demo.tiny import save_checkpoint, tiny_llama, train_tokenizer

    torch.manual_seed(seed)
    out = Path(out)
    paths = write_data(out / "data", seed)
    docs = Path(paths["corpus"]).read_text().splitlines()
    train_texts = [json.loads(l)["prompt"] + " " + json.loads(l)["response"] for l in open(paths["train"])]
    tok = train_tokenizer(docs + train_texts, 768, out / "tokenizer")
    pre = [
        (ids := [tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], [1] * len(ids))
        for d in docs
    ]
    sft = []
    for r in read_records(paths["train"]):
        ids, plen, _ = encode_record(tok, r, 128)
        sft.append((ids, [0] * plen + [1] * (len(ids) - plen)))
    teacher = tiny_llama(len(tok), seed=seed + 1, max_positions=256, tokenizer=tok, **TEACHER)
    lm_train(teacher, pre, steps, 3e-3, 32, seed, "teacher base")
    save_checkpoint(teacher, tok, out / "teacher_base")
    lm_train(teacher, sft, sft_steps, 1e-3, 32, seed + 1, "teacher sft")
    save_checkpoint(teacher, tok, out / "teacher_ft")
    student = tiny_llama(len(tok), seed=seed + 2, max_positions=256, tokenizer=tok, **STUDENT)
    lm_train(student, pre, steps, 3e-3, 32, seed + 2, "student base")
    save_checkpoint(student, tok, out / "student_base")
    (out / "TASK.json").write_text(
        json.dumps(
            {
                "seed": seed,
                "steps": steps,
                "sft_steps": sft_steps,
                "teacher": TEACHER,
                "student": STUDENT,
                "vocab": len(tok),
            },
            indent=1,
        )
    )
    return {k: str(out / k) for k in ("teacher_base", "teacher_ft", "student_base")} | paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "assets"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1500, help="pretraining steps of each base model")
    ap.add_argument("--sft-steps", type=int, default=600, help="SFT steps of the teacher")
    a = ap.parse_args(argv)
    print(json.dumps(build_checkpoints(a.out, a.seed, a.steps, a.sft_steps), indent=1))


if __name__ == "__main__":
    main()
