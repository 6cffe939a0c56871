"""Check a cache end to end: manifest, files, checksums, shapes, counts, finite values.

    deltakd cache validate CACHE      # exit 1 and name the shard and array on any problem
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import schema
from .reader import CacheReader


def _check_group(gdir: Path, expected: dict[str, str], label: str) -> list[str]:
    problems = []
    if not gdir.is_dir():
        return [f"{label}: folder {gdir} is missing"]
    actual = schema.group_checksums(gdir)
    for rel, h in expected.items():
        if rel not in actual:
            problems.append(f"{label}: file {rel} is missing")
        elif actual[rel] != h:
            problems.append(f"{label}: array {rel.split('/')[0]} fails its checksum (file {rel})")
    for rel in set(actual) - set(expected):
        problems.append(f"{label}: unexpected file {rel}")
    return problems


def validate(path: str | Path) -> list[str]:
    """All problems found (empty list: the cache is valid)."""
    try:
        reader = CacheReader(path)
    except (schema.CacheFormatError, KeyError) as e:
        return [str(e)]
    root, m = reader.root, reader.manifest
    problems, seen_ids = [], set()
    student_meta = {s["name"]: s for s in (m.get("student") or {}).get("shards", [])}
    for s in m["shards"]:
        name = s["name"]
        label = f"shard {name}"
        problems += _check_group(root / schema.TEACHER_DIR / name, s["checksums"], label)
        if m.get("student"):
            if name not in student_meta:
                problems.append(f"{label}: the manifest lists no student arrays for it")
            else:
                problems += _check_group(root / schema.STUDENT_DIR / name, student_meta[name]["checksums"], f"{label} (student)")
        if problems:
            continue
        try:
            a = schema.read_group(root / schema.TEACHER_DIR / name, list(schema.TEACHER_ARRAYS))
            if m.get("student"):
                a.update(schema.read_group(root / schema.STUDENT_DIR / name, list(schema.STUDENT_ARRAYS)))
        except schema.CacheFormatError as e:
            problems.append(str(e))
            continue
        problems += _check_arrays(label, a, s, m, seen_ids)
    return problems


def _check_arrays(label: str, a: dict, s: dict, m: dict, seen_ids: set) -> list[str]:
    p = []
    n_tok, n_seq, n_sup, k = s["n_tokens"], s["n_seqs"], s["n_supervised"], m["k"]
    want = {"token": (n_tok,), "seq": (n_seq,), "seq+1": (n_seq + 1,), "sup": (n_sup,)}
    for name, arr in a.items():
        rows, has_k, _ = {**schema.TEACHER_ARRAYS, **schema.STUDENT_ARRAYS}[name]
        shape = want[rows] + ((k,) if has_k else ())
        if tuple(arr.shape) != shape:
            p.append(f"{label}: array {name} has shape {tuple(arr.shape)}, the manifest implies {shape}")
    if p:
        return p
    if a["seq_offsets"][0] != 0 or a["seq_offsets"][-1] != n_tok or np.any(np.diff(a["seq_offsets"]) <= 0):
        p.append(f"{label}: array seq_offsets is not increasing from 0 to n_tokens")
    if int(a["loss_mask"].sum()) != n_sup:
        p.append(f"{label}: array loss_mask marks {int(a['loss_mask'].sum())} positions, the manifest says {n_sup}")
    for name in ("tokens", "topk_ids"):
        if a[name].size and int(a[name].max()) >= m["vocab_size"]:
            p.append(f"{label}: array {name} holds ids beyond the vocabulary ({m['vocab_size']})")
    for name, (rows, has_k, kind) in {**schema.TEACHER_ARRAYS, **schema.STUDENT_ARRAYS}.items():
        if kind != "value" or name not in a:
            continue
        v = schema.decode_values(a[name], m["value_dtype"]).numpy()
        # A tail may be -inf (no mass outside the top-k); nothing may be NaN or +inf,
        # and the cached top-k log-probs are finite by construction.
        bad = np.isnan(v) | (v == np.inf) | ((v == -np.inf) if has_k and name != "delta" else False)
        if name == "delta":
            bad |= ~np.isfinite(v)
        if bad.any():
            p.append(f"{label}: array {name} holds {int(bad.sum())} NaN/Inf values")
    dup = seen_ids & set(a["example_ids"].tolist())
    if dup:
        p.append(f"{label}: array example_ids repeats examples of earlier shards ({sorted(dup)[:5]})")
    seen_ids |= set(a["example_ids"].tolist())
    return p

