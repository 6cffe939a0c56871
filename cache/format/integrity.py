"""Checks the reader runs on every shard it reads, so that training never sees bad data silently.

Cheap next to decoding (benchmarks/cache_format.py measures it): every chunk the
manifest lists must exist (zarr would read a missing chunk as its fill value), each
group's own shard.json must name the shard it is read as (swapped folders), stored
dtypes must match the manifest's value_dtype and id_dtype, row counts must match the
manifest, and decoded values must be finite (tails may be -inf; the per-entry arrays
a rank reads stay as stored, see reader.ShardData, and are checked on their bits).
Chunk contents are verified by zarr itself: format-1 caches written since the crc32c codec was added carry a
CRC-32C per chunk, checked at decode. Each error names the shard and array and points to
`deltakd cache validate`, which finds every damaged shard at once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from deltakd.cache.format import schema, store
from deltakd.cache.format.schema import CacheFormatError
from deltakd.runtime import remote


def hint(root: Path) -> str:
    return f"run `deltakd cache validate {root}` to list every damaged shard, then rebuild them"


def bad_shard(root: Path, name: str, array: str | None, what: str) -> CacheFormatError:
    where = f"shard {name}" + (f", array {array}" if array else "")
    return CacheFormatError(f"{root}: {where}: {what}; {hint(root)}")


def _table(version: int) -> dict:
    return {**schema.arrays_of(version, False), **schema.arrays_of(version, True)}


def check_files(root: Path, manifest: dict, name: str, arrays: list[str], student: bool) -> None:
    """Every file of the wanted arrays that the manifest's checksums list exists; the groups are this shard's."""
    groups = [(schema.TEACHER_DIR, _shard_entry(manifest["shards"], name), arrays)]
    if student:
        groups.append(
            (
                schema.STUDENT_DIR,
                _shard_entry((manifest.get("student") or {}).get("shards", []), name),
                list(schema.arrays_of(int(manifest["format_version"]), True, manifest)),
            )
        )
    for sub, entry, names in groups:
        gdir = root / sub / name
        if entry is None:
            raise bad_shard(root, name, None, f"the manifest lists no {sub} entry for it")
        meta = gdir / schema.SHARD_META
        try:
            own = json.loads(meta.read_text())
        except (OSError, ValueError) as e:
            if remote.network_failure(e) is not None:  # not an answer about the folder
                raise
            own = {}
        if own.get("name") != name:
            raise bad_shard(
                root,
                name,
                None,
                f"{sub}/{name}/{schema.SHARD_META} names shard {own.get('name')!r}: "
                "the folder was moved, swapped or damaged",
            )
        if sub == schema.STUDENT_DIR and not _same_weights(own.get("student_base"), manifest["student"]["checkpoint"]):
            raise bad_shard(
                root,
                name,
                None,
                "its student-base arrays come from another checkpoint than the "
                "manifest's student; rerun `deltakd cache add-student`",
            )
        wanted = tuple(f"{n}/" for n in names)
        exists = _lister(gdir)
        for rel in entry.get("checksums", {}):
            if rel.startswith(wanted) and not exists(rel):
                raise bad_shard(root, name, rel.split("/")[0], f"chunk file {sub}/{name}/{rel} is missing")


def _lister(gdir):
    """rel -> whether the file exists: a stat per file locally, one listing of the prefix in an object store."""
    if not store.is_remote(gdir):
        return lambda rel: (gdir / rel).is_file()
    base = gdir.path.rstrip("/") + "/"
    have = {k[len(base) :] for k in gdir.fs.find(gdir.path)}
    return have.__contains__


def _same_weights(a: dict | None, b: dict | None) -> bool:
    if not a or not b:  # caches of early builds record no per-shard student
        return True
    return (a.get("config_sha256"), a.get("weights_sha256")) == (b.get("config_sha256"), b.get("weights_sha256"))


def _shard_entry(entries: list[dict], name: str) -> dict | None:
    return next((e for e in entries if e.get("name") == name), None)


def check_raw(root: Path, manifest: dict, name: str, raw: dict[str, np.ndarray], rows: bool = True) -> None:
    """Stored dtypes and (for whole arrays, `rows`) row counts against the manifest, before decoding."""
    entry = _shard_entry(manifest["shards"], name) or {}
    counts = {
        "token": entry.get("n_tokens"),
        "seq": entry.get("n_seqs"),
        "sup": entry.get("n_supervised"),
        "seq+1": entry["n_seqs"] + 1 if "n_seqs" in entry else None,
        "entry": entry.get("n_entries"),
    }
    table = _table(int(manifest["format_version"]))
    want_dtype = {
        "value": schema.storage_dtype(manifest["value_dtype"]),
        "id": np.dtype(manifest.get("id_dtype", "uint16")),
    }
    for n, a in raw.items():
        spec = table.get(n)
        if spec is None:
            continue
        per, _, kind = spec
        want = want_dtype[kind] if kind in want_dtype else np.dtype(kind)
        if a.dtype != want:
            raise bad_shard(
                root,
                name,
                n,
                f"stored as {a.dtype}, the manifest implies {want} "
                f"(value_dtype {manifest['value_dtype']}, id_dtype {manifest.get('id_dtype')})",
            )
        if rows and counts.get(per) is not None and a.shape[0] != counts[per]:
            raise bad_shard(root, name, n, f"has {a.shape[0]} rows, the manifest implies {counts[per]}")


def check_values(root: Path, name: str, arrays: dict[str, torch.Tensor], version: int) -> None:
    """Decoded values: log-probs on the support finite; tails free of NaN and +inf (-inf: no mass outside)."""
    table = _table(version)
    for n, t in arrays.items():
        spec = table.get(n)
        if spec is None or not t.is_floating_point() or not t.numel():
            continue
        on_support = spec[0] == "entry" or spec[1] == "k"
        # min and max decide (both propagate NaN; far cheaper than an isfinite mask on CPU);
        # the element-wise mask is built only to describe a bad array.
        lo, hi = float(t.min()), float(t.max())
        if on_support and math.isfinite(lo) and math.isfinite(hi):
            continue
        if not on_support and not (math.isnan(lo) or math.isnan(hi) or hi == math.inf):
            continue
        bad = ~torch.isfinite(t) if on_support else (torch.isnan(t) | (t == math.inf))
        row = int(bad.reshape(len(t), -1).any(1).nonzero()[0, 0])
        raise bad_shard(root, name, n, f"{int(bad.sum())} NaN/Inf values (first at row {row})")


# Bits of the exponent field (and sign-less magnitude mask) of the 16-bit value dtypes:
# a value is NaN or ±inf iff its magnitude bits are at least the all-ones exponent.
_EXP_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}


def _bits_finite(bits: np.ndarray, exp_bits: int, block: int = 1 << 15) -> bool:
    """No 16-bit value is NaN or ±inf: the magnitude bits of each, masked block by block into one small
    buffer that stays in the CPU cache (one pass over the array instead of a full-size temporary and a second pass)."""
    buf = np.empty(min(block, len(bits)), dtype=np.uint16)
    for s in range(0, len(bits), block):
        part = buf[: min(block, len(bits) - s)]
        np.bitwise_and(bits[s : s + block], 0x7FFF, out=part)
        if int(part.max()) >= exp_bits:
            return False
    return True


def check_stored(root: Path, name: str, stored: dict[str, np.ndarray], manifest: dict) -> None:
    """`check_values` for per-entry arrays kept as stored (`ShardData.stored`): log-probs on the support
    are finite, decided on the stored bits without converting the arrays to float32."""
    vd = manifest["value_dtype"]
    table = _table(int(manifest["format_version"]))
    for n, a in stored.items():
        if table[n][2] != "value" or not a.size:
            continue
        if vd in _EXP_BITS:
            finite = _bits_finite(a.view(np.uint16).reshape(-1), _EXP_BITS[vd])
        else:  # min and max propagate NaN
            finite = bool(np.isfinite(a.min()) and np.isfinite(a.max()))
        if not finite:  # decoded only to describe the bad array, with the same message
            check_values(root, name, {n: schema.decode_values(a, vd)}, int(manifest["format_version"]))
