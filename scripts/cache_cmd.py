"""`deltakd cache build|add-student|inspect|validate`: the cache side's commands.

deltakd cache build --teacher-ft FT --teacher-base BASE [--student-base S0] --data D.jsonl --out CACHE
deltakd cache add-student --cache CACHE --student-base S0
deltakd cache inspect CACHE [--example N] [--plot FILE.png]
deltakd cache validate CACHE
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

from deltakd.dataclass_args import add_dataclass_args, config_from_args


def register(sub) -> None:
    from deltakd.cache.build.add_student import AddStudentConfig
    from deltakd.cache.build.builder import CacheBuildConfig

    p = sub.add_parser("cache", help="build, extend, inspect and validate teacher caches")
    verbs = p.add_subparsers(dest="verb", required=True)
    b = verbs.add_parser("build", help="run the checkpoints once over the data and store what the losses need")
    add_dataclass_args(b, CacheBuildConfig)
    b.set_defaults(func=_build)
    a = verbs.add_parser("add-student", help="add or replace the student-base arrays without the teachers")
    add_dataclass_args(a, AddStudentConfig)
    a.set_defaults(func=_add_student)
    i = verbs.add_parser("inspect", help="what the cache holds; one example token by token")
    i.add_argument("cache")
    i.add_argument("--example", type=int, help="print sequence N (0-based, in cache order)")
    i.add_argument("--plot", help="write coverage and delta histograms to this PNG")
    i.add_argument("--tokenizer", help="decode tokens with this tokenizer (default: the teacher's, if still there)")
    i.add_argument("--max-shards", type=int, help="summarise only the first N shards (large caches)")
    i.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    i.set_defaults(func=_inspect)
    v = verbs.add_parser("validate", help="check checksums, shapes, counts and values; exit 1 on a problem")
    v.add_argument("cache")
    v.set_defaults(func=_validate)


def _build(ns) -> int:
    from deltakd.cache.build.builder import CacheBuildConfig, build_cache

    cfg = config_from_args(CacheBuildConfig, ns)
    try:
        m = build_cache(cfg)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            e.deltakd_need = _shard_need(cfg, e.filename or cfg.out)
        raise
    if m:
        t = m["totals"]
        print(
            f"cache ready: {cfg.out}  {t['n_seqs']} sequences, {t['n_tokens']} tokens, "
            f"{t['n_supervised']} supervised, k={m['k']}, truncated={m['summary']['n_truncated']}"
        )
        for phase, d in (m["summary"].get("phases") or {}).items():
            print(
                f"  {phase:5s} {d['tokens']} tokens in {d['seconds']:.1f}s = "
                f"{d['tokens'] / max(d['seconds'], 1e-9):.0f} tok/s"
            )
    return 0


def _shard_need(cfg, path) -> str:
    """Upper bound of the disk space one more shard takes (its float32 stage files or zarr groups)."""
    import shutil

    A = len(cfg.alpha_grid)
    entries = cfg.top_k * (3 + A) if cfg.support == "union" else cfg.top_k  # support ids per supervised row
    per_row = entries * (4 + 3 * 4) + (4 + A) * 4  # id + three log-probs per entry; tails per row
    need = cfg.shard_tokens * per_row
    if "://" in str(cfg.out):  # the local disk that filled holds the stage files
        return f"; the next shard needs up to {_size(need)}"
    free = shutil.disk_usage(next((p for p in Path(path).parents if p.exists()), Path("."))).free
    return f"; the next shard needs up to {_size(need)}, {_size(free)} are free"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _add_student(ns) -> int:
    from deltakd.cache.build.add_student import AddStudentConfig, add_student

    m = add_student(config_from_args(AddStudentConfig, ns))
    print(f"{ns.cache} holds the student-base arrays of {m['student']['checkpoint']['path']}")
    return 0


def _inspect(ns) -> int:
    from deltakd.cache.format.reader import CacheReader
    from deltakd.cache.format.summary import format_example, format_summary, plot, summarize

    if ns.example is not None:
        print(format_example(ns.cache, ns.example, tokenizer_path=ns.tokenizer))
        return 0
    s = summarize(ns.cache, ns.max_shards)
    if ns.plot:
        plot(s, ns.plot)
    if ns.json:
        print(json.dumps({k: v for k, v in s.items() if not k.startswith("_")}))
    else:
        print(format_summary(s, CacheReader(ns.cache).manifest, ns.tokenizer))
    return 0


def _validate(ns) -> int:
    from deltakd.cache.format.validate import validate

    problems = validate(ns.cache)
    for p in problems:
        print(f"INVALID {p}", file=sys.stderr)
    if not problems:
        print(f"{ns.cache}: valid")
    return 1 if problems else 0
