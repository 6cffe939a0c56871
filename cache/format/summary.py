"""What a cache holds: counts, size on disk, top-k coverage, the shift SFT caused.

deltakd cache inspect CACHE [--example N] [--plot FILE.png] [--json]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deltakd.cache.format import schema
from deltakd.cache.format.reader import CacheReader

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
PROPOSAL_NAMES = {"teacher": "pi_T", "target": "pi* (alpha 1)", "mixture": "half pi_T, half pi* (alpha 1)"}


def disk_bytes(root: Path) -> int:
    return sum(
        p.stat().st_size for d in (schema.TEACHER_DIR, schema.STUDENT_DIR) for p in (root / d).rglob("*") if p.is_file()
    )


def raw_bytes_per_row(m: dict, student: bool, mean_entries: float) -> float:
    """Plain uncompressed layout per supervised row: ids + value arrays on the support + tails."""
    vb = schema.storage_dtype(m["value_dtype"]).itemsize
    ib = np.dtype(m["id_dtype"]).itemsize
    n_vals, n_tail = (3, 3 + len((m.get("student") or {}).get("alphas") or ())) if student else (2, 2)
    return mean_entries * (ib + n_vals * vb) + n_tail * vb + (2 if m.get("format_version", 1) >= 2 else 0)


def summarize(path, max_shards: int | None = None, top_tokens: int = 10) -> dict:
    """Counts, bytes, support length, and how much of each distribution the support holds."""
    r = CacheReader(path)
    m, tot = r.manifest, r.manifest["totals"]
    held = {"ft": [], "base": [], "s0": []} | {f"star_{a:g}": [] for a in r.alphas}
    kls, deltas, lengths, sampled_rows, topk_tail = [], [], [], [], []
    shift = torch.zeros(r.vocab_size, dtype=torch.float64)
    for name in r.shard_names[:max_shards]:
        sh = r.read_shard(name)
        a = sh.arrays
        t = sh.rows(torch.arange(len(a["support_len"])))  # (S, K) padded with -inf
        lengths.append(a["support_len"])
        if "sampled" in t:  # πT mass the drawn ids stand for: outside the top-k ids (drawn ones + bucket)
            drawn = torch.where(t["sampled"], t["logp_ft"], torch.full((), float("-inf"))).logsumexp(1)
            sampled_rows.append(t["sampled"].any(1))
            topk_tail.append(torch.logaddexp(drawn, a["tail_ft"]).exp())
        for key in ("ft", "base", "s0"):
            if f"tail_{key}" in a:
                held[key].append(1 - a[f"tail_{key}"].exp())
        # pi*_alpha on the support against its exact tail: the share of the target the support holds.
        for i, al in enumerate(r.alphas):
            u = t["logp_s0"] + al * (
                t["logp_ft"].clamp_min(r.floor) - t["logp_base"].clamp_min(r.floor)
                if r.floor is not None
                else t["logp_ft"] - t["logp_base"]
            )
            u = u.masked_fill(~t["valid"], float("-inf")).logsumexp(1)
            held[f"star_{al:g}"].append(torch.sigmoid(u - t["tail_star"][:, i]))
        d = torch.where(t["valid"], t["logp_ft"] - t["logp_base"], torch.zeros(()))
        pT = t["logp_ft"].exp()
        # KL(T || B) on the support with the tail as one more outcome.
        tail_term = torch.where(
            torch.isfinite(a["tail_ft"]), a["tail_ft"].exp() * (a["tail_ft"] - a["tail_base"]), torch.zeros(())
        )
        kls.append((pT * d).sum(1) + tail_term)
        deltas.append(d[t["valid"]][::7])
        shift.index_add_(0, a["support_ids"], (a["logp_ft"].exp() - a["logp_base"].exp()).double())
    held = {k: torch.cat(v).numpy() for k, v in held.items() if v}
    kls = torch.cat(kls).numpy() if kls else np.zeros(0)
    lengths = torch.cat(lengths).numpy() if lengths else np.zeros(0)
    bytes_disk = disk_bytes(r.root)
    n_sup = max(tot["n_supervised"], 1)
    raw = raw_bytes_per_row(m, r.has_student, float(lengths.mean()) if len(lengths) else 0.0)
    order = torch.argsort(shift)
    quant = lambda x: {str(q): float(np.quantile(x, q)) for q in QUANTILES} if len(x) else {}  # noqa: E731
    return {
        "path": str(r.root),
        "format_version": m["format_version"],
        "support": r.support,
        "k": r.k,
        "alphas": list(r.alphas),
        "floor": r.floor,
        "vocab_size": r.vocab_size,
        "value_dtype": m["value_dtype"],
        "shards": len(r.shard_names),
        "sequences": tot["n_seqs"],
        "tokens": tot["n_tokens"],
        "supervised": tot["n_supervised"],
        "has_student": r.has_student,
        "truncated": m.get("summary", {}).get("n_truncated"),
        "tail_samples": int(m.get("tail_samples") or 0),
        "tail_proposal": r.tail_proposal,
        "rows_with_samples": float(torch.cat(sampled_rows).float().mean()) if sampled_rows else 0.0,
        "topk_tail_mass_quantiles": quant(torch.cat(topk_tail).numpy()) if topk_tail else {},
        "bytes_on_disk": bytes_disk,
        "bytes_per_supervised_token": bytes_disk / n_sup,
        "raw_bytes_per_supervised_token": raw,
        "support_length_quantiles": quant(lengths),
        "support_length_mean": float(lengths.mean()) if len(lengths) else 0.0,
        "mass_held_quantiles": {k: quant(v) for k, v in held.items()},
        "topk_mass_quantiles": quant(held.get("ft", np.zeros(0))),
        "mean_kl_ft_base": float(kls.mean()) if len(kls) else 0.0,
        "raised_most": [(int(i), float(shift[i])) for i in order.flip(0)[:top_tokens]],
        "lowered_most": [(int(i), float(shift[i])) for i in order[:top_tokens]],
        "_cover": held.get("ft", np.zeros(0)),
        "_delta": torch.cat(deltas).numpy() if deltas else np.zeros(0),
    }


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
    fq = lambda d, f=".3f": "  ".join(f"p{int(float(k) * 100)}={v:{f}}" for k, v in d.items())  # noqa: E731
    names = {"ft": "pi_T (teacher ft)", "base": "pi_B (teacher base)", "s0": "pi_S0 (student base)"}
    held = [f"  {names.get(k, 'pi* alpha=' + k[5:]):<22} {fq(v)}" for k, v in s["mass_held_quantiles"].items()]
    lines = [
        f"cache            {s['path']}  (format v{s['format_version']}, support {s['support']}, k={s['k']}, "
        f"vocab={s['vocab_size']}, {s['value_dtype']}, alphas {s['alphas'] or 'none'}, floor {s['floor']})",
        f"sequences        {s['sequences']}  in {s['shards']} shards  (truncated: {s['truncated']})",
        f"tokens           {s['tokens']}  supervised positions: {s['supervised']}",
        f"student arrays   {'yes' if s['has_student'] else 'no (deltakd cache add-student)'}",
        f"on disk          {s['bytes_on_disk'] / 1e6:.2f} MB = "
        f"{s['bytes_per_supervised_token']:.1f} B per supervised token "
        f"(plain layout {s['raw_bytes_per_supervised_token']:.1f} B, "
        f"ratio {s['bytes_per_supervised_token'] / s['raw_bytes_per_supervised_token']:.2f})",
        f"support length   mean {s['support_length_mean']:.1f}  {fq(s['support_length_quantiles'], '.0f')}",
        *(
            [
                f"tail samples     {s['tail_samples']} per row in {100 * s['rows_with_samples']:.1f}% of rows, "
                f"drawn from {PROPOSAL_NAMES[s.get('tail_proposal', 'teacher')]}; "
                f"pi_T mass outside the top-k ids: {fq(s['topk_tail_mass_quantiles'])}"
            ]
            if s["tail_samples"]
            else []
        ),
        "mass the support holds (the rest is each distribution's tail bucket):",
        *held,
        f"mean KL(ft||base) {s['mean_kl_ft_base']:.4f} nats per supervised position (support + tail bucket)",
        "(token: sum over supervised positions of p_ft - p_base, on the cached support)",
        "SFT raised most  " + ", ".join(f"{dec(i)} {v:+.2f}" for i, v in s["raised_most"]),
        "SFT lowered most " + ", ".join(f"{dec(i)} {v:+.2f}" for i, v in s["lowered_most"]),
    ]
    return "\n".join(lines)


def format_example(path, index: int, top: int = 5, tokenizer_path: str | None = None) -> str:
    r = CacheReader(path)
    if not 0 <= index < len(r):
        raise ValueError(f"--example {index}: the cache holds {len(r)} sequences (0 to {len(r) - 1})")
    dec = _decoder(r.manifest, tokenizer_path)
    for i, seq in enumerate(r.iter_sequences()):  # noqa: B007 (seq is used after the loop)
        if i == index:
            break
    else:
        raise ValueError(f"--example {index}: the cache holds {len(r)} sequences")
    lines = [
        f"example id {seq.example_id}: {len(seq.tokens)} tokens, {int(seq.loss_mask.sum())} supervised",
        "pos  token -> next   | most probable support ids under p_ft: p_ft (delta = log p_ft - log p_base)",
    ]
    row = 0
    for t in range(len(seq.tokens)):
        nxt = dec(seq.tokens[t + 1]) if t + 1 < len(seq.tokens) else ""
        line = f"{t:4d} {dec(seq.tokens[t]):>12} -> {nxt:<12}"
        if seq.loss_mask[t]:
            order = seq.logp_ft[row].argsort(descending=True)[: min(top, int(seq.valid[row].sum()))]
            cands = [
                f"{dec(seq.support_ids[row, j])} {seq.logp_ft[row, j].exp():.3f} ({seq.delta[row, j]:+.2f})"
                for j in order.tolist()
            ]
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
    ax[0].set(title="probability mass of pi_T on the support", xlabel="mass", ylabel="positions")
    ax[1].hist(np.clip(s["_delta"], -10, 10), bins=80)
    ax[1].set(title="delta = log p_ft - log p_base on the support", xlabel="nats", yscale="log")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
