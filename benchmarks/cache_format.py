"""Bytes on disk per supervised token and read throughput, by codec and chunking.

    python benchmarks/cache_format.py [--workdir runs/bench-format]

Arrays come from the demo cache (k = 64, float16, a real trained teacher pair) and
are rewritten under each candidate layout. "Plain" is the uncompressed layout: ids
plus three k-wide float16 arrays plus tails. Reads decode every array of every
shard: serially on one thread, then in parallel the way `CacheReader` does.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from deltakd.cache import schema
from deltakd.cache.reader import CacheReader

LAYOUTS = {
    "raw, 4096-row chunks": (4096, None),
    "zstd-1 (no shuffle), 4096": (4096, lambda isz: [ZstdCodec(level=1)]),
    "blosc lz4 shuffle, 4096": (4096, lambda isz: [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=isz)]),
    "blosc zstd-1 shuffle, 1024": (1024, lambda isz: [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=isz)]),
    "blosc zstd-1 shuffle, 4096 *": (4096, lambda isz: [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=isz)]),
    "blosc zstd-1 shuffle, 16384": (16384, lambda isz: [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=isz)]),
    "blosc zstd-3 bitshuffle, 4096": (4096, lambda isz: [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=isz)]),
}


def write(arrays: dict, out: Path, rows: int, codecs) -> None:
    root = zarr.open_group(zarr.storage.LocalStore(str(out)), mode="w", zarr_format=3)
    for name, a in arrays.items():
        r = schema.TOKEN_CHUNK_ROWS if name in ("tokens", "loss_mask") else rows
        root.create_array(name, shape=a.shape, dtype=a.dtype, chunks=(max(1, min(r, a.shape[0])),) + a.shape[1:],
                          compressors=codecs(a.dtype.itemsize) if codecs else None)[...] = a


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/bench-format")
    ap.add_argument("--threads", type=int, default=4)
    a = ap.parse_args()
    from deltakd.demo_cmd import DemoConfig, assets, build_demo_cache

    work = Path(a.workdir)
    cache = build_demo_cache(work, assets(DemoConfig(workdir=str(work)), work))
    r = CacheReader(cache)
    names = list(schema.TEACHER_ARRAYS) + list(schema.STUDENT_ARRAYS)
    shards = []
    for n in r.shard_names:
        arr = schema.read_group(cache / schema.TEACHER_DIR / n, list(schema.TEACHER_ARRAYS))
        arr.update(schema.read_group(cache / schema.STUDENT_DIR / n, list(schema.STUDENT_ARRAYS)))
        shards.append(arr)
    n_sup = sum(s["topk_ids"].shape[0] for s in shards)
    n_tok = sum(s["tokens"].shape[0] for s in shards)
    k = r.k
    plain = k * (2 + 3 * 2) + 3 * 2  # uint16 ids + logp_ft, delta, logp_s0 + three tails (float16)
    rows = []
    for label, (chunk, codecs) in LAYOUTS.items():
        d = work / "layouts" / label.replace(" ", "_").replace(",", "").replace("*", "")
        shutil.rmtree(d, ignore_errors=True)
        groups = []
        for i, s in enumerate(shards):
            g = d / f"g{i}"
            write(s, g, chunk, codecs)
            groups.append(g)
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        serial = min(read_all(groups, names, 1) for _ in range(3))
        par = min(read_all(groups, names, a.threads) for _ in range(3))
        rows.append({"layout": label, "bytes_per_sup_token": size / n_sup, "ratio_to_plain": size / n_sup / plain,
                     "read_serial_tok_s": n_tok / serial, "read_parallel_tok_s": n_tok / par})
    print(f"\ndemo cache: {n_sup} supervised positions, k={k}, plain layout {plain} B per supervised token "
          f"(* = the format's choice)")
    print(f"{'layout':<32}{'B/sup tok':>10}{'vs plain':>10}{'read tok/s 1 thr':>18}{f'{a.threads} thr':>12}")
    for x in rows:
        print(f"{x['layout']:<32}{x['bytes_per_sup_token']:10.1f}{x['ratio_to_plain']:10.2f}"
              f"{x['read_serial_tok_s']:18.0f}{x['read_parallel_tok_s']:12.0f}")
    print(json.dumps({"benchmark": "cache_format", "machine": platform.machine(), "k": k, "plain_bytes": plain,
                      "supervised": n_sup, "tokens": n_tok, "zarr": zarr.__version__, "results": rows}))


if __name__ == "__main__":
    main()
