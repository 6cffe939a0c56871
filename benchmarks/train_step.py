"""Student step time and peak memory: Delta-KD from the cache vs plain SFT vs online KD.

    python -m benchmarks.train_step [--workdir runs/bench-train] [--steps 12]

Synthetic world at vocabulary 32000 (benchmarks/synth_vocab.py): teachers 256x4,
student 128x2, cache k = 64 float16 with student-base arrays. Every case runs in its
own process (peak RSS is a per-process high-water mark) on the same batches:
  sft_hf      plain SFT: Hugging Face forward with labels (full logits), AdamW
  sft_cache   SFT through deltakd's chunked objective
  p1_cache    Delta-KD P1 from the cache (deltakd's train_step)
  p1_online   Delta-KD P1 with teacher_ft, teacher_base and the student base in
              memory, full-vocabulary logits of all four models every step
Also: the loader's throughput against the trainer's consumption, and the peak
memory of the chunked loss against the naive full-logits loss alone.

Data parallel on CPU (gloo, 2 ranks under torchrun, same global batches):
  ddp2 / fsdp2  deltakd's train_step with --parallel ddp / fsdp: median step time, and
                peak RSS and its growth over the steps, maximum over the ranks
  loader per rank at 1, 2, 4 ranks (and 2 ranks accumulating 2): rank 0 of N streams
                3 epochs; it decodes only its ~1/N block of each shard (student/data.py,
                lanes); tokens/s it delivers, its wall and CPU time against 1 rank, and the
                share of the entry arrays' chunks it decoded; and 1 rank with the reader's
                checks off (what verifying every read costs; zarr's crc32c stays on)

    python -m benchmarks.train_step --only parallel   # just the data-parallel rows (~1 min)
    python -m benchmarks.train_step --only loader     # just the loader per rank, and its bound
                                                      # (loader_bound: decode and collate alone)

Peers (optional: pip install -e ".[peers]"; benchmarks/peers.py says exactly what each one calls), plain KD
(forward KL) on the same batches. Step times: all five in one process, steps interleaved batch by batch
(median of the warm steps; load from other processes falls on all alike). Memory: each case alone in its
own process that first imports torch, transformers, deltakd, trl and liger, so that import costs are equal
and excluded from "working MB" (peak RSS minus the RSS after imports and batches: the models, optimizer
state, activations and loss temporaries):
  kd_cache      deltakd's train_step from the cache (top-k support + tail bucket), no teacher in memory
  p1_cache      the same for Delta-KD P1 (which the peers cannot compute: it needs three models)
  kd_online     teacher_ft in memory, deltakd's fused loss on full-vocabulary targets (online_ref.py)
  trl_online    teacher_ft in memory, TRL DistillationTrainer's chunked divergence (beta 0)
  liger_online  teacher_ft in memory, Liger's LigerFusedLinearJSDLoss (beta 0, compiled=False)

    OMP_NUM_THREADS=1 python -m benchmarks.train_step --only peers --steps 6   # just the peer rows (~14 min)

LoRA (needs peft: pip install -e ".[lora]"), Delta-KD P1 from the same cache and batches, each case alone in
its own process: the synthetic student (128 x 2) and a wider one made here (512 x 8, same tokenizer), each
trained in full and as a rank-16 all-linear LoRA adapter (student/lora.py). Step time, tokens/s, peak RSS,
RSS growth over the steps, parameters that train, and the memory training holds counted from its tensors
(weights, gradients, AdamW state, what autograd saves for the backward of the largest micro-batch: what an
accelerator holds; CPU RSS also carries the allocator's caching):

    python -m benchmarks.train_step --only lora
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.synth_vocab import batches, rss_mb, setup

ROOT = Path(__file__).resolve().parents[1]  # subprocesses run `-m benchmarks.train_step` from here


def run_case(case: str, work: Path, steps: int, batch_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    from deltakd.student.objective import LossSpec, chunked_loss, terms_from_logits
    from deltakd.student.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    paths, cache = setup(work)
    data = batches(cache, steps, batch_tokens)
    times = []
    if case in ("sft_cache", "p1_cache"):
        tr = Trainer(
            TrainConfig(
                cache=str(cache),
                student=paths["student_base"],
                out=str(work / case),
                loss=case.split("_")[0],
                max_steps=steps,
                batch_tokens=batch_tokens,
                eval_percent=0,
            )
        )
        base = rss_mb()
        for b in data:
            t0 = time.perf_counter()
            tr.train_step([b])
            times.append(time.perf_counter() - t0)
        tokens = sum(int(b.attention_mask.sum()) for b in data)
    elif case == "chunked_loss" or case == "naive_loss":
        V, H, N = 32000, 512, 4096
        g = torch.Generator().manual_seed(0)
        # Targets built without any (N, V) tensor, so the baseline high-water mark stays low.
        ids = torch.stack([torch.randperm(V, generator=g)[:64] for _ in range(N)])
        lp = torch.log_softmax(torch.randn(N, 65, generator=g) * 2, -1)
        tg = {
            "support_ids": ids,
            "logp_ft": lp[:, :64],
            "logp_base": lp[:, :64] - torch.randn(N, 64, generator=g) * 0.1,
            "logp_s0": lp[:, :64] - 0.1,
            "tail_ft": lp[:, 64],
            "tail_base": lp[:, 64] - 0.2,
            "tail_s0": lp[:, 64] - 0.1,
            "next_tokens": ids[:, 0],
        }
        h = torch.randn(N, H, requires_grad=True)
        head = torch.nn.Linear(H, V, bias=False)
        spec = LossSpec(weights={"p1": 1.0, "sft": 0.1}, chunk_rows=1024)
        base = rss_mb()
        t0 = time.perf_counter()
        if case == "chunked_loss":
            out = chunked_loss(h, head, tg, spec, V)[0]
        else:
            out = terms_from_logits(torch.nn.functional.linear(h, head.weight).float(), tg, spec).sum()
        out.backward()
        times.append(time.perf_counter() - t0)
        tokens = N
    else:
        student = AutoModelForCausalLM.from_pretrained(paths["student_base"], dtype=torch.float32).train()
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        frozen = []
        if case == "p1_online":
            frozen = [
                AutoModelForCausalLM.from_pretrained(paths[r], dtype=torch.float32).eval()
                for r in ("teacher_ft", "teacher_base", "student_base")
            ]
        V = student.config.vocab_size
        base = rss_mb()
        for b in data:
            t0 = time.perf_counter()
            if case == "sft_hf":
                labels = torch.full_like(b.input_ids, -100)
                labels[:, 1:] = torch.where(b.loss_mask[:, :-1], b.input_ids[:, 1:], -100)
                loss = student(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels).loss
            else:
                with torch.no_grad():
                    lT, lB, lS0 = (
                        torch.log_softmax(
                            m(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[b.loss_mask].float(), -1
                        )
                        for m in frozen
                    )
                    ids = torch.arange(V).expand(lT.shape[0], V)  # full vocabulary: k = V
                    ninf = torch.full((lT.shape[0],), float("-inf"))
                    tg = {
                        "support_ids": ids,
                        "logp_ft": lT,
                        "logp_base": lB,
                        "logp_s0": lS0,
                        "tail_ft": ninf,
                        "tail_base": ninf,
                        "tail_s0": ninf,
                        "next_tokens": b.targets["next_tokens"],
                    }
                logits = student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[b.loss_mask].float()
                loss = terms_from_logits(logits, tg, LossSpec(weights={"p1": 1.0}))[0] / b.n_supervised
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        tokens = sum(int(b.attention_mask.sum()) for b in data)
    warm = times[2:] if len(times) > 4 else times
    return {
        "case": case,
        "step_s": statistics.median(warm),
        "tokens_per_s": tokens / sum(times),
        "peak_rss_mb": rss_mb(),
        "rss_before_steps_mb": base,
        "rss_growth_mb": rss_mb() - base,
    }


def run_dist_case(mode: str, work: Path, steps: int, batch_tokens: int) -> dict | None:
    """One rank of a 2-rank gloo run of deltakd's train_step under --parallel `mode`."""
    from deltakd.runtime import dist
    from deltakd.student.data import StreamingLoader
    from deltakd.student.trainer import TrainConfig, Trainer

    paths, cache = setup(work)
    tr = Trainer(
        TrainConfig(
            cache=str(cache),
            student=paths["student_base"],
            out=str(work / f"dist-{mode}"),
            loss="p1",
            max_steps=steps,
            batch_tokens=batch_tokens,
            eval_percent=0,
            parallel=mode,
        )
    )
    loader = StreamingLoader(tr.reader, **tr.train_loader_kw)
    data = [b for _, b in zip(range(steps), loader)]
    loader.close()
    base = rss_mb()
    times = []
    for b in data:
        t0 = time.perf_counter()
        tr.train_step([b])
        times.append(time.perf_counter() - t0)
    peak = dist.all_max(torch.tensor([rss_mb(), rss_mb() - base], dtype=torch.float64))
    tokens = dist.all_sum(torch.tensor([float(sum(b.n_tokens for b in data))]))
    if tr.rank != 0:
        return None
    warm = times[2:] if len(times) > 4 else times
    return {
        "case": f"{mode}2",
        "step_s": statistics.median(warm),
        "tokens_per_s": float(tokens) / sum(times),
        "peak_rss_mb": float(peak[0]),
        "rss_growth_mb": float(peak[1]),
        "ranks": tr.world,
    }


