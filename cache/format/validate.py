"""Check a cache end to end: manifest, build.json, files, checksums, arrays, shapes, counts, finite values.

deltakd cache validate CACHE      # exit 1 and name the shard and array on any problem
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from deltakd.cache.format import integrity, schema
from deltakd.cache.format.reader import CacheReader


def _check_group(gdir: Path, expected: dict[str, str], label: str, want: set[str]) -> list[str]:
    """Files against the manifest's checksums, and the group's arrays against those the manifest announces."""
    problems = []
    if not schema.is_committed(gdir):
        return [f"{label}: folder {gdir} is missing"]
    actual = schema.group_checksums(gdir)
    problems += _check_array_set(gdir, label, {rel.split("/")[0] for rel in actual if "/" in rel}, want)
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
    problems, seen_ids = _check_listing(root, m) + _check_build_file(root, m), set()
    student_meta = {s["name"]: s for s in (m.get("student") or {}).get("shards", [])}
    want_teacher = set(schema.arrays_of(reader.version, False, m))
    want_student = set(schema.arrays_of(reader.version, True, m))
    for s in m["shards"]:
        name = s["name"]
        label = f"shard {name}"
        found = _check_group(root / schema.TEACHER_DIR / name, s["checksums"], label, want_teacher)
        if m.get("student"):
            if name not in student_meta:
                found.append(f"{label}: the manifest lists no student arrays for it")
            else:
                found += _check_group(
                    root / schema.STUDENT_DIR / name,
                    student_meta[name]["checksums"],
                    f"{label} (student)",
                    want_student,
                )
        problems += found
        if found:  # the files are not the ones written: their contents say nothing more
            continue
        try:
            teacher = list(schema.arrays_of(reader.version, False, m))
            integrity.check_files(root, m, name, teacher, bool(m.get("student")))
            a = schema.read_group(root / schema.TEACHER_DIR / name, teacher)
            if m.get("student"):
                names = [n for n in schema.arrays_of(reader.version, True) if n != "tail_star" or reader.alphas]
                a.update(schema.read_group(root / schema.STUDENT_DIR / name, names))
            integrity.check_raw(root, m, name, a)
        except schema.CacheFormatError as e:
            problems.append(str(e).split("; run `deltakd cache validate")[0])
            continue
        problems += _check_arrays(label, a, s, m, seen_ids, reader)
        if name in student_meta and student_meta[name].get("n_supervised") != s["n_supervised"]:
            problems.append(
                f"{label} (student): {student_meta[name].get('n_supervised')} supervised rows, "
                f"the teacher shard has {s['n_supervised']}"
            )
    return problems


def _check_array_set(gdir: Path, label: str, have: set[str], want: set[str]) -> list[str]:
    """The arrays a group holds are the ones the manifest announces (`tail_star` iff student.alphas,
    `sample_len`/`sample_tau` iff tail_samples > 0): a reader goes by the manifest alone."""
    p = [f"{label}: array {n} is missing (the manifest announces it)" for n in sorted(want - have)]
    for n in sorted(have - want):
        if n == "tail_star":
            try:
                cols = json.loads((gdir / n / "zarr.json").read_text())["shape"][1]
            except (OSError, ValueError, KeyError, IndexError):
                cols = "?"
            p.append(
                f"{label}: holds tail_star ({cols} exact target tails per row) but the manifest's student.alphas "
                "is empty, so readers ignore them; run the `deltakd cache build` command of build.json again "
                "(it rewrites the manifest)"
            )
        elif n in schema.SAMPLE_ARRAYS:
            p.append(f"{label}: holds tail-sample array {n} but the manifest's tail_samples is 0")
        else:
            p.append(f"{label}: holds array {n}, which the format does not define")
    return p


def _same_checkpoint(a: dict | None, b: dict | None) -> bool:
    strip = lambda c: {k: v for k, v in (c or {}).items() if k != "path"}  # noqa: E731
    return bool(a and b) and strip(a) == strip(b)


def _check_build_file(root: Path, m: dict) -> list[str]:
    """build.json (the build's identity) against the manifest: the same inputs, settings and student."""
    bpath = root / schema.BUILD_FILE
    if not bpath.exists():
        return [f"{schema.BUILD_FILE} is missing (every build writes it first)"]
    try:
        b = json.loads(bpath.read_text())
    except ValueError as e:
        return [f"{schema.BUILD_FILE}: not valid JSON ({e})"]
    p = []

    def differ(what: str, built, listed) -> None:
        if built != listed:
            p.append(f"{schema.BUILD_FILE}: {what} is {built!r}, the manifest says {listed!r}")

    for key in ("format_version", "support", "value_dtype", "mode", "floor"):
        if key in b and key in m:
            differ(key, b[key], m[key])
    if "k" in b:
        differ("k (capped at the vocabulary)", min(b["k"], m["vocab_size"]), m["k"])
    differ("tail_samples", b.get("tail_samples", 0), m.get("tail_samples", 0))
    if "sample_min_tail" in b:
        differ("sample_min_tail", b["sample_min_tail"], m.get("sample_min_tail"))
    for key in ("top_mass", "min_k", "tail_proposal"):
        differ(key, b.get(key), m.get(key))
    differ("tokenizer", (b.get("tokenizer") or {}).get("sha256"), (m.get("tokenizer") or {}).get("sha256"))
    differ("data", (b.get("data") or {}).get("sha256"), (m.get("data") or {}).get("sha256"))
    for role in ("teacher_ft", "teacher_base"):
        if not _same_checkpoint((b.get("checkpoints") or {}).get(role), (m.get("checkpoints") or {}).get(role)):
            p.append(f"{schema.BUILD_FILE}: checkpoint {role} differs from the manifest's")
    differ("n_shards", b.get("n_shards"), len(m["shards"]))
    if "n_truncated" in b and m.get("summary"):
        differ("n_truncated", b["n_truncated"], m["summary"].get("n_truncated"))
    st = m.get("student")
    if st and "alphas" in b:
        if _same_checkpoint(st.get("checkpoint"), b.get("student_base")):
            # The build's own student: the manifest announces the exact tails the build wrote.
            differ("the alphas of the build's exact target tails", b["alphas"], st.get("alphas", []))
        elif st.get("alphas"):
            p.append(
                f"manifest: student.alphas is {st['alphas']}, but its student arrays come from "
                "`deltakd cache add-student` (another checkpoint than the build's), which writes no exact tails"
            )
    return p


def _check_listing(root: Path, m: dict) -> list[str]:
    """totals against the shards; every shard folder on disk is listed, and the student list matches."""
    p = []
    for key in ("n_seqs", "n_tokens", "n_supervised"):
        total = sum(int(s.get(key, 0)) for s in m["shards"])
        if int((m.get("totals") or {}).get(key, -1)) != total:
            p.append(f"manifest: totals.{key} is {(m.get('totals') or {}).get(key)}, the shards add up to {total}")
    listed = {s["name"] for s in m["shards"]}
    for sub in (schema.TEACHER_DIR, schema.STUDENT_DIR):
        d = root / sub
        for g in sorted(d.iterdir()) if d.is_dir() else ():
            if g.name.endswith((schema.PARTIAL_SUFFIX, ".old", ".tmp")):
                continue  # an interrupted writer's leftover, removed by the next build
            if g.name not in listed:
                p.append(f"{sub}/{g.name}: a shard folder the manifest does not list")
    if m.get("student"):
        names = [s["name"] for s in m["student"].get("shards", [])]
        extra = sorted(set(names) - listed)
        if extra or len(names) != len(set(names)):
            p.append(f"manifest: the student list names shards the teacher list does not hold, or twice ({extra})")
    return p


def _check_arrays(label: str, a: dict, s: dict, m: dict, seen_ids: set, reader: CacheReader) -> list[str]:
    p = []
    table = {**schema.arrays_of(reader.version, False), **schema.arrays_of(reader.version, True)}
    n_tok, n_seq, n_sup, k = s["n_tokens"], s["n_seqs"], s["n_supervised"], m["k"]
    n_ent = int(a["support_len"].astype(np.int64).sum()) if "support_len" in a else 0
    want = {"token": (n_tok,), "seq": (n_seq,), "seq+1": (n_seq + 1,), "sup": (n_sup,), "entry": (n_ent,)}
    width = {None: (), "k": (k,), "alphas": (len(reader.alphas),)}
    for name, arr in a.items():
        rows, w, _ = table[name]
        shape = want[rows] + width[w]
        if tuple(arr.shape) != shape:
            p.append(f"{label}: array {name} has shape {tuple(arr.shape)}, the manifest implies {shape}")
    if p:
        return p
    if a["seq_offsets"][0] != 0 or a["seq_offsets"][-1] != n_tok or np.any(np.diff(a["seq_offsets"]) <= 0):
        p.append(f"{label}: array seq_offsets is not increasing from 0 to n_tokens")
    if int(a["loss_mask"].sum()) != n_sup:
        p.append(f"{label}: array loss_mask marks {int(a['loss_mask'].sum())} positions, the manifest says {n_sup}")
    if "support_len" in a and (a["support_len"].size and int(a["support_len"].min()) < 1):
        p.append(f"{label}: array support_len has an empty support")
    if "sample_len" in a and np.any(a["sample_len"].astype(np.int64) >= a["support_len"].astype(np.int64)):
        p.append(f"{label}: array sample_len leaves a row without top-k ids (it must be below support_len)")
    for name in ("tokens", "topk_ids", "support_ids"):
        if name in a and a[name].size and int(a[name].max()) >= m["vocab_size"]:
            p.append(f"{label}: array {name} holds ids beyond the vocabulary ({m['vocab_size']})")
    for name, (rows, w, kind) in table.items():
        if kind != "value" or name not in a:
            continue
        v = schema.decode_values(a[name], m["value_dtype"]).numpy()
        # A tail may be -inf (no mass outside the support); nothing may be NaN or +inf,
        # and the log-probs on the support (and Δ) are finite by construction.
        on_support = rows == "entry" or w == "k"
        bad = np.isnan(v) | (v == np.inf) | ((v == -np.inf) if on_support else False)
        if bad.any():
            p.append(f"{label}: array {name} holds {int(bad.sum())} NaN/Inf values")
    dup = seen_ids & set(a["example_ids"].tolist())
    if dup:
        p.append(f"{label}: array example_ids repeats examples of earlier shards ({sorted(dup)[:5]})")
    seen_ids |= set(a["example_ids"].tolist())
    return p
