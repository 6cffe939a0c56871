"""Cache build time divided by the bare forward passes of the same checkpoints on the same data.

    python -m benchmarks.cache_build [--workdir runs/bench-build]

"Bare forward": each checkpoint's plain Hugging Face forward (full logits) over the
same length-sorted batches, no_grad, models already loaded. "Build": the whole
`build_cache` call (hashing, tokenising, three model loads, extraction, zarr writes,
commit, manifest), and its compute phases alone. Two worlds: the demo's (vocabulary
662) and synthetic ones at vocabulary 32000 (hidden 256 and 1024). Beside wall time,
process CPU time (robust to other jobs on a shared machine; with OMP_NUM_THREADS=1 the
two agree on an idle one).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from benchmarks import synth_vocab
from deltakd.cache.build.builder import CacheBuildConfig, build_cache, length_sorted_batches, pad_batch, plan_shards  # noqa: E402
from deltakd.cache.build.forward import load_model, load_tokenizer  # noqa: E402
from deltakd.cache.format import schema  # noqa: E402
from deltakd.cache.format.records import read_records  # noqa: E402
from deltakd.runtime import dist  # noqa: E402


@torch.no_grad()
def bare_forward_seconds(paths: dict, cfg: CacheBuildConfig) -> tuple[float, int]:
    """(seconds, tokens × models) of each checkpoint's plain forward (full logits) over the build's own
    batches on `cfg.device`: the figure a cache build is compared with. Shared by real_pair and gpu_check."""
    wall, _, tokens = bare_forward_times(paths, cfg)
    return wall, tokens


@torch.no_grad()
def bare_forward_times(paths: dict, cfg: CacheBuildConfig) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds, tokens × models) of the bare forwards (see bare_forward_seconds)."""
    dev = dist.resolve_device(cfg.device)
    tok = load_tokenizer(paths["teacher_ft"])
    plan = plan_shards(read_records(cfg.data), tok, cfg.max_length, cfg.shard_tokens)
    total, cpu, tokens = 0.0, 0.0, 0
    for role in ("teacher_ft", "teacher_base", "student_base"):
        model = load_model(paths[role], dev, cfg.model_dtype)
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        for seqs in plan.shards:
            for batch in length_sorted_batches(seqs, cfg.batch_size):
                ids, att, _ = pad_batch(seqs, batch, tok.pad_token_id or 0, dev)
                model(input_ids=ids, attention_mask=att).logits.float().sum().item()
                tokens += int(att.sum())
        _sync(dev)
        total, cpu = total + time.perf_counter() - t0, cpu + time.process_time() - c0
        del model
    return total, cpu, tokens