def decoded_share(reader, fn) -> float:
    """Share of the entry arrays' chunks (support_ids, logp_*) that zarr fetched, hence decoded, while fn ran."""
    import zarr

    seen, orig = set(), zarr.storage.LocalStore.get

    async def get(self, key, *a, **k):
        if key.split("/")[0] in ("support_ids", "logp_ft", "logp_base", "logp_s0") and "/c/" in key:
            seen.add((str(self.root), key))
        return await orig(self, key, *a, **k)

    zarr.storage.LocalStore.get = get
    try:
        fn()
    finally:
        zarr.storage.LocalStore.get = orig
    total = 0
    for sub in ("shards", "student"):
        for g in (reader.root / sub).iterdir():
            for arr in ("support_ids", "logp_ft", "logp_base", "logp_s0"):
                total += len(list((g / arr / "c").glob("*"))) if (g / arr / "c").is_dir() else 0
    return len(seen) / max(total, 1)


def loader_per_rank(
    work: Path,
    batch_tokens: int,
    ranks=((1, 1), (2, 1), (4, 1), (2, 2), (1, 1, False), (1, 1, True, True)),
    repeats: int = 3,
) -> list[dict]:
    """Rank 0 of N (accumulating `accum`) streams three epochs; best of `repeats`.

    One row reads with the reader's checks off (listed chunks, dtypes, counts, finiteness;
    zarr checks each chunk's crc32c either way): what the checks cost. The last carries the 16-bit
    log-probs as stored (half_targets, the trainer's choice on a GPU, where Batch.to widens them)."""
    from deltakd.cache.format.reader import CacheReader
    from deltakd.student.data import StreamingLoader

    _, cache = setup(work)
    rows = []
    for n, accum, *opts in ranks:
        verified, half = (*opts, *(True, False)[len(opts) :])  # defaults: checks on, float32 targets
        reader = CacheReader(cache, verify=verified)
        kw = dict(batch_tokens=batch_tokens, with_student=True, seed=0, rank=0, world=n, accum=accum, half_targets=half)
        best = cpu = None
        for _ in range(repeats):
            # CPU seconds of the process (all loader threads): the loader's work, much less
            # disturbed than wall time by other jobs on a shared machine.
            t0, c0, tokens = time.perf_counter(), time.process_time(), 0
            for b in StreamingLoader(reader, epochs=3, **kw):
                tokens += b.n_tokens
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            best, cpu = (dt, dc) if best is None else (min(best, dt), min(cpu, dc))
        share = decoded_share(reader, lambda: list(StreamingLoader(reader, epochs=1, **kw)))  # noqa: B023 (called here)
        rows.append(
            {
                "ranks": n,
                "accum": accum,
                "verified": verified,
                "half_targets": half,
                "rank0_tokens": tokens,
                "epoch_s": best,
                "cpu_s": cpu,
                "tokens_per_s_per_rank": tokens / best,
                "entry_chunks_decoded": share,
            }
        )
    for r in rows:
        r["epoch_s_vs_1_rank"] = r["epoch_s"] / rows[0]["epoch_s"]
        r["cpu_s_vs_1_rank"] = r["cpu_s"] / rows[0]["cpu_s"]
    return rows


