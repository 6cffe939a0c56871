"""The model card of every export: `final/README.md` in the Hugging Face format.

    ---                                   # YAML header the Hub reads
    library_name: transformers            # peft for a LoRA adapter
    base_model: HuggingFaceTB/SmolLM2-135M
    tags: [distillation, knowledge-distillation, deltakd, ...]
    datasets: [org/name]                  # when the cache was built from a Hub dataset
    ---
    objective, cache identity (manifest sha256, teachers), data, steps and tokens,
    final metrics, and the evaluation table that `deltakd eval` fills in

`card_info(trainer)` gathers the facts at export time, `render(info)` writes them;
`add_evaluation(folder, ...)` (called by `deltakd eval`) rewrites only the evaluation
section, whose rows it keeps as JSON in the section's opening comment. Cards that
deltakd did not write (a teacher's, a Hub model's) are never touched.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from deltakd.runtime.checkpoints import looks_local

CARD = "README.md"
MARK = "<!-- written by deltakd: the evaluation section is updated by `deltakd eval` -->"
EVAL_OPEN = re.compile(r"<!-- deltakd:evaluation (\[.*?\]) -->\n.*?<!-- /deltakd:evaluation -->", re.S)
HUB_CACHE_DIR = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/")


def hub_id_of(student: str) -> str | None:
    """The Hub id of a student given as an id or as a folder of the Hugging Face cache, else None."""
    if not Path(student).expanduser().is_dir() and not looks_local(student):
        return student
    m = HUB_CACHE_DIR.search(str(Path(student).expanduser().resolve()) + "/")
    return f"{m.group(1)}/{m.group(2)}" if m else None


def card_info(tr, adapter: bool = False) -> dict:
    """What the card says about a trainer's run (rank 0, at export time)."""
    cfg, reader = tr.cfg, tr.reader
    m = reader.manifest
    data = dict(m.get("data") or {})
    counters = getattr(tr, "counters", {}) or {}
    student_arrays = (m.get("student") or {}).get("checkpoint") or {}
    return {
        "out": str(tr.out),
        "student": cfg.student,
        "hub_id": hub_id_of(cfg.student),
        "adapter": adapter,
        "lora": getattr(tr, "lora_summary", None),
        "objective": cfg.objective(),
        "weights": dict(tr.spec.weights),
        "cache": {
            "path": str(reader.root),
            "manifest_sha256": hashlib.sha256((reader.root / "manifest.json").read_bytes()).hexdigest(),
            "format_version": m.get("format_version"),
            "support": m.get("support"),
            "k": m.get("k"),
            "tail_samples": m.get("tail_samples", 0),
            "alphas": m.get("alphas"),
            "teachers": {r: c for r, c in (m.get("checkpoints") or {}).items()},
            "student_base": student_arrays,
            "totals": m.get("totals") or {},
        },
        "data": data,
        "training": {
            "steps": tr.step,
            "tokens": int(counters.get("tokens", 0)),
            "supervised_tokens": int(counters.get("supervised", 0)),
            "world_size": tr.world,
            "parallel": cfg.parallel,
            "lr": cfg.lr,
            "batch_tokens": cfg.batch_tokens,
            "grad_accum": cfg.grad_accum,
            "seed": cfg.seed,
        },
        "metrics": {
            k: v
            for k, v in (getattr(tr, "final_metrics", None) or {}).items()
            if _is_number(v) and k not in ("step", "eta_s")
        },
    }


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _yaml_list(name: str, items: list[str]) -> list[str]:
    # JSON strings are valid YAML double-quoted scalars: no YAML library needed.
    return [f"{name}:"] + [f"- {json.dumps(i)}" for i in items]


def tags_of(info: dict) -> list[str]:
    terms = set(info["weights"])
    tags = ["distillation", "knowledge-distillation", "deltakd"]
    if terms & {"p1", "p2", "p3"}:
        tags.append("delta-kd")
    if "sft" in terms:
        tags.append("sft")
    if info.get("lora"):
        tags += ["lora", "peft"]
    return tags


def hub_datasets(info: dict) -> list[str]:
    path = str(info["data"].get("path", ""))
    return [path.removeprefix("hf:")] if path.startswith("hf:") else []