@torch.no_grad()
def least_row_work_seconds(vocab: int, repeats: int = 3) -> float:
    """Seconds per row of what the default union build's stored bytes need at the least, on a CPU.

    Two kinds of pass over (row, id) that no exact build of the default cache avoids:
    - one uniform draw per entry: the tail samples are the top priorities over every id, and the
      stored ids depend on the generator's stream in row-major order (rows that draw nothing
      consume it too);
    - six exp-and-sum passes: the three models' log-normalisers and the exact π* tail at each of
      the three alphas (a log of a sum of exps over the ids outside the support).
    Each is timed with the builder's own cheapest call for it (rows.logsumexp_rows with the row
    maxima given, one float64 uniform_ as rows.exponential_exact draws it), on a row block of the
    builder's size; best of `repeats`. The top-k selections, the shift, the gathers and the writes
    come on top: this is a floor, not an estimate."""
    from deltakd.cache.build.rows import block_rows, logsumexp_rows

    R = block_rows(1 << 20, vocab, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(R, vocab, generator=gen)
    mx, buf, draws = x.amax(1), torch.empty_like(x), torch.empty(R, vocab, dtype=torch.float64)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(6):
            logsumexp_rows(x, mx, buf)
        draws.uniform_(generator=gen)
        best = min(best, time.perf_counter() - t0)
    return best / R


def _sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(name: str, paths: dict, out: Path, **kw) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cfg = CacheBuildConfig(
        teacher_ft=paths["teacher_ft"],
        teacher_base=paths["teacher_base"],
        student_base=paths["student_base"],
        data=paths["data"],
        out=str(out),
        **kw,
    )
    bare, bare_cpu, _ = bare_forward_times(paths, cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    m = build_cache(cfg)
    build, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    phases = sum(p["seconds"] for p in m["summary"]["phases"].values())
    # The least the build can cost here: the bare forwards plus the row work the stored bytes need.
    least = least_row_work_seconds(m["vocab_size"]) * m["totals"]["n_supervised"]
    return {
        "world": name,
        "vocab": m["vocab_size"],
        "tokens": m["totals"]["n_tokens"],
        "supervised": m["totals"]["n_supervised"],
        "bare_forward_s": bare,
        "build_s": build,
        "build_phases_s": phases,
        "ratio_build": build / bare,
        "ratio_phases": phases / bare,
        "least_row_work_s": least,
        "ratio_least": (bare + least) / bare,
        "bare_forward_cpu_s": bare_cpu,
        "build_cpu_s": build_cpu,
        "ratio_build_cpu": build_cpu / bare_cpu,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/bench-build")
    ap.add_argument(
        "--top-k",
        type=int,
        default=CacheBuildConfig.top_k,
        help="ids per distribution in the union (default: `cache build`'s own; the first figures of "
        "benchmarks/README.md's cache build table were taken with 64)",
    )
    ap.add_argument(
        "--tail-proposal",
        default=CacheBuildConfig.tail_proposal,
        choices=("auto", *schema.TAIL_PROPOSALS),
        help="where the tail samples are drawn from (default: `cache build`'s own, auto: the mixture here, "
        "where every world has a student base; the figures before it were taken with teacher)",
    )
    a = ap.parse_args()
    work = Path(a.workdir)
    from deltakd.demo.pipeline import DemoConfig, assets

    demo = assets(DemoConfig(workdir=str(work / "demo")), work / "demo")
    demo["data"] = demo["train"]
    ids = dict(top_k=a.top_k, tail_proposal=a.tail_proposal)
    rows = [
        measure(
            "demo (V=662)",
            demo,
            work / "cache-demo",
            max_length=128,
            batch_size=32,
            shard_tokens=32768,
            **ids,
        ),
        measure(
            "synthetic (V=32000)",
            synth_vocab.make(work / "synth"),
            work / "cache-synth",
            max_length=256,
            batch_size=8,
            shard_tokens=65536,
            **ids,
        ),
        # Hidden 1024: the output projection weighs as in real models, relative to the extraction.
        measure(
            "synth wide (V=32000,H=1024)",
            synth_vocab.make(work / "synth-wide", n_records=64, teacher=(1024, 2), student=(512, 2)),
            work / "cache-synth-wide",
            max_length=256,
            batch_size=8,
            shard_tokens=65536,
            **ids,
        ),
    ]
    print(
        f"\n{'world':<30}{'tokens':>8}{'bare fwd s':>12}{'build s':>10}{'phases s':>10}"
        f"{'build/bare':>12}{'phases/bare':>13}{'cpu build/bare':>16}{'least/bare':>12}"
    )
    for r in rows:
        print(
            f"{r['world']:<30}{r['tokens']:>8}{r['bare_forward_s']:12.2f}{r['build_s']:10.2f}{r['build_phases_s']:10.2f}"
            f"{r['ratio_build']:12.2f}{r['ratio_phases']:13.2f}{r['ratio_build_cpu']:16.2f}{r['ratio_least']:12.2f}"
        )
    print(
        json.dumps(
            {
                "benchmark": "cache_build",
                "machine": platform.machine(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "top_k": a.top_k,
                "tail_proposal": a.tail_proposal,
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