def parallel_rows(work: Path, steps: int, batch_tokens: int) -> dict:
    env = {**os.environ, "DELTAKD_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    out = {}
    for mode in ("ddp", "fsdp"):
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_port",
                str(29700 + len(out)),
                "-m",
                "benchmarks.train_step",
                "--workdir",
                str(work),
                "--steps",
                str(steps),
                "--batch-tokens",
                str(batch_tokens),
                "--case",
                f"dist_{mode}",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
        )
        if res.returncode != 0:
            raise SystemExit(f"case {mode}2 failed:\n{res.stderr[-3000:]}")
        out[f"{mode}2"] = json.loads([l for l in res.stdout.splitlines() if l.startswith("{")][-1])
    return out


def print_parallel(par: dict, loader_rows: list[dict]) -> dict:
    print(f"\n{'2 ranks, CPU gloo':<18}{'step s':>9}{'tokens/s':>11}{'peak RSS MB':>13}{'growth MB':>11}")
    for r in par.values():
        print(
            f"{r['case']:<18}{r['step_s']:9.3f}{r['tokens_per_s']:11.0f}{r['peak_rss_mb']:13.0f}{r['rss_growth_mb']:11.0f}"
        )
    print_loader(loader_rows)
    return {
        "fsdp2/ddp2 step": par["fsdp2"]["step_s"] / par["ddp2"]["step_s"],
        "fsdp2/ddp2 peak RSS": par["fsdp2"]["peak_rss_mb"] / par["ddp2"]["peak_rss_mb"],
        "fsdp2/ddp2 RSS growth": par["fsdp2"]["rss_growth_mb"] / max(par["ddp2"]["rss_growth_mb"], 1e-9),
    }


