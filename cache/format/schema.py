"""The cache format, version 2 (and version 1, still read): every array, dtype, shape, file and codec in one place.

A cache is a folder:

    manifest.json                 format version, provenance, per-shard counts and checksums
    build.json                    the build's identity (inputs + settings), written first
    shards/<name>/                one zarr v3 group per shard, teacher arrays
    student/<name>/               one zarr v3 group per shard, student-base arrays (optional)

Alignment: position t of a sequence predicts token t+1. `loss_mask[t] = 1` iff token
t+1 exists and belongs to the response. Rows of the per-supervised-position arrays
follow the supervised positions of each sequence in order, sequences in shard order.
See FORMAT.md for the full contract.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deltakd.cache.format import store
from deltakd.runtime import remote

FORMAT_NAME = "deltakd-cache"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# "topk": the top-k of πT (version 1's only support). "union" (version 2): the union of
# the top-k of πT, πB, πS0 and of the Delta-KD target π*_α for every α of the grid.
SUPPORTS = ("topk", "union")
# Where tail samples are drawn from (manifest "tail_proposal"; absent: "teacher", as every cache before it).
# "teacher": πT's tail; "target": the tail of π* at PROPOSAL_ALPHA; "mixture": half of each (cache/build/rows.py).
TAIL_PROPOSALS = ("teacher", "target", "mixture")
PROPOSAL_ALPHA = 1.0  # the α of π* whose tail "target" and "mixture" draw from

MANIFEST = "manifest.json"
BUILD_FILE = "build.json"
SHARD_META = "shard.json"
TEACHER_DIR = "shards"
STUDENT_DIR = "student"
PARTIAL_SUFFIX = ".partial"

VALUE_DTYPES = ("float16", "bfloat16", "float32")

# name -> (rows, width, kind)
# rows: per "token", "seq", "seq+1" (offsets), "sup" (supervised position) or "entry"
#   (one support id of one supervised position; row i owns support_len[i] entries)
# width: None, "k" (version 1: k ids per row) or "alphas" (one column per α of the grid)
# kind: "id" (vocabulary ids), "value" (log-probs in the value dtype), or a numpy dtype.
_SEQ_ARRAYS = {
    "tokens": ("token", None, "id"),
    "loss_mask": ("token", None, "uint8"),
    "seq_offsets": ("seq+1", None, "int64"),
    "example_ids": ("seq", None, "int64"),
}
TEACHER_ARRAYS_V1: dict[str, tuple[str, str | None, str]] = {
    **_SEQ_ARRAYS,
    "topk_ids": ("sup", "k", "id"),
    "logp_ft": ("sup", "k", "value"),
    "delta": ("sup", "k", "value"),
    "tail_ft": ("sup", None, "value"),
    "tail_base": ("sup", None, "value"),
}
STUDENT_ARRAYS_V1: dict[str, tuple[str, str | None, str]] = {
    "logp_s0": ("sup", "k", "value"),
    "tail_s0": ("sup", None, "value"),
}
TEACHER_ARRAYS: dict[str, tuple[str, str | None, str]] = {
    **_SEQ_ARRAYS,
    "support_len": ("sup", None, "uint16"),
    "support_ids": ("entry", None, "id"),
    "logp_ft": ("entry", None, "value"),
    "logp_base": ("entry", None, "value"),
    "tail_ft": ("sup", None, "value"),
    "tail_base": ("sup", None, "value"),
}
# Tail samples (builds with --tail-samples m > 0; the manifest's `tail_samples`): the
# last sample_len[i] entries of row i were drawn from πT outside the top-k support by
# priority sampling with threshold log τ = sample_tau[i] (cache/build/forward.py, sample_tail).
SAMPLE_ARRAYS: dict[str, tuple[str, str | None, str]] = {
    "sample_len": ("sup", None, "uint8"),
    "sample_tau": ("sup", None, "value"),
}
TEACHER_ARRAYS.update(SAMPLE_ARRAYS)
STUDENT_ARRAYS: dict[str, tuple[str, str | None, str]] = {
    "logp_s0": ("entry", None, "value"),
    "tail_s0": ("sup", None, "value"),
    # Unnormalised log-mass of the Delta-KD target outside the support, per α:
    # log Σ_{y ∉ S} πS0(y)·exp(α·Δ(y)); only where the build ran all three models together.
    "tail_star": ("sup", "alphas", "value"),
}


def arrays_of(version: int, student: bool, manifest: dict | None = None) -> dict[str, tuple[str, str | None, str]]:
    """The array table of a format version (teacher group, or student group).

    With a manifest: only the arrays that cache holds (tail samples only when it drew
    them, `tail_star` only with an alpha grid); without: every array the version knows.
    """
    if version == 1:
        return STUDENT_ARRAYS_V1 if student else TEACHER_ARRAYS_V1
    table = STUDENT_ARRAYS if student else TEACHER_ARRAYS
    if manifest is not None:
        drop = ("tail_star",) if student and not (manifest.get("student") or {}).get("alphas") else ()
        drop += tuple(SAMPLE_ARRAYS) if not student and not manifest.get("tail_samples") else ()
        table = {n: v for n, v in table.items() if n not in drop}
    return table


# Chosen by benchmarks/cache_format.py: plain zstd beat Blosc (any shuffle) on every
# large array, since Blosc's small blocks cut zstd's window; level 3 saves another
# ~15%, and 16384-row chunks (a longer window) another third, at the same decode
# speed; reads stay parallel across the arrays of a shard.
SUP_CHUNK_ROWS = 16384
TOKEN_CHUNK_ROWS = 65536
# Flat support entries (about 20-60 per supervised position): a chunk of about the
# same bytes as a 16384-row (S, 16) block of version 1.
ENTRY_CHUNK_ROWS = 262144
ZSTD_LEVEL = 3


class CacheFormatError(ValueError):
    """The cache on disk does not match this format; the message names the file or array."""


def parse_alphas(text: str) -> tuple[float, ...]:
    """'0.5,1,1.5' -> (0.5, 1.0, 1.5); refuses non-finite and repeated values."""
    try:
        grid = tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError as e:
        raise ValueError(f"alphas {text!r}: give comma-separated numbers such as 0.5,1,1.5") from e
    if any(not np.isfinite(a) for a in grid) or len(set(grid)) != len(grid):
        raise ValueError(f"alphas {text!r}: every alpha must be finite and appear once")
    return grid


def parse_floor(text) -> float | None:
    """'none' -> None; '-12' -> -12.0 (a log-prob, so it must be finite and negative)."""
    if text is None or str(text).strip().lower() == "none":
        return None
    try:
        f = float(text)
    except ValueError as e:
        raise ValueError(f"floor {text!r}: give a negative log-prob such as -12, or none") from e
    if not (np.isfinite(f) and f < 0):
        raise ValueError(f"floor {text!r}: give a finite negative log-prob such as -12, or none")
    return f


def covers_vocabulary(support: str, k: int, vocab_size: int) -> bool:
    """Whether every row's support is the whole vocabulary (every tail is then −inf)."""
    return k >= vocab_size  # the top-k of any distribution alone is then the whole vocabulary


