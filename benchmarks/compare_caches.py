"""Whether two caches hold the same bytes: every zarr array and every JSON file, compared exactly.

    python -m benchmarks.compare_caches CACHE_A CACHE_B

Arrays: the same set in both caches, each with the same dtype, shape and values
(bit for bit: float arrays are compared as their raw bytes, so -0.0 != 0.0 and NaNs
with the same payload match). Stored files: every chunk file byte for byte. JSON
(manifest.json, build.json, shard.json, zarr.json): equal after dropping what names
a run rather than its content: absolute paths, the phase timings in the manifest's
summary and the lock file. Prints one line per array, then a JSON line; exits 1 on
any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

IGNORED_FILES = (".deltakd.lock",)
TIMING_KEYS = ("phases",)  # manifest["summary"]["phases"]: seconds per phase of this run


def _normalised(obj):
    """JSON with run-specific fields replaced: absolute paths and timings."""
    if isinstance(obj, dict):
        return {k: ("<timing>" if k in TIMING_KEYS else _normalised(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_normalised(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("/"):
        return "<path>"
    return obj


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file() and p.name not in IGNORED_FILES}


def _array_dirs(files: dict[str, Path]) -> list[str]:
    """Folders whose zarr.json says they hold an array."""
    out = []
    for rel, p in files.items():
        if p.name == "zarr.json" and json.loads(p.read_text()).get("node_type") == "array":
            out.append(str(Path(rel).parent))
    return sorted(out)


def _open(root: Path, rel: str) -> np.ndarray:
    import zarr

    return zarr.open_array(str(root / rel), mode="r")[...]


def _diff_json(a, b, where: str = "") -> list[str]:
    if type(a) is not type(b):
        return [f"{where or '/'}: {a!r} != {b!r}"]
    if isinstance(a, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}/{k}: only in {'B' if k not in a else 'A'}")
            else:
                out += _diff_json(a[k], b[k], f"{where}/{k}")
        return out
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} != {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff_json(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def compare(a: Path, b: Path) -> dict:
    fa, fb = _files(a), _files(b)
    problems = [f"{rel}: only in {'A' if rel in fa else 'B'}" for rel in sorted(set(fa) ^ set(fb))]
    rows = []
    for rel in _array_dirs(fa):
        if rel not in _array_dirs(fb):
            continue  # reported as missing files above
        x, y = _open(a, rel), _open(b, rel)
        same = x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        n_diff = None
        if not same and x.shape == y.shape:
            n_diff = int((x.view(np.uint8) != y.view(np.uint8)).reshape(len(x), -1).any(1).sum()) if len(x) else 0
        rows.append({"array": rel, "dtype": str(x.dtype), "shape": list(x.shape), "same": same, "rows_differ": n_diff})
        if not same:
            problems.append(f"{rel}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}, rows differing: {n_diff}")
    n_json = n_bytes = 0
    for rel in sorted(set(fa) & set(fb)):
        if rel.endswith(".json"):
            n_json += 1
            ja, jb = (_normalised(json.loads(p[rel].read_text())) for p in (fa, fb))
            problems += [f"{rel}{d}" for d in _diff_json(ja, jb)]
        else:
            n_bytes += 1
            if fa[rel].read_bytes() != fb[rel].read_bytes():
                problems.append(f"{rel}: stored bytes differ")
    return {"arrays": rows, "n_json": n_json, "n_chunk_files": n_bytes, "problems": problems}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args()
    r = compare(args.a, args.b)
    print(f"{'array':<44}{'dtype':>9}{'shape':>16}  same")
    for row in r["arrays"]:
        print(f"{row['array']:<44}{row['dtype']:>9}{str(tuple(row['shape'])):>16}  {'yes' if row['same'] else 'NO'}")
    for p in r["problems"]:
        print("DIFF", p)
    identical = not r["problems"]
    print(
        json.dumps(
            {
                "benchmark": "compare_caches",
                "a": str(args.a),
                "b": str(args.b),
                "identical": identical,
                "n_arrays": len(r["arrays"]),
                "n_chunk_files": r["n_chunk_files"],
                "n_json": r["n_json"],
                "n_problems": len(r["problems"]),
            }
        )
    )
    sys.exit(0 if identical else 1)


if __name__ == "__main__":
    main()
