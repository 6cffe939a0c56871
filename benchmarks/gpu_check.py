"""Steps of benchmarks/gpu_check.sh that are not a `deltakd` command (task, bare forwards, online KD, loader, report).

    python -m benchmarks.gpu_check task  --root R --size h200|cpu
    python -m benchmarks.gpu_check bare   --root R --device cuda --dtype bfloat16
    python -m benchmarks.gpu_check online --root R --device cuda --steps 10 --batch-tokens 16384
    python -m benchmarks.gpu_check loader --root R --batch-tokens 16384
    python -m benchmarks.gpu_check report --root R

Each step writes R/<step>.json; `report` reads them with the cache manifest and the
runs' metrics.jsonl, prints the table and one JSON line. Models are random Llamas
(nothing can be downloaded on the device machine): costs are real, quality is not.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

# (vocab, teacher hidden/layers/heads, student hidden/layers/heads, records)
SIZES = {"h200": (32000, (2048, 16, 16), (1024, 8, 8), 2048), "cpu": (2000, (64, 2, 4), (32, 2, 4), 48)}
H200_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak (SXM), the MFU denominator


def make_task(root: Path, size: str) -> dict:
    import random

    from benchmarks import synth_vocab
    from deltakd.demo.tiny import save_checkpoint, tiny_llama

    if (root / "task.json").exists():
        return json.loads((root / "task.json").read_text())
    vocab, teacher, student, n = SIZES[size]
    tok = synth_vocab.word_tokenizer(vocab, root / "tok")
    paths = {}
    for name, (h, l, heads), seed in (
        ("teacher_ft", teacher, 1),
        ("teacher_base", teacher, 2),
        ("student_base", student, 3),
    ):
        m = tiny_llama(vocab, hidden=h, layers=l, heads=heads, seed=seed, tokenizer=tok, max_positions=1024)
        # Teachers stored in bf16 (as released checkpoints are); the student stays fp32 (trained).
        paths[name] = save_checkpoint(m.to(torch.bfloat16) if name != "student_base" else m, tok, root / name)
        paths[name + "_params"] = sum(p.numel() for p in m.parameters())
    rng = random.Random(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(n):
            w = lambda k: " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(k))  # noqa: E731
            f.write(json.dumps({"prompt": w(rng.randint(16, 64)), "response": w(rng.randint(48, 192))}) + "\n")
    paths["data"] = str(root / "train.jsonl")
    (root / "task.json").write_text(json.dumps(paths))
    return paths


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare(root: Path, device: str, dtype: str, batch_size: int, max_length: int) -> dict:
    """Plain Hugging Face forwards (full logits) of the three checkpoints over the build's batches."""
    from benchmarks.cache_build import bare_forward_seconds
    from deltakd.cache.build.builder import CacheBuildConfig

    w = json.loads((root / "task.json").read_text())
    cfg = CacheBuildConfig(
        teacher_ft=w["teacher_ft"],
        teacher_base=w["teacher_base"],
        data=w["data"],
        out=str(root / "unused"),
        model_dtype=dtype,
        device=device,
        batch_size=batch_size,
        max_length=max_length,
        shard_tokens=65536,
    )
    total, tokens = bare_forward_seconds(w, cfg)
    return {"bare_forward_s": total, "tokens_x_models": tokens}


def online(root: Path, device: str, steps: int, batch_tokens: int) -> dict:
    """Online Delta-KD P1 with both teachers and the student base in memory (the alternative to the cache)."""
    from transformers import AutoModelForCausalLM

    from deltakd.cache.format.reader import CacheReader
    from deltakd.runtime import dist
    from deltakd.student.data import StreamingLoader
    from deltakd.student.objective import LossSpec, terms_from_logits

    w = json.loads((root / "task.json").read_text())
    dev = dist.resolve_device(device)
    bf16 = dev.type == "cuda"
    student = AutoModelForCausalLM.from_pretrained(w["student_base"], dtype=torch.float32).to(dev).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    frozen = [
        AutoModelForCausalLM.from_pretrained(w[r], dtype=torch.bfloat16 if bf16 else torch.float32).to(dev).eval()
        for r in ("teacher_ft", "teacher_base", "student_base")
    ]
    data = [
        b for _, b in zip(range(steps), StreamingLoader(CacheReader(root / "cache"), batch_tokens=batch_tokens, seed=0))
    ]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, tokens = [], 0
    for b in data:
        b = b.to(dev)
        _sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            lT, lB, lS0 = (
                torch.log_softmax(
                    m(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[b.loss_mask].float(), -1
                )
                for m in frozen
            )
            V = lT.shape[1]
            ninf = torch.full((lT.shape[0],), float("-inf"), device=dev)
            tg = {
                "support_ids": torch.arange(V, device=dev).expand(lT.shape[0], V),
                "logp_ft": lT,
                "logp_base": lB,
                "logp_s0": lS0,
                "tail_ft": ninf,
                "tail_base": ninf,
                "tail_s0": ninf,
                "next_tokens": b.targets["next_tokens"],
            }
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[b.loss_mask].float()
        loss = terms_from_logits(logits, tg, LossSpec(weights={"p1": 1.0}))[0] / b.n_supervised
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
        tokens += b.n_tokens
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    warm = times[2:] if len(times) > 4 else times
    return {"step_s": statistics.median(warm), "tokens_per_s": tokens / sum(times), "peak_mem_mb": peak}


def loader(root: Path, batch_tokens: int, device: str, seconds: float = 10.0) -> dict:
    """One rank's loader as the trainer sets it up on `device` (16-bit targets on a GPU, see student/data.py)."""
    from deltakd.cache.format.reader import CacheReader
    from deltakd.student.data import StreamingLoader

    half = device.startswith("cuda")
    ld = StreamingLoader(
        CacheReader(root / "cache"), batch_tokens=batch_tokens, with_student=True, seed=0, half_targets=half
    )
    tokens, t0 = 0, time.perf_counter()
    for b in ld:
        tokens += b.n_tokens
        if time.perf_counter() - t0 > seconds:
            break
    ld.close()
    return {"loader_tokens_per_s": tokens / (time.perf_counter() - t0)}


def _train_metrics(run: Path) -> dict:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r]
    last = steps[1:] or steps  # the first log window holds start-up (compile, allocator warm-up)
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in last),
        "peak_mem_mb": max(r["peak_mem_mb"] for r in steps),
        "steps": steps[-1]["step"],
    }