def render(info: dict, evaluations: list | None = None) -> str:
    base = info["hub_id"] or info["student"]
    head = ["---", f"library_name: {'peft' if info['adapter'] else 'transformers'}", f"base_model: {json.dumps(base)}"]
    head += _yaml_list("tags", tags_of(info))
    if hub_datasets(info):
        head += _yaml_list("datasets", hub_datasets(info))
    head += ["pipeline_tag: text-generation", "---", ""]
    c, d, t = info["cache"], info["data"], info["training"]
    name = Path(str(info.get("out") or "student")).name
    body = [
        MARK,
        "",
        f"# {name}",
        "",
        "A student distilled offline with deltakd (Delta Knowledge Distillation from a teacher cache), starting from "
        f"`{base}`{' (a local checkpoint)' if not info['hub_id'] else ''}.",
        "",
        "## Objective",
        "",
        f"`{info['objective']}`",
        "",
    ]
    if info.get("lora"):
        lo = info["lora"]
        body += [
            "## LoRA",
            "",
            f"rank {lo['r']}, alpha {lo['alpha']:g}, dropout {lo['dropout']:g}, targets {', '.join(lo['targets'])}; "
            f"{lo['trainable']:,} of {lo['total']:,} parameters trained. "
            + (
                "This folder holds the adapter: load it with `peft` on the base model."
                if info["adapter"]
                else "This folder holds the base model with the adapter merged in."
            ),
            "",
        ]
    body += [
        "## Teacher cache",
        "",
        "| | |",
        "|---|---|",
        f"| manifest sha256 | `{c['manifest_sha256']}` |",
        f"| format | version {c['format_version']}, support {c['support']}, k = {c['k']}, "
        f"tail samples {c['tail_samples']}, alphas {c['alphas']} |",
    ]
    body += [f"| {role} | {_checkpoint(ck)} |" for role, ck in c["teachers"].items()]
    if c["student_base"]:
        body.append(f"| student base arrays | {_checkpoint(c['student_base'])} |")
    tot = c["totals"]
    body += [
        "",
        "## Data",
        "",
        f"`{d.get('path', '?')}`"
        + (f", split `{d['split']}`" if d.get("split") else "")
        + (f", config `{d['config']}`" if d.get("config") else "")
        + f" (sha256 of the {'records' if d.get('hash_of') == 'records' else 'file'} `{d.get('sha256', '?')}`): "
        f"{tot.get('n_seqs', '?')} sequences, {tot.get('n_tokens', '?')} tokens, "
        f"{tot.get('n_supervised', '?')} supervised.",
        "",
        "## Training",
        "",
        f"{t['steps']} optimizer steps over {t['tokens']:,} tokens ({t['supervised_tokens']:,} supervised); "
        + (f"{t['world_size']} ranks ({t['parallel']}); " if t["world_size"] > 1 else "one process; ")
        + f"peak lr {t['lr']:g}, {t['batch_tokens']} tokens per "
        f"micro-batch, gradient accumulation {t['grad_accum']}, seed {t['seed']}. The full configuration is in "
        "`train_config.json`.",
        "",
    ]
    if info["metrics"]:
        body += ["## Final metrics", "", "| metric | value |", "|---|---|"]
        body += [f"| {k} | {v:.6g} |" for k, v in info["metrics"].items()]
        body.append("")
    body += [evaluation_section(evaluations or []), ""]
    return "\n".join(head + body)


def _checkpoint(ck: dict) -> str:
    return f"`{ck.get('path', '?')}` (weights sha256 `{str(ck.get('weights_sha256', '?'))[:16]}…`)"


def evaluation_section(rows: list[dict]) -> str:
    lines = [f"<!-- deltakd:evaluation {json.dumps(rows)} -->", "## Evaluation", ""]
    if not rows:
        lines.append(
            "Not evaluated yet: `deltakd eval --model <this folder> --data TEST --out EVAL` adds its table here."
        )
    else:
        lines += ["| data | decoding | examples | ROUGE-L |", "|---|---|---|---|"]
        lines += [f"| `{r['data']}` | {r['decoding']} | {r['n']} | {r['rougeL']:.2f} |" for r in rows]
    lines.append("<!-- /deltakd:evaluation -->")
    return "\n".join(lines)


def write_card(folder: Path, info: dict) -> Path:
    path = Path(folder) / CARD
    path.write_text(render(info))
    return path


def add_evaluation(folder: str | Path, data: str, decoding: str, n: int, rouge_l: float) -> bool:
    """Put one ROUGE-L row (replacing the row of the same data and decoding) into a deltakd card; False if none."""
    path = Path(folder) / CARD
    try:
        text = path.read_text()
    except OSError:
        return False
    m = EVAL_OPEN.search(text)
    if MARK not in text or not m:
        return False
    rows = [r for r in json.loads(m.group(1)) if (r["data"], r["decoding"]) != (data, decoding)]
    rows.append({"data": data, "decoding": decoding, "n": n, "rougeL": rouge_l})
    try:
        path.write_text(text[: m.start()] + evaluation_section(rows) + text[m.end() :])
    except OSError:
        return False  # a read-only model folder keeps its card
    return True