def loader_bound(work: Path, batch_tokens: int, repeats: int = 3) -> dict:
    """What one rank's loader cannot beat on this machine: the two unavoidable parts of its work, each alone.

    decode   zstd-decompressing every chunk of the arrays a batch reads (numcodecs, which zarr's zstd codec
             calls; the chunk files already read into memory, crc32c not checked), in 1 thread and in one
             thread per core (it releases the GIL);
    collate  building every batch of one epoch (student/data.py collate: ragged -> padded, float16 ->
             float32) from a shard already decoded, in 1 thread.
    Each token needs both, so with perfect parallelism over c cores a loader delivers at most
    c / (1/decode + 1/collate) tokens/s (best of `repeats`; one shard, as the loader rows)."""
    from concurrent.futures import ThreadPoolExecutor

    import numcodecs

    from deltakd.cache.format import schema
    from deltakd.cache.format.reader import CacheReader
    from deltakd.student.data import StreamingLoader, collate

    _, cache = setup(work)
    reader = CacheReader(cache)
    name = reader.shard_names[0]
    loader = StreamingLoader(reader, batch_tokens=batch_tokens, with_student=True, seed=0)
    plan, mine, shard, at = loader._read((0, 0, name, 0), 0, 0)
    tokens = int(shard.arrays["seq_offsets"][-1])
    groups = (reader.root / schema.TEACHER_DIR / name, reader.root / schema.STUDENT_DIR / name)
    blobs = [
        f.read_bytes()[:-4]  # the crc32c codec's 4 trailing bytes
        for g in groups
        for arr in sorted(p for p in g.iterdir() if p.is_dir())
        for f in sorted((arr / "c").rglob("*"))
        if f.is_file()
    ]
    zstd, cores = numcodecs.Zstd(), os.cpu_count() or 1

    def best(fn) -> float:
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return min(out)

    one = best(lambda: [zstd.decode(b) for b in blobs])
    with ThreadPoolExecutor(cores) as ex:
        many = best(lambda: list(ex.map(zstd.decode, blobs)))
    coll = best(lambda: [collate(shard, at[plan[b]], 0, True) for b in mine])
    decode_tps, collate_tps = tokens / one, tokens / coll
    return {
        "tokens": tokens,
        "cores": cores,
        "decode_1_thread_tokens_per_s": decode_tps,
        "decode_all_cores_tokens_per_s": tokens / many,
        "collate_1_thread_tokens_per_s": collate_tps,
        "bound_tokens_per_s": cores / (1 / decode_tps + 1 / collate_tps),
    }


def print_bound(b: dict) -> None:
    print(
        f"\nwhat one rank cannot beat here ({b['cores']} cores): zstd decode {b['decode_1_thread_tokens_per_s']:.0f} "
        f"tok/s in 1 thread, {b['decode_all_cores_tokens_per_s']:.0f} in {b['cores']}; collate "
        f"{b['collate_1_thread_tokens_per_s']:.0f} tok/s in 1 thread; both, perfectly parallel: "
        f"{b['bound_tokens_per_s']:.0f} tok/s"
    )


