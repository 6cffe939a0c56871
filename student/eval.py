"""Generate answers and score them with ROUGE-L (F-measure x 100) against references.

    deltakd eval --model RUN/final [--model OTHER ...] --data test.jsonl --out EVAL
    deltakd eval ... --data hf:org/name --data-split test     # or a Parquet / Arrow / save_to_disk source

Prompts are formatted exactly as when the cache was built (`deltakd.cache.format.records`), so a
student is evaluated on the prompt format it was distilled on. Besides the project's
JSONL (prompt/response or messages) and the dataset sources of `deltakd.cache.format.sources`
(the "test" split by default), the Self-Instruct layout (`instruction`,
`instances: [{input, output}]`) is read from JSONL, one example per instance.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltakd.cache.format.records import DataError, Fields, Record, encode_prompt
from deltakd.cache.format.sources import DataSource, open_records
from deltakd.runtime import dist
from deltakd.student.model_card import add_evaluation


@dataclass(frozen=True)
class EvalConfig:
    models: tuple = field(metadata={"help": "model folders (Hugging Face checkpoints)"})
    data: str = field(
        metadata={"help": "JSONL (prompt/response, messages, Self-Instruct), Parquet, Arrow, hf:org/name"}
    )
    out: str = field(metadata={"help": "folder for per-example JSONL and summary.json"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens generated per answer"})
    batch_size: int = field(default=16, metadata={"help": "prompts per generate() call"})
    max_examples: int | None = field(default=None, metadata={"help": "score only the first N examples"})
    max_prompt_tokens: int = field(default=512, metadata={"help": "longer prompts keep their end"})
    sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    seeds: tuple = field(default=(0,), metadata={"help": "sampling seeds (ROUGE-L averaged over them)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N"})
    data_split: str | None = field(
        default=None, metadata={"help": "split of a dataset (default: its only one, else test)"}
    )
    data_config: str | None = field(default=None, metadata={"help": "configuration (subset) of a Hub dataset"})
    fields: Fields = field(default_factory=Fields, metadata={"help": "prompt / response / messages field names"})

    def __post_init__(self):
        if not self.models:
            raise ValueError("give at least one --model")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("--max-new-tokens and --batch-size must be positive")


def read_eval_examples(path: str, limit: int | None = None, **source) -> list[tuple[Record, str]]:
    """(record, reference) pairs, the first `limit` of them; Self-Instruct files give one pair per instance."""
    src = DataSource(path, default_split="test", **source)
    if src.kind != "jsonl":
        return [(r, r.response) for r in itertools.islice(open_records(src), limit)]
    p = Path(path)
    lines = p.read_text(encoding="utf-8").splitlines() if p.exists() else []
    first = next((l for l in lines if l.strip()), None)
    try:
        self_instruct = first is not None and "instances" in json.loads(first)
    except json.JSONDecodeError:
        self_instruct = False  # read_records reports the bad line with its number
    if self_instruct:
        out = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if "instruction" not in obj or not obj.get("instances"):
                raise DataError(f"{path}:{lineno}: a Self-Instruct record needs 'instruction' and 'instances'")
            for inst in obj["instances"]:
                text = obj["instruction"] + (f"\n\n{inst['input']}" if inst.get("input") else "")
                out.append((Record(len(out), (("user", text),), inst["output"]), inst["output"]))
        return out[:limit]
    return [(r, r.response) for r in itertools.islice(open_records(src), limit)]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure x 100 (rouge-score package, its default tokenisation)."""
    from rouge_score import rouge_scorer

    return 100.0 * _scorer(rouge_scorer).score(reference, prediction)["rougeL"].fmeasure


_SCORER = None


def _scorer(mod):
    global _SCORER
    if _SCORER is None:
        _SCORER = mod.RougeScorer(["rougeL"], use_stemmer=False)
    return _SCORER


