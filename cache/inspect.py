"""What a cache holds: counts, size on disk, top-k coverage, the shift SFT caused.

    deltakd cache inspect CACHE [--example N] [--plot FILE.png] [--json]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import schema
from .reader import CacheReader

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for d in (schema.TEACHER_DIR, schema.STUDENT_DIR)
               for p in (root / d).rglob("*") if p.is_file())


def raw_bytes_per_row(m: dict, student: bool) -> int:
    """Plain uncompressed layout: ids + k-wide value arrays + tails, per supervised row."""
    vb = schema.storage_dtype(m["value_dtype"]).itemsize
    ib = np.dtype(m["id_dtype"]).itemsize
    n_k, n_tail = (3, 3) if student else (2, 2)
    return m["k"] * (ib + n_k * vb) + n_tail * vb


def summarize(path, max_shards: int | None = None, top_tokens: int = 10) -> dict:
    r = CacheReader(path)
    m, tot = r.manifest, r.manifest["totals"]
    cover, kls, deltas = [], [], []
    shift = torch.zeros(r.vocab_size, dtype=torch.float64)
    for name in r.shard_names[:max_shards]:
        a = r.read_shard(name, student=False).arrays
        pT = a["logp_ft"].exp()
        lB = a["logp_ft"] - a["delta"]
        cover.append(1 - a["tail_ft"].exp())
        # KL(T || B) on the top-k support with the tail as one more outcome.
        tail_term = torch.where(torch.isfinite(a["tail_ft"]),
                                a["tail_ft"].exp() * (a["tail_ft"] - a["tail_base"]), torch.zeros(()))
        kls.append((pT * a["delta"]).sum(1) + tail_term)
        deltas.append(a["delta"].flatten()[::7])
        shift.index_add_(0, a["topk_ids"].flatten(), (pT - lB.exp()).flatten().double())
    cover, kls = torch.cat(cover).numpy(), torch.cat(kls).numpy()
    bytes_disk = disk_bytes(r.root)
    raw = raw_bytes_per_row(m, r.has_student)
    n_sup = max(tot["n_supervised"], 1)
    order = torch.argsort(shift)
    out = {
        "path": str(r.root), "format_version": m["format_version"], "k": r.k, "vocab_size": r.vocab_size,
        "value_dtype": m["value_dtype"], "shards": len(r.shard_names), "sequences": tot["n_seqs"],
        "tokens": tot["n_tokens"], "supervised": tot["n_supervised"], "has_student": r.has_student,
        "truncated": m.get("summary", {}).get("n_truncated"),
        "bytes_on_disk": bytes_disk, "bytes_per_supervised_token": bytes_disk / n_sup,
        "raw_bytes_per_supervised_token": raw,
        "topk_mass_quantiles": {str(q): float(np.quantile(cover, q)) for q in QUANTILES} if len(cover) else {},
        "mean_kl_ft_base": float(kls.mean()) if len(kls) else 0.0,
        "raised_most": [(int(i), float(shift[i])) for i in order.flip(0)[:top_tokens]],
        "lowered_most": [(int(i), float(shift[i])) for i in order[:top_tokens]],
        "_cover": cover, "_delta": torch.cat(deltas).numpy() if deltas else np.zeros(0),
    }
    return out


def _decoder(m: dict, tokenizer_path: str | None):
    path = tokenizer_path or m["checkpoints"]["teacher_ft"]["path"]
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        return lambda i: repr(tok.decode([int(i)]))
    except Exception:
        return lambda i: f"<id {int(i)}>"


def format_summary(s: dict, m: dict, tokenizer_path: str | None = None) -> str:
    dec = _decoder(m, tokenizer_path)
    q = "  ".join(f"p{int(float(k) * 100)}={v:.3f}" for k, v in s["topk_mass_quantiles"].items())
    lines = [
        f"cache            {s['path']}  (format v{s['format_version']}, k={s['k']}, vocab={s['vocab_size']}, {s['value_dtype']})",
        f"sequences        {s['sequences']}  in {s['shards']} shards  (truncated: {s['truncated']})",
        f"tokens           {s['tokens']}  supervised positions: {s['supervised']}",
        f"student arrays   {'yes' if s['has_student'] else 'no (deltakd cache add-student)'}",
        f"on disk          {s['bytes_on_disk'] / 1e6:.2f} MB = {s['bytes_per_supervised_token']:.1f} B per supervised token "
        f"(plain layout {s['raw_bytes_per_supervised_token']} B, ratio {s['bytes_per_supervised_token'] / s['raw_bytes_per_supervised_token']:.2f})",
        f"top-k mass       {q}",
        f"mean KL(ft||base) {s['mean_kl_ft_base']:.4f} nats per supervised position (top-k + tail bucket)",
        "(token: sum over supervised positions of p_ft - p_base, on the cached top-k)",
        "SFT raised most  " + ", ".join(f"{dec(i)} {v:+.2f}" for i, v in s["raised_most"]),
        "SFT lowered most " + ", ".join(f"{dec(i)} {v:+.2f}" for i, v in s["lowered_most"]),
    ]
    return "\n".join(lines)


def format_example(path, index: int, top: int = 5, tokenizer_path: str | None = None) -> str:
    r = CacheReader(path)
    dec = _decoder(r.manifest, tokenizer_path)
    for i, seq in enumerate(r.iter_sequences()):
        if i == index:
            break
    else:
        raise IndexError(f"--example {index}: the cache holds {len(r)} sequences")
    lines = [f"example id {seq.example_id}: {len(seq.tokens)} tokens, {int(seq.loss_mask.sum())} supervised",
             "pos  token -> next   | top candidates: p_ft (delta = log p_ft - log p_base)"]
    row = 0
    for t in range(len(seq.tokens)):
        nxt = dec(seq.tokens[t + 1]) if t + 1 < len(seq.tokens) else ""
        line = f"{t:4d} {dec(seq.tokens[t]):>12} -> {nxt:<12}"
        if seq.loss_mask[t]:
            cands = [f"{dec(seq.topk_ids[row, j])} {seq.logp_ft[row, j].exp():.3f} ({seq.delta[row, j]:+.2f})"
                     for j in range(min(top, r.k))]
            line += " | " + "  ".join(cands)
            row += 1
        lines.append(line)
    return "\n".join(lines)


def plot(s: dict, out: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib: pip install 'deltakd[plot]'") from e
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].hist(s["_cover"], bins=50)
    ax[0].set(title=f"probability mass in the top-{s['k']}", xlabel="mass", ylabel="positions")
    ax[1].hist(np.clip(s["_delta"], -10, 10), bins=80)
    ax[1].set(title="delta = log p_ft - log p_base on the top-k", xlabel="nats", yscale="log")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
