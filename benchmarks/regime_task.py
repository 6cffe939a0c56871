"""A world where the student's best answer is not the teacher's: does Delta-KD's premise hold?

    python -m benchmarks.quality regime [--smoke] [--report-only]   # builds this world on first use, then reuses it

Delta-KD trains the student toward π* ∝ πS0·(πT/πB)^α: the teacher's SFT shift applied
to the student's own base. EFT (Mitchell et al., ICLR 2024) finds that a large model's
finetuning delta applied to a small base adds the finetuned behaviour while the small
base keeps its own knowledge. The demo world never tests this: both bases learn the
same corpus. This world splits the knowledge between them.

DESIGN (fixed before any objective was run on this world; not changed after results)

World. The demo's generator, tokenizer and sizes (scripts/demo/synthetic.py): its 40
invented creatures (`creatures(random.Random(0))`, the demo's knowledge base), split by
position into three disjoint sets,
  A = kb[0::3] (14 creatures): stated only in the teacher base's pretraining corpus,
  S = kb[1::3] (13): stated only in the student base's corpus,
  C = kb[2::3] (13): stated in both.
Teacher corpus: `synthetic.corpus(A ∪ C)`, student corpus: `synthetic.corpus(S ∪ C)`,
3000 documents each (3/4 fact documents, 1/4 word-list documents, separate seeded
streams). Tokenizer: the demo's shipped one (scripts/demo/assets/tokenizer), unchanged.
Checkpoints exactly as `synthetic.build_checkpoints`: teacher 128x4 (init seed 1) and
student 48x2 (init seed 2), 1500 pretraining steps each (lr 3e-3, batch 32); the teacher
then finetuned 600 steps (lr 1e-3) on the training instructions.

Instructions. 2000 training instructions drawn with `synthetic.instruction` over A ∪ C
(the teacher is finetuned only on creatures it knows). For every creature of A ∪ C two
of its three single-fact questions (color, home, food; chosen by a seeded draw) are held
out: never asked in training. Its "Describe the X." prompt and its remaining question
are asked, so every fact of A ∪ C appears in some training response (a description
states color, home, food, size and legs). S creatures never appear in training. The
cache is built on the training instructions (the paper distils on the teacher's SFT
data) with the default build (union of top-16s + 16 tail samples, floor −12, alphas
0.5 1 1.5); students train from it.

Test (no prompt of it is a training prompt), scored per set:
  A:     both held questions of each A creature (28 prompts),
  S:     the three single-fact questions of each S creature (39),
  C:     both held questions of each C creature (26),
  words: 60 unseen word-list prompts (reverse, sort, count), as in the demo.
Greedy decoding, 40 new tokens, ROUGE-L F x 100 (`deltakd eval`). Beside it: "fact",
the share of answers that contain the asked fact's value (words: exact answers).

Students. 600 steps, 2048 tokens per batch, lr 2e-3, 20 warmup steps (the demo table's
settings); seeds 0 1 2. Rows: SFT, KD (forward KL), P1 α 1, P1 α 1.5, and the paper's
recipe 0.5·SFT + 0.5·D with D = KD and D = P1 (α 1). Each student's held-out full-
vocabulary KL(πT ‖ πθ) and KL(π* ‖ πθ) (π* at α 1, floor −12), teacher-forced on the
reference answers of each test set, mean per answer token, float32.

PREDICTIONS (from EFT's down-scaling result; fixed with the design)
  S: P1 α 1 scores at least KD, and 0.5·SFT + 0.5·P1 at least 0.5·SFT + 0.5·KD: P1's
     target keeps the student base's own answers where the teacher has nothing to say.
  A: KD scores at least P1 α 1, and the KD recipe at least the P1 recipe: KD transfers
     facts the student base never saw.
  C and words: no difference between P1 and KD (alone and in the recipe) beyond the
     seed spread.
Decision rule, per set and pair (X, Y): d = mean over seeds of ROUGE-L(X) − ROUGE-L(Y)
(same seed, same batches); spread = sample std over seeds of X + that of Y. "X scores at
least Y" holds unless d < −spread; "no difference" holds if |d| ≤ spread; a win of X
over Y is d > spread. P1 α 1.5 and "fact" are reported, not predicted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from deltakd.demo import synthetic as syn

SETS = ("A", "S", "C", "words")
FACT_KINDS = ("color", "home", "food")
_CREATURE_PROMPT = re.compile(r"^(What color is|Where does|What does|Describe) the (\w+)(?: live| eat)?[?.]$")
_KIND = {"What color is": "color", "Where does": "home", "What does": "food", "Describe": "describe"}


@dataclass(frozen=True)
class WorldSize:
    """How big the world is; the full benchmark uses the defaults (the demo's sizes), --smoke a tiny one."""

    n_docs: int = 3000  # pretraining documents of each base's corpus
    n_train: int = 2000  # training instructions (teacher SFT data and cache data)
    n_words: int = 60  # word-list test prompts
    per_set: int | None = None  # test prompts kept per creature set (None: all)
    steps: int = 1500  # pretraining steps of each base
    sft_steps: int = 600  # SFT steps of the teacher


SMOKE = WorldSize(n_docs=200, n_train=120, n_words=3, per_set=3, steps=10, sft_steps=5)


def question(c: dict, kind: str) -> dict:
    """The single-fact instruction of `synthetic.instruction` about creature `c`, with the fact's value."""
    n = c["name"]
    prompt, response = {
        "color": (f"What color is the {n}?", f"The {n} is {c['color']}."),
        "home": (f"Where does the {n} live?", f"The {n} lives in {c['home']}."),
        "food": (f"What does the {n} eat?", f"The {n} eats {c['food']}."),
    }[kind]
    return {"prompt": prompt, "response": response, "answer": c[kind]}


def about(prompt: str) -> tuple[str | None, str | None]:
    """(creature name, kind) of a creature instruction; (None, None) for a word-list task."""
    m = _CREATURE_PROMPT.match(prompt)
    return (m.group(2), _KIND[m.group(1)]) if m else (None, None)


def make_world(seed: int = 0, size: WorldSize = WorldSize()) -> dict:
    """Creature sets, the two corpora, training instructions and the per-set test (see the module docstring)."""
    kb = syn.creatures(random.Random(seed))  # the demo's knowledge base: make_data draws it first
    sets = {"A": kb[0::3], "S": kb[1::3], "C": kb[2::3]}
    known_t, known_s = sets["A"] + sets["C"], sets["S"] + sets["C"]
    corpus_t = syn.corpus(known_t, random.Random(seed + 101), size.n_docs)
    corpus_s = syn.corpus(known_s, random.Random(seed + 202), size.n_docs)
    rng = random.Random(seed + 303)
    held = {c["name"]: sorted(rng.sample(FACT_KINDS, 2)) for c in known_t}
    by_name = {c["name"]: c for c in kb}
    train, seen = [], set()
    while len(train) < size.n_train:
        ex = syn.instruction(known_t, rng)
        name, kind = about(ex["prompt"])
        if name is not None:
            assert name in by_name, ex["prompt"]
            if kind in FACT_KINDS:  # the test's questions are the training templates, word for word
                q = question(by_name[name], kind)
                assert (q["prompt"], q["response"]) == (ex["prompt"], ex["response"]), ex
            if kind in held[name]:
                continue
        train.append(ex)
        seen.add(ex["prompt"])
    test = []
    for s in ("A", "S", "C"):
        rows = [question(c, k) | {"set": s} for c in sets[s] for k in (FACT_KINDS if s == "S" else held[c["name"]])]
        test += rows[: size.per_set]
    words = []
    while len(words) < size.n_words:
        ex = syn.instruction(known_t, rng)
        if about(ex["prompt"])[0] is None and ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            words.append(ex | {"set": "words", "answer": ex["response"]})
    test += words
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in train}
    return {
        "sets": {s: [c["name"] for c in v] for s, v in sets.items()},
        "held": held,
        "corpus_teacher": corpus_t,
        "corpus_student": corpus_s,
        "train": train,
        "test": test,
    }