def print_loader(loader_rows: list[dict]) -> None:
    print(
        f"\n{'loader ranks x accum':<22}{'rank-0 tokens':>14}{'3 epochs s':>11}{'tok/s per rank':>16}"
        f"{'time vs 1':>11}{'CPU s vs 1':>12}{'chunks decoded':>16}"
    )
    for r in loader_rows:
        label = f"{r['ranks']} x {r['accum']}" + ("" if r["verified"] else ", checks off")
        label += ", 16-bit" if r.get("half_targets") else ""
        print(
            f"{label:<22}{r['rank0_tokens']:>14}{r['epoch_s']:11.3f}"
            f"{r['tokens_per_s_per_rank']:16.0f}{r['epoch_s_vs_1_rank']:11.2f}{r['cpu_s_vs_1_rank']:12.2f}"
            f"{r['entry_chunks_decoded']:16.2f}"
        )


def loader_throughput(work: Path, batch_tokens: int, seconds: float = 10.0) -> float:
    from deltakd.cache.format.reader import CacheReader
    from deltakd.student.data import StreamingLoader

    _, cache = setup(work)
    loader = StreamingLoader(CacheReader(cache), batch_tokens=batch_tokens, with_student=True, seed=0)
    tokens, t0 = 0, time.perf_counter()
    for b in loader:
        tokens += int(b.attention_mask.sum())
        if time.perf_counter() - t0 > seconds:
            break
    loader.close()
    return tokens / (time.perf_counter() - t0)