def check_row_width(support: str, k: int, n_sources: int, tail_samples: int, vocab_size: int) -> None:
    """Refuse a build whose widest row would not fit `support_len` (uint16): min(V, sources·k) + m ids."""
    sources, most = (1 if support == "topk" else n_sources), int(np.iinfo(np.uint16).max)
    widest = min(vocab_size, sources * k + tail_samples)
    if widest > most:
        raise ValueError(
            f"--top-k {k}: a row could hold {widest} ids (vocabulary {vocab_size}), more than support_len "
            f"(uint16) counts; use a --top-k of at most {(most - tail_samples) // sources}"
        )


def id_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned integer that holds every id of the vocabulary."""
    return np.dtype("uint16") if vocab_size <= 1 << 16 else np.dtype("int32")


def storage_dtype(value_dtype: str) -> np.dtype:
    """zarr has no bfloat16: its bits are stored as uint16."""
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value dtype {value_dtype!r} is not one of {VALUE_DTYPES}")
    return np.dtype("uint16") if value_dtype == "bfloat16" else np.dtype(value_dtype)


def encode_values(x, value_dtype: str) -> np.ndarray:
    """float tensor/array -> the stored numpy array (round to nearest in the value dtype)."""
    import torch

    t = torch.as_tensor(x)
    if value_dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.to(getattr(torch, value_dtype)).numpy()


def decode_values(a: np.ndarray, value_dtype: str):
    """Stored numpy array -> float32 torch tensor."""
    import torch

    if value_dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(a)).float()


@dataclass(frozen=True)
class ShardInfo:
    """One committed shard as the manifest lists it."""

    name: str
    n_seqs: int
    n_tokens: int
    n_supervised: int
    checksums: dict[str, str]
    n_entries: int = 0  # support entries (version 2); version 1 has n_supervised * k

    def to_json(self) -> dict:
        return dict(self.__dict__)


def sup_offsets(loss_mask: np.ndarray, seq_offsets: np.ndarray) -> np.ndarray:
    """(N+1,) offsets of each sequence's rows in the per-supervised-position arrays.

    Sequence i owns rows sup_offsets[i]:sup_offsets[i+1] (see Alignment in FORMAT.md).
    """
    mask, off = loss_mask.astype(np.int64), np.asarray(seq_offsets)
    per_seq = np.add.reduceat(mask, off[:-1]) if len(off) > 1 and len(mask) else np.zeros(len(off) - 1, np.int64)
    # reduceat gives a wrong value for empty sequences; none are written, but guard anyway.
    per_seq = np.where(off[1:] > off[:-1], per_seq, 0)
    return np.concatenate([[0], np.cumsum(per_seq)]).astype(np.int64)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def group_checksums(group_dir) -> dict[str, str]:
    """sha256 of every file (object) of a zarr group (metadata and chunks), by relative path."""
    out = {}
    base = str(group_dir).rstrip("/") + "/"
    for p in sorted(group_dir.rglob("*"), key=str):
        if p.name != SHARD_META and p.is_file():
            out[str(p)[len(base) :]] = file_sha256(p)
    return out


def write_group(group_dir, arrays: dict[str, np.ndarray]) -> None:
    """Write whole arrays into a fresh zarr v3 group (one writer per group: see FORMAT.md)."""
    from deltakd.runtime.stop import deferred

    with deferred(), remote.doing("writing", group_dir):  # SIGTERM / Ctrl-C: the group is finished first (stop.py)
        _write_arrays(group_dir, arrays)


def _write_arrays(group_dir, arrays: dict[str, np.ndarray]) -> None:
    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec

    root = zarr.open_group(store.zarr_store(group_dir, read_only=False), mode="w", zarr_format=3)
    for name, a in arrays.items():
        kind = TEACHER_ARRAYS.get(name) or STUDENT_ARRAYS.get(name) or ("sup",)
        rows = {"token": TOKEN_CHUNK_ROWS, "entry": ENTRY_CHUNK_ROWS}.get(kind[0], SUP_CHUNK_ROWS)
        chunks = (max(1, min(rows, a.shape[0])),) + a.shape[1:]
        # crc32c after zstd: zarr checks each chunk's stored bytes at decode (a flipped
        # byte is an error, not a wrong value). Every chunk is written, even one equal to
        # the fill value, so that a missing chunk file always means damage (see integrity.py).
        root.create_array(
            name,
            shape=a.shape,
            dtype=a.dtype,
            chunks=chunks,
            compressors=[ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()],
            config={"write_empty_chunks": True},
        )[...] = a


def read_group(group_dir: Path, names) -> dict[str, np.ndarray]:
    import zarr

    with remote.doing("reading", group_dir):
        try:
            root = zarr.open_group(store.zarr_store(group_dir, read_only=True), mode="r", zarr_format=3)
        except Exception as e:  # zarr raises several types for a missing or broken group
            _unless_network(e)
            raise CacheFormatError(f"{group_dir}: not a readable zarr v3 group ({e})") from e
        out = {}
        for n in names:
            try:
                out[n] = root[n][...]
            except Exception as e:
                _unless_network(e)
                raise CacheFormatError(f"{group_dir}/{n}: cannot read array ({type(e).__name__}: {e})") from e
        return out


def _unless_network(e: BaseException) -> None:
    """A store that does not answer is not a damaged cache: its fault goes up as it is."""
    if remote.network_failure(e) is not None:
        raise e


def write_json_atomic(path, obj) -> None:
    """Commit points (shard.json, build.json, manifest.json); in an object store only under a held lease."""
    if store.is_remote(path):
        from deltakd.runtime import lease

        lease.check_held()
    store.write_json_atomic(path, obj)


def partial_dir(final):
    """Where a group is written before its commit: aside locally, in place in an object store."""
    return final if store.is_remote(final) else final.with_name(final.name + PARTIAL_SUFFIX)


def is_committed(group_dir) -> bool:
    """A group counts once its shard.json exists (written last; locally also renamed into place)."""
    with remote.doing("checking", group_dir / SHARD_META):
        return (group_dir / SHARD_META).exists()


def commit_group(partial, final, meta: dict) -> None:
    """Make a fully written group visible: its meta file last; locally then one rename (atomic on POSIX)."""
    if store.is_remote(final):
        assert str(partial) == str(final), "an object store has no rename: write groups in place"
        write_json_atomic(final / SHARD_META, meta)
        return
    write_json_atomic(partial / SHARD_META, meta)
    if final.exists():  # a replaced student group: the old one is moved aside first
        aside = final.with_name(final.name + ".old")
        os.replace(final, aside)
        os.replace(partial, final)
        store.rmtree(aside)
    else:
        os.replace(partial, final)


def uncommit_group(group_dir) -> None:
    """Before rewriting a committed group in place (object stores): readers stop trusting it first."""
    if store.is_remote(group_dir):
        (group_dir / SHARD_META).unlink(missing_ok=True)
        store.rmtree(group_dir)


def clean_partials(root) -> int:
    """Remove what a killed writer left behind; returns the count.

    Locally: `*.partial`, `*.old`, `*.tmp`. In an object store: group prefixes without
    their shard.json (written in place, never committed).
    """
    n = 0
    for sub in (root / TEACHER_DIR, root / STUDENT_DIR, root):
        if store.is_empty_or_missing(sub):
            continue
        for p in sub.iterdir():
            if store.is_remote(root):
                if sub is not root and not is_committed(p):
                    store.rmtree(p)
                    n += 1
            elif p.name.endswith((PARTIAL_SUFFIX, ".old", ".tmp")):
                store.rmtree(p) if p.is_dir() else p.unlink()
                n += 1
    return n


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"