@torch.no_grad()
def generate(model, tok, records: list[Record], cfg: EvalConfig, seed: int, bar=None) -> list[str]:
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = sorted(range(len(records)), key=lambda i: -len(records[i].messages[-1][1]))
    prompts = {i: encode_prompt(tok, records[i])[-cfg.max_prompt_tokens :] for i in order}
    texts: dict[int, str] = {}
    for s in range(0, len(order), cfg.batch_size):
        idx = order[s : s + cfg.batch_size]
        L = max(len(prompts[i]) for i in idx)
        # Left padding: every prompt ends where generation starts.
        ids = torch.full((len(idx), L), pad, dtype=torch.long)
        att = torch.zeros((len(idx), L), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, L - len(prompts[i]) :] = torch.tensor(prompts[i])
            att[r, L - len(prompts[i]) :] = 1
        torch.manual_seed(seed)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=att.to(device),
            max_new_tokens=cfg.max_new_tokens,
            do_sample=cfg.sample,
            temperature=cfg.temperature if cfg.sample else None,
            top_p=cfg.top_p if cfg.sample else None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
        )
        for r, i in enumerate(idx):
            texts[i] = tok.decode(gen[r, L:], skip_special_tokens=True).strip()
        if bar is not None:
            bar.update(len(idx))
    return [texts[i] for i in range(len(records))]


def evaluate_model(path: str, examples, cfg: EvalConfig, out_dir: Path) -> dict:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (Path(path) / "adapter_config.json").is_file() and importlib.util.find_spec("peft") is None:
        raise ValueError(
            f"--model {path} is a LoRA adapter: loading it needs peft (pip install 'deltakd[lora]'), or evaluate "
            "the merged student (train with --merge: final/merged)"
        )
    tok = AutoTokenizer.from_pretrained(path)
    # A LoRA adapter folder loads as its base (adapter_config.json) with the adapter, through transformers + peft.
    model = AutoModelForCausalLM.from_pretrained(path).to(dist.resolve_device(cfg.device)).eval()
    records = [r for r, _ in examples]
    seeds = cfg.seeds if cfg.sample else (0,)
    t0 = time.perf_counter()
    scores, rows = [], []
    bar = tqdm(total=len(records) * len(seeds), desc=f"eval {_label(path)}", unit="ex", dynamic_ncols=True)
    for seed in seeds:
        outputs = generate(model, tok, records, cfg, seed, bar)
        for (rec, ref), out in zip(examples, outputs):
            sc = rouge_l(out, ref)
            scores.append(sc)
            rows.append(
                {
                    "example_id": rec.example_id,
                    "seed": seed,
                    "prompt": rec.messages[-1][1],
                    "reference": ref,
                    "output": out,
                    "rougeL": sc,
                }
            )
    bar.close()
    name = _label(path)
    with open(out_dir / f"{name}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return {
        "model": str(path),
        "name": name,
        "rougeL": sum(scores) / max(len(scores), 1),
        "n": len(records),
        "seeds": list(seeds),
        "seconds": time.perf_counter() - t0,
    }


def _label(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}-{p.name}" if p.name in ("final", "model") else p.name


def run_eval(cfg: EvalConfig) -> list[dict]:
    examples = read_eval_examples(
        cfg.data, cfg.max_examples, split=cfg.data_split, config=cfg.data_config, fields=cfg.fields
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [evaluate_model(m, examples, cfg, out) for m in cfg.models]
    for r in results:  # a deltakd model card (final/README.md) gets its evaluation row
        r["card_updated"] = add_evaluation(r["model"], cfg.data, decoding_of(cfg), r["n"], r["rougeL"])
    (out / "summary.json").write_text(json.dumps({"data": cfg.data, "results": results}, indent=1))
    return results


def decoding_of(cfg: EvalConfig) -> str:
    if cfg.sample:
        how = f"sampling (temperature {cfg.temperature:g}, top-p {cfg.top_p:g}, seeds {list(cfg.seeds)})"
    else:
        how = "greedy"
    return f"{how}, {cfg.max_new_tokens} new tokens"


def format_table(results: list[dict]) -> str:
    w = max(len(r["name"]) for r in results)
    lines = [f"{'model':<{w}}  ROUGE-L   n", "-" * (w + 14)]
    lines += [f"{r['name']:<{w}}  {r['rougeL']:7.2f}  {r['n']}" for r in results]
    return "\n".join(lines)