def peer_rows(work: Path, steps: int, batch_tokens: int) -> dict:
    """deltakd cached/online KD and the peers (benchmarks/peers.py) on the same batches.

    Time is measured interleaved in one process, memory alone per process."""
    from benchmarks import peers

    def case_json(case: str, n_steps: int) -> dict:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.train_step",
                "--workdir",
                str(work),
                "--steps",
                str(n_steps),
                "--batch-tokens",
                str(batch_tokens),
                "--case",
                case,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if out.returncode != 0:
            raise SystemExit(f"case {case} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    timing = case_json("peers_interleaved", steps)
    # Memory: each contender alone in a process; its peak is reached by the second step (AdamW state exists
    # from the first), so three steps suffice.
    rows = {c: {"case": c} | timing[c] | case_json(f"peer_{c}", min(steps, 3)) for c in peers.CASES}
    ref = rows["kd_cache"]
    print(
        f"\n{'KD, same batches':<14}{'step s':>8}{'best s':>8}{'tokens/s':>9}{'peak RSS MB':>12}{'working MB':>11}"
        f"{'step/ours':>10}{'peak/ours':>10}{'work/ours':>10}{'1st loss':>9}"
    )
    for r in rows.values():
        r["step_vs_kd_cache"] = r["step_s"] / ref["step_s"]
        r["peak_vs_kd_cache"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
        r["working_vs_kd_cache"] = r["working_mb"] / ref["working_mb"]
        print(
            f"{r['case']:<14}{r['step_s']:8.2f}{r['step_best_s']:8.2f}{r['tokens_per_s']:9.0f}{r['peak_rss_mb']:12.0f}"
            f"{r['working_mb']:11.0f}{r['step_vs_kd_cache']:10.2f}{r['peak_vs_kd_cache']:10.2f}"
            f"{r['working_vs_kd_cache']:10.2f}{r['first_loss']:9.4f}"
        )
    # The three online forward-KL losses are one objective on one student and teacher: their first-step
    # values must agree (tests/test_benchmarks.py checks values and gradients on smaller shapes).
    online = [rows[c]["first_loss"] for c in ("kd_online", "trl_online", "liger_online")]
    spread = (max(online) - min(online)) / abs(statistics.mean(online))
    last = [rows[c]["last_loss"] for c in ("kd_online", "trl_online", "liger_online")]
    last_spread = (max(last) - min(last)) / abs(statistics.mean(last))
    print(
        f"forward KL of the online rows: relative spread {spread:.1e} at the first step (one objective), "
        f"{last_spread:.1e} after {steps - 1} updates (one gradient); "
        "kd_cache trains the cache's objective (support + tail bucket or samples)"
    )
    if spread > 1e-4:
        raise SystemExit(f"the online KD losses disagree ({online}): the contenders do not compute one objective")
    return {
        "cases": rows,
        "online_first_loss_rel_spread": spread,
        "online_last_loss_rel_spread": last_spread,
        "versions": rows["trl_online"]["versions"],
    }


LORA_CASES = ("full_128x2", "lora_128x2", "full_512x8", "lora_512x8")


def lora_student(work: Path, paths: dict) -> str:
    """A wider student with the synthetic tokenizer (its own random weights)."""
    from transformers import AutoTokenizer

    from deltakd.demo.tiny import save_checkpoint, tiny_llama

    out = work / "student_512x8"
    if not (out / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(paths["student_base"])
        save_checkpoint(tiny_llama(len(tok), hidden=512, layers=8, heads=8, seed=7, tokenizer=tok), tok, out)
    return str(out)


def lora_trainer(work: Path, case: str, steps: int, batch_tokens: int):
    from deltakd.student.trainer import TrainConfig, Trainer

    paths, cache = setup(work)
    kind, size = case.split("_")
    student = paths["student_base"] if size == "128x2" else lora_student(work, paths)
    lora = {"lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.0} if kind == "lora" else {}
    cfg = dict(loss="p1", max_steps=steps, batch_tokens=batch_tokens, eval_percent=0)
    return Trainer(TrainConfig(cache=str(cache), student=student, out=str(work / f"lora-{case}"), **cfg, **lora))


def run_lora_timing(size: str, work: Path, steps: int, batch_tokens: int) -> dict:
    """Step times of the full student and its LoRA twin in one process, steps interleaved batch by batch, so that
    the load of other jobs falls on both alike (median of the warm steps)."""
    torch.manual_seed(0)
    trainers = {k: lora_trainer(work, f"{k}_{size}", steps, batch_tokens) for k in ("full", "lora")}
    times = {k: [] for k in trainers}
    data = batches(setup(work)[1], steps, batch_tokens)
    for b in data:
        for k, tr in trainers.items():
            t0 = time.perf_counter()
            tr.train_step([b])
            times[k].append(time.perf_counter() - t0)
    tokens = sum(int(b.attention_mask.sum()) for b in data)
    return {
        k: {"step_s": statistics.median(t[2:] if len(t) > 4 else t), "tokens_per_s": tokens / sum(t)}
        for k, t in times.items()
    }


def run_lora_case(case: str, work: Path, steps: int, batch_tokens: int) -> dict:
    """One LoRA-benchmark case alone in this process (its memory): deltakd's train_step on the same batches."""
    torch.manual_seed(0)
    if case.startswith("time_"):
        return run_lora_timing(case.removeprefix("time_"), work, steps, batch_tokens)
    paths, cache = setup(work)
    tr = lora_trainer(work, case, steps, batch_tokens)
    data = batches(cache, steps, batch_tokens)
    base = rss_mb()
    times = []
    for b in data:
        t0 = time.perf_counter()
        tr.train_step([b])
        times.append(time.perf_counter() - t0)
    warm = times[2:] if len(times) > 4 else times
    peak, growth = rss_mb(), rss_mb() - base
    return {
        "case": case,
        "step_s_alone": statistics.median(warm),
        "peak_rss_mb": peak,
        "rss_growth_mb": growth,
        "trainable_params": sum(p.numel() for p in tr.params),
        "params": sum(p.numel() for p in tr.model.parameters()),
        **training_memory_mb(tr, max(data, key=lambda b: b.input_ids.numel())),
    }


def training_memory_mb(tr, batch) -> dict:
    """What training holds, counted from the tensors (an accelerator's memory, where RSS is the CPU allocator's):
    weights, gradients, optimizer state, and what autograd saves for the backward of the largest micro-batch."""
    mb = lambda ts: sum(t.numel() * t.element_size() for t in ts) / 2**20  # noqa: E731
    params = list(tr.model.parameters())
    weights = {p.untyped_storage().data_ptr() for p in params}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:  # a saved weight is the weight itself, counted once above
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tr.forward_loss(batch)
    out = {
        "weights_mb": mb(params),
        "grads_mb": mb(p.grad for p in params if p.grad is not None),
        "optimizer_mb": mb(v for st in tr.opt.state.values() for v in st.values() if torch.is_tensor(v)),
        "saved_for_backward_mb": sum(saved.values()) / 2**20,
    }
    return out | {"training_memory_mb": sum(out.values())}


def lora_rows(work: Path, steps: int, batch_tokens: int) -> dict:
    def case_json(case: str, n_steps: int) -> dict:
        cmd = [sys.executable, "-m", "benchmarks.train_step", "--workdir", str(work), "--steps", str(n_steps)]
        cmd += ["--batch-tokens", str(batch_tokens), "--case", f"lora:{case}"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise SystemExit(f"case {case} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    # Memory: each case alone in a process; its peak is reached by the second step (AdamW state exists from the
    # first), so four steps suffice. Step time: interleaved with its twin in one process.
    rows = {case: case_json(case, min(steps, 4)) for case in LORA_CASES}
    for size in ("128x2", "512x8"):
        for kind, timing in case_json(f"time_{size}", steps).items():
            rows[f"{kind}_{size}"] |= timing
    print(
        f"\n{'P1, same batches':<14}{'step s':>9}{'tokens/s':>11}{'peak RSS MB':>13}{'growth MB':>11}{'trained':>12}"
        f"{'weights':>9}{'grads':>7}{'Adam':>7}{'saved':>7}{'total MB':>10}"
    )
    for r in rows.values():
        print(
            f"{r['case']:<14}{r['step_s']:9.3f}{r['tokens_per_s']:11.0f}{r['peak_rss_mb']:13.0f}"
            f"{r['rss_growth_mb']:11.0f}{r['trainable_params']:12,}{r['weights_mb']:9.0f}{r['grads_mb']:7.0f}"
            f"{r['optimizer_mb']:7.0f}{r['saved_for_backward_mb']:7.0f}{r['training_memory_mb']:10.0f}"
        )
    ratios = {}
    for size in ("128x2", "512x8"):
        full, lo = rows[f"full_{size}"], rows[f"lora_{size}"]
        ratios[f"lora/full {size} step"] = lo["step_s"] / full["step_s"]
        ratios[f"lora/full {size} peak RSS"] = lo["peak_rss_mb"] / full["peak_rss_mb"]
        ratios[f"lora/full {size} RSS growth"] = lo["rss_growth_mb"] / max(full["rss_growth_mb"], 1e-9)
        ratios[f"lora/full {size} trained params"] = lo["trainable_params"] / full["trainable_params"]
        ratios[f"lora/full {size} training memory"] = lo["training_memory_mb"] / full["training_memory_mb"]
    for k, v in ratios.items():
        print(f"{k:<34}{v:8.3f}")
    return {"cases": rows, "ratios": ratios}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/bench-train")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument(
        "--only",
        choices=["all", "parallel", "loader", "peers", "lora"],
        default="all",
        help="parallel: only the 2-rank DDP/FSDP rows and the loader per rank; loader: only the loader "
        'per rank; peers: only the TRL/Liger comparison (needs pip install -e ".[peers]"); lora: only LoRA vs full '
        'students (needs pip install -e ".[lora]")',
    )
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = Path(a.workdir)
    if a.case and a.case.startswith("dist_"):
        res = run_dist_case(a.case.removeprefix("dist_"), work, a.steps, a.batch_tokens)
        if res is not None:
            print(json.dumps(res))
        return
    if a.case and a.case.startswith("peer"):
        from benchmarks import peers

        res = (
            peers.run_interleaved_timing(work, a.steps, a.batch_tokens)
            if a.case == "peers_interleaved"
            else peers.run_peer_case(a.case.removeprefix("peer_"), work, a.steps, a.batch_tokens)
        )
        print(json.dumps(res))
        return
    if a.case and a.case.startswith("lora:"):
        print(json.dumps(run_lora_case(a.case.removeprefix("lora:"), work, a.steps, a.batch_tokens)))
        return
    if a.case:
        print(json.dumps(run_case(a.case, work, a.steps, a.batch_tokens)))
        return
    setup(work)
    if a.only == "lora":
        out = lora_rows(work, a.steps, a.batch_tokens)
        meta = {"benchmark": "train_step", "part": "lora", "machine": platform.machine(), "torch": torch.__version__}
        meta |= {"threads": torch.get_num_threads(), "vocab": 32000, "batch_tokens": a.batch_tokens, "steps": a.steps}
        print(json.dumps(meta | out))
        return
    if a.only == "loader":
        loader_rows = loader_per_rank(work, a.batch_tokens)
        print_loader(loader_rows)
        bound = loader_bound(work, a.batch_tokens)
        print_bound(bound)
        print(
            json.dumps(
                {
                    "benchmark": "train_step",
                    "part": "loader",
                    "machine": platform.machine(),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "vocab": 32000,
                    "batch_tokens": a.batch_tokens,
                    "loader_per_rank": loader_rows,
                    "loader_bound": bound,
                }
            )
        )
        return
    if a.only == "peers":
        from benchmarks import peers

        try:
            peers.require()
        except ImportError as e:
            raise SystemExit(str(e)) from None
        out = peer_rows(work, a.steps, a.batch_tokens)
        print(
            json.dumps(
                {
                    "benchmark": "train_step",
                    "part": "peers",
                    "machine": platform.machine(),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "vocab": 32000,
                    "batch_tokens": a.batch_tokens,
                    "steps": a.steps,
                }
                | out
            )
        )
        return
    par = parallel_rows(work, a.steps, a.batch_tokens)
    loader_rows = loader_per_rank(work, a.batch_tokens)
    if a.only == "parallel":
        ratios = print_parallel(par, loader_rows)
        for k, v in ratios.items():
            print(f"{k:<34}{v:8.3f}")
        print(
            json.dumps(
                {
                    "benchmark": "train_step",
                    "part": "parallel",
                    "machine": platform.machine(),
                    "torch": torch.__version__,
                    "threads_per_rank": 1,
                    "vocab": 32000,
                    "batch_tokens": a.batch_tokens,
                    "cases": par,
                    "loader_per_rank": loader_rows,
                    "ratios": ratios,
                }
            )
        )
        return
    res = {}
    for case in ("sft_hf", "sft_cache", "p1_cache", "p1_online", "chunked_loss", "naive_loss"):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.train_step",
                "--workdir",
                str(work),
                "--steps",
                str(a.steps),
                "--batch-tokens",
                str(a.batch_tokens),
                "--case",
                case,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if out.returncode != 0:
            raise SystemExit(f"case {case} failed:\n{out.stderr[-3000:]}")
        res[case] = json.loads(out.stdout.strip().splitlines()[-1])
    try:
        from benchmarks import peers

        peers.require()
        peer = peer_rows(work, a.steps, a.batch_tokens)
    except ImportError as e:  # optional: said, not silently dropped
        peer = {"skipped": str(e)}
        print(f"\npeer rows skipped: {e}")
    loader_tps = loader_throughput(work, a.batch_tokens)
    print(f"\n{'case':<14}{'step s':>9}{'tokens/s':>11}{'peak RSS MB':>13}{'growth MB':>11}")
    for r in res.values():
        print(
            f"{r['case']:<14}{r['step_s']:9.3f}{r['tokens_per_s']:11.0f}{r['peak_rss_mb']:13.0f}{r['rss_growth_mb']:11.0f}"
        )
    p1, sft, onl = res["p1_cache"], res["sft_hf"], res["p1_online"]
    ratios = {
        "p1_cache/sft_hf step": p1["step_s"] / sft["step_s"],
        "p1_cache/sft_hf peak RSS": p1["peak_rss_mb"] / sft["peak_rss_mb"],
        "p1_cache/sft_hf RSS growth": p1["rss_growth_mb"] / max(sft["rss_growth_mb"], 1e-9),
        "p1_cache/p1_online step": p1["step_s"] / onl["step_s"],
        "p1_cache/p1_online peak RSS": p1["peak_rss_mb"] / onl["peak_rss_mb"],
        "loader/trainer tokens per s": loader_tps / p1["tokens_per_s"],
        "chunked/naive loss RSS growth": res["chunked_loss"]["rss_growth_mb"]
        / max(res["naive_loss"]["rss_growth_mb"], 1e-9),
    }
    ratios.update(print_parallel(par, loader_rows))
    print(f"\nloader: {loader_tps:.0f} tokens/s")
    for k, v in ratios.items():
        print(f"{k:<34}{v:8.3f}")
    print(
        json.dumps(
            {
                "benchmark": "train_step",
                "machine": platform.machine(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "vocab": 32000,
                "batch_tokens": a.batch_tokens,
                "cases": res | par,
                "loader_tokens_per_s": loader_tps,
                "loader_per_rank": loader_rows,
                "ratios": ratios,
                "peers": peer,
            }
        )
    )


if __name__ == "__main__":
    main()