def report(root: Path) -> dict:
    w = json.loads((root / "task.json").read_text())
    m = json.loads((root / "cache" / "manifest.json").read_text())
    phases = m["summary"]["phases"] or {}
    build_s = sum(p["seconds"] for p in phases.values())
    build_tok = sum(p["tokens"] for p in phases.values())
    bare_r = json.loads((root / "bare.json").read_text())
    wall = json.loads((root / "build_wall.json").read_text())["seconds"]
    runs = {p: _train_metrics(root / f"train-{p}") for p in ("ddp", "fsdp")}
    onl = json.loads((root / "online.json").read_text())
    ld = json.loads((root / "loader.json").read_text())
    n_params = w["student_base_params"]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    for r in runs.values():
        r["mfu"] = 6 * n_params * r["tokens_per_s"] / H200_BF16_FLOPS if torch.cuda.is_available() else None
    res = {
        "build_tokens_per_s": build_tok / max(build_s, 1e-9),
        "build_phases_over_bare_forwards": build_s / bare_r["bare_forward_s"],
        "build_wall_over_bare_forwards": wall / bare_r["bare_forward_s"],
        "student": runs,
        "online_p1": onl,
        "peak_mem_cached_over_online": (runs["ddp"]["peak_mem_mb"] / onl["peak_mem_mb"])
        if onl["peak_mem_mb"]
        else None,
        "loader_headroom": ld["loader_tokens_per_s"] / max(r["tokens_per_s"] for r in runs.values()),
    }
    print(
        f"\ndevice: {gpu}; teacher {w['teacher_ft_params'] / 1e6:.0f}M params, student {n_params / 1e6:.0f}M, "
        f"{m['totals']['n_tokens']} tokens, k={m['k']}"
    )
    print(
        f"build: {res['build_tokens_per_s']:.0f} tokens/s (3 checkpoints), phases / bare forwards "
        f"{res['build_phases_over_bare_forwards']:.2f}, "
        f"whole command / bare forwards {res['build_wall_over_bare_forwards']:.2f}"
    )
    for p, r in runs.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"student {p:5s} tokens/s {r['tokens_per_s']:10.0f}   MFU {mfu:>6}   peak GPU MB {r['peak_mem_mb']:8.0f}")
    print(f"online P1 (teachers in memory): tokens/s {onl['tokens_per_s']:.0f}, peak GPU MB {onl['peak_mem_mb']}")
    if res["peak_mem_cached_over_online"] is not None:
        print(f"peak GPU memory cached / online: {res['peak_mem_cached_over_online']:.3f}")
    print(f"loader headroom (loader tokens/s / student tokens/s): {res['loader_headroom']:.1f}")
    print(
        json.dumps(
            {"benchmark": "gpu_check", "device": gpu, "torch": torch.__version__, "machine": platform.machine(), **res}
        )
    )
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["task", "bare", "online", "loader", "report"])
    ap.add_argument("--root", required=True)
    ap.add_argument("--size", choices=list(SIZES), default="h200")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    a = ap.parse_args()
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    if a.step == "task":
        out = make_task(root, a.size)
    elif a.step == "bare":
        out = bare(root, a.device, a.dtype, a.batch_size, a.max_length)
    elif a.step == "online":
        out = online(root, a.device, a.steps, a.batch_tokens)
    elif a.step == "loader":
        out = loader(root, a.batch_tokens, a.device)
    else:
        report(root)
        return
    (root / f"{a.step}.json").write_text(json.dumps(out))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