def write_world(out: Path, seed: int = 0, size: WorldSize = WorldSize()) -> dict:
    """corpus_{teacher,student}.txt, train.jsonl, test.jsonl (rows carry `set` and `answer`), world.json."""
    w = make_world(seed, size)
    out.mkdir(parents=True, exist_ok=True)
    files = {f"{k}.txt": "\n".join(w[k]) + "\n" for k in ("corpus_teacher", "corpus_student")}
    files |= {f"{k}.jsonl": "".join(json.dumps(r) + "\n" for r in w[k]) for k in ("train", "test")}
    files["world.json"] = json.dumps(
        {"seed": seed, "size": asdict(size), "sets": w["sets"], "held": w["held"]}, indent=1
    )
    for name, text in files.items():
        # Another run may be reading these files: rewrite only what differs, and by rename (a reader never
        # sees a half-written file).
        if not (out / name).exists() or (out / name).read_text() != text:
            (out / f".{name}.tmp").write_text(text)
            os.replace(out / f".{name}.tmp", out / name)
    return {k: str(out / f"{k}.txt") for k in ("corpus_teacher", "corpus_student")} | {
        k: str(out / f"{k}.jsonl") for k in ("train", "test")
    }


def build(out: str | Path, seed: int = 0, size: WorldSize = WorldSize()) -> dict:
    """Data and checkpoints of the world in `out` (reused when TASK.json says they were built with these settings)."""
    import torch
    from transformers import AutoTokenizer

    from deltakd.cache.format.records import encode_record, read_records
    from deltakd.demo.pipeline import ASSETS
    from deltakd.demo.tiny import save_checkpoint, tiny_llama

    out = Path(out)
    task = {"seed": seed, "size": asdict(size), "teacher": syn.TEACHER, "student": syn.STUDENT}
    paths = write_world(out / "data", seed, size)
    ckpt = {k: str(out / k) for k in ("teacher_base", "teacher_ft", "student_base")}
    done = out / "TASK.json"
    if done.exists() and json.loads(done.read_text()) == task:
        return ckpt | paths
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")

    def documents(path):
        docs = Path(path).read_text().splitlines()
        return [
            (
                ids := [tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                [1] * len(ids),
            )
            for d in docs
        ]

    sft = []
    for r in read_records(paths["train"]):
        ids, plen, _ = encode_record(tok, r, 128)
        sft.append((ids, [0] * plen + [1] * (len(ids) - plen)))
    teacher = tiny_llama(len(tok), seed=seed + 1, max_positions=256, tokenizer=tok, **syn.TEACHER)
    syn.lm_train(teacher, documents(paths["corpus_teacher"]), size.steps, 3e-3, 32, seed, "teacher base (A, C)")
    save_checkpoint(teacher, tok, ckpt["teacher_base"])
    syn.lm_train(teacher, sft, size.sft_steps, 1e-3, 32, seed + 1, "teacher sft")
    save_checkpoint(teacher, tok, ckpt["teacher_ft"])
    student = tiny_llama(len(tok), seed=seed + 2, max_positions=256, tokenizer=tok, **syn.STUDENT)
    syn.lm_train(student, documents(paths["corpus_student"]), size.steps, 3e-3, 32, seed + 2, "student base (S, C)")
    save_checkpoint(student, tok, ckpt["student_base"])
    done.write_text(json.dumps(task, indent=1))
    return ckpt | paths


def set_of(row: dict) -> str:
    """A test row's set; rows without one (the demo's test split) form the set "all"."""
    return row.get("set", "all")


def score_sets(test_path: str | Path, eval_rows: list[dict]) -> dict:
    """Per set: mean ROUGE-L, "fact" (share of answers containing the asked value; words: exact answers), and for
    the creature sets "name" (share naming the creature asked about) and "name_fact" (naming it and the value)."""
    test = [json.loads(l) for l in Path(test_path).read_text().splitlines()]
    out = {}
    for s in dict.fromkeys(set_of(t) for t in test):
        rows = [(test[r["example_id"]], r) for r in eval_rows if set_of(test[r["example_id"]]) == s]
        if not rows:
            continue
        out[s] = {"rougeL": sum(r["rougeL"] for _, r in rows) / len(rows), "n": len(rows)}
        if all("answer" in t for t, _ in rows):
            hit = [
                (r["output"].strip() == t["answer"]) if s == "words" else (t["answer"] in r["output"]) for t, r in rows
            ]
            out[s]["fact"] = 100.0 * sum(hit) / len(rows)
        if s != "words" and all("answer" in t for t, _ in rows):
            # Added after the run (a diagnostic, not part of the predictions): does the answer name the creature
            # asked about, and name it with the right value?
            named = [re.search(rf"\b{about(t['prompt'])[0]}\b", r["output"]) is not None for t, r in rows]
            out[s]["name"] = 100.0 * sum(named) / len(rows)
            out[s]["name_fact"] = 100.0 * sum(n and h for n, h in zip(named, hit)) / len(rows)
    return out


# The predictions of the module docstring: (set, X, Y, claim); claim "at least": X >= Y, "level": no difference.
PREDICTIONS = (
    ("S", "p1_a1.0", "kd_fkl", "at least"),
    ("S", "lam0.5_p1_a1.0", "lam0.5_kd", "at least"),
    ("A", "kd_fkl", "p1_a1.0", "at least"),
    ("A", "lam0.5_kd", "lam0.5_p1_a1.0", "at least"),
    *((s, x, y, "level") for s in ("C", "words") for x, y in (("p1_a1.0", "kd_fkl"), ("lam0.5_p1_a1.0", "lam0.5_kd"))),
)


def judge(per_seed: dict) -> list[dict]:
    """Each prediction under the decision rule; per_seed[variant][set]: ROUGE-L per seed, same seed order."""
    import statistics

    def sd(v):
        return statistics.stdev(v) if len(v) > 1 else 0.0

    out = []
    for s, x, y, claim in PREDICTIONS:
        vx, vy = per_seed.get(x, {}).get(s, []), per_seed.get(y, {}).get(s, [])
        n = min(len(vx), len(vy))
        if n == 0:
            out.append({"set": s, "x": x, "y": y, "claim": claim, "held": None})
            continue
        d = statistics.mean(a - b for a, b in zip(vx[:n], vy[:n]))
        spread = sd(vx[:n]) + sd(vy[:n])
        held = d >= -spread if claim == "at least" else abs(d) <= spread
        out.append({"set": s, "x": x, "y": y, "claim": claim, "d": d, "spread": spread, "seeds": n, "held": held})
    return out


class HeldOutKL:
    """Full-vocabulary KL(πT ‖ πθ) and KL(π* ‖ πθ) of a model, teacher-forced on the reference answers of each set.

    π* = softmax(lS0 + α·(max(lT, f) − max(lB, f))) on the whole vocabulary (float32), the target
    of P1 with floor f. Targets are computed once from the three frozen checkpoints; `__call__`
    scores one model. Mean per answer token (the positions a cache would supervise).
    """

    def __init__(self, paths: dict, alpha: float = 1.0, floor: float | None = -12.0, max_length: int = 128):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from deltakd.cache.format.records import encode_record, loss_mask_for, read_records

        self.tok = AutoTokenizer.from_pretrained(paths["teacher_ft"])
        test = [json.loads(l) for l in Path(paths["test"]).read_text().splitlines()]
        sets = dict.fromkeys(set_of(t) for t in test)
        self.index = {s: [i for i, t in enumerate(test) if set_of(t) == s] for s in sets}
        records = read_records(paths["test"])
        models = {
            k: AutoModelForCausalLM.from_pretrained(paths[k]).eval()
            for k in ("teacher_ft", "teacher_base", "student_base")
        }
        self.inputs, self.targets = {}, {}
        for s, idx in self.index.items():
            enc = [encode_record(self.tok, records[i], max_length) for i in idx]
            L = max(len(ids) for ids, _, _ in enc)
            ids = torch.zeros(len(enc), L, dtype=torch.long)
            att = torch.zeros(len(enc), L, dtype=torch.long)
            mask = torch.zeros(len(enc), L, dtype=torch.bool)
            for r, (x, plen, _) in enumerate(enc):
                ids[r, : len(x)] = torch.tensor(x)
                att[r, : len(x)] = 1
                mask[r, : len(x)] = torch.tensor(loss_mask_for(len(x), plen), dtype=torch.bool)
            with torch.no_grad():
                lp = {
                    k: torch.log_softmax(m(input_ids=ids, attention_mask=att).logits.float()[mask], -1)
                    for k, m in models.items()
                }
            shift = (
                lp["teacher_ft"] - lp["teacher_base"]
                if floor is None
                else (lp["teacher_ft"].clamp_min(floor) - lp["teacher_base"].clamp_min(floor))
            )
            star = torch.log_softmax(lp["student_base"] + alpha * shift, -1)  # (N, V)
            self.inputs[s] = (ids, att, mask)
            self.targets[s] = {"kl_t": lp["teacher_ft"], "kl_star": star}

    def __call__(self, model_dir: str | Path) -> dict:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        out = {}
        for s, (ids, att, mask) in self.inputs.items():
            with torch.no_grad():
                lq = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits.float()[mask], -1)  # (N, V)
            out[s] = {k: float((p.exp() * (p - lq)).sum(-1).mean()) for k, p in self.targets[s].items()}
        return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="build the regime world (data and checkpoints)")
    ap.add_argument("--out", default="runs/quality-regime/world")
    ap.add_argument("--smoke", action="store_true", help="a tiny world (seconds): the same path")
    a = ap.parse_args(argv)
    print(json.dumps(build(a.out, size=SMOKE if a.smoke else WorldSize()), indent=1))


if __name__ == "__main__":
    main()
