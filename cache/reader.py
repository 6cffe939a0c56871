"""Open a cache, check it against the format, and read its shards.

    reader = CacheReader("cache/")
    for seq in reader.iter_sequences(rank=0, world=1, shuffle=True, seed=0):
        seq.tokens, seq.loss_mask, seq.topk_ids, seq.logp_ft, seq.delta, ...

This module and `schema` are all that the student side imports from the cache side.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import schema
from .schema import CacheFormatError


@dataclass
class CachedSequence:
    """One sequence with its targets. Row i of the (n_sup, ...) tensors belongs to the
    i-th supervised position, i.e. `loss_mask.nonzero()[i]`."""

    example_id: int
    tokens: torch.Tensor       # (L,) int64
    loss_mask: torch.Tensor    # (L,) bool
    topk_ids: torch.Tensor     # (n_sup, k) int64
    logp_ft: torch.Tensor      # (n_sup, k) float32
    delta: torch.Tensor        # (n_sup, k) float32
    tail_ft: torch.Tensor      # (n_sup,) float32
    tail_base: torch.Tensor    # (n_sup,) float32
    logp_s0: torch.Tensor | None = None  # (n_sup, k) float32
    tail_s0: torch.Tensor | None = None  # (n_sup,) float32


@dataclass
class ShardData:
    """A whole decoded shard; `sequence(i)` cuts views out of it."""

    arrays: dict[str, torch.Tensor]
    sup_offsets: np.ndarray  # (n_seqs + 1,)

    @property
    def n_seqs(self) -> int:
        return len(self.sup_offsets) - 1

    def sequence(self, i: int) -> CachedSequence:
        a, off = self.arrays, self.arrays["seq_offsets"]
        t0, t1 = int(off[i]), int(off[i + 1])
        s0, s1 = int(self.sup_offsets[i]), int(self.sup_offsets[i + 1])
        opt = {n: a[n][s0:s1] for n in ("logp_s0", "tail_s0") if n in a}
        return CachedSequence(
            int(a["example_ids"][i]), a["tokens"][t0:t1], a["loss_mask"][t0:t1],
            a["topk_ids"][s0:s1], a["logp_ft"][s0:s1], a["delta"][s0:s1],
            a["tail_ft"][s0:s1], a["tail_base"][s0:s1], **opt)


class CacheReader:
    def __init__(self, path: str | Path, threads: int = 4):
        self.root = Path(path)
        mpath = self.root / schema.MANIFEST
        if not mpath.exists():
            hint = " (a build is in progress or was interrupted: rerun the same `deltakd cache build`)" \
                if (self.root / schema.BUILD_FILE).exists() else ""
            raise CacheFormatError(f"{self.root}: no {schema.MANIFEST}; not a finished deltakd cache{hint}")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise CacheFormatError(f"{mpath}: not valid JSON ({e.msg})") from e
        m = self.manifest
        if m.get("format") != schema.FORMAT_NAME:
            raise CacheFormatError(f"{mpath}: not a deltakd cache manifest (format={m.get('format')!r})")
        if m.get("format_version") not in schema.READABLE_VERSIONS:
            raise CacheFormatError(
                f"{mpath}: format version {m.get('format_version')} is not readable by this deltakd "
                f"(reads {schema.READABLE_VERSIONS}); upgrade deltakd")
        if m.get("support", "topk") not in schema.SUPPORTS:
            raise CacheFormatError(f"{mpath}: support {m.get('support')!r} is not known to this deltakd")
        for s in m["shards"]:
            if not (self.root / schema.TEACHER_DIR / s["name"]).is_dir():
                raise CacheFormatError(f"{self.root}: shard {s['name']} listed in the manifest is missing")
        self.threads = threads

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def has_student(self) -> bool:
        return bool(self.manifest.get("student"))

    @property
    def shard_names(self) -> list[str]:
        return [s["name"] for s in self.manifest["shards"]]

    def __len__(self) -> int:
        return int(self.manifest["totals"]["n_seqs"])

    def read_shard(self, name: str, student: bool | None = None, arrays: list[str] | None = None) -> ShardData:
        """Decode a whole shard; arrays are read in parallel threads (zarr's codecs release the GIL)."""
        student = self.has_student if student is None else student
        if student and not self.has_student:
            raise CacheFormatError(
                f"{self.root}: the cache holds no student-base arrays; run `deltakd cache add-student`")
        names = list(arrays or schema.TEACHER_ARRAYS)
        for needed in ("seq_offsets", "loss_mask", "example_ids"):
            if needed not in names:
                names.append(needed)
        jobs = [(self.root / schema.TEACHER_DIR / name, n) for n in names]
        if student:
            jobs += [(self.root / schema.STUDENT_DIR / name, n) for n in schema.STUDENT_ARRAYS]
        with ThreadPoolExecutor(self.threads) as ex:
            raw = dict(zip([n for _, n in jobs], ex.map(lambda j: schema.read_group(j[0], [j[1]])[j[1]], jobs)))
        return self._decode(raw)

    def _decode(self, raw: dict[str, np.ndarray]) -> ShardData:
        vd = self.manifest["value_dtype"]
        spec = {**schema.TEACHER_ARRAYS, **schema.STUDENT_ARRAYS}
        out = {}
        for n, a in raw.items():
            kind = spec[n][2]
            if kind == "value":
                out[n] = schema.decode_values(a, vd)
            elif n == "loss_mask":
                out[n] = torch.from_numpy(a.astype(bool))
            else:
                out[n] = torch.from_numpy(a.astype(np.int64))
        return ShardData(out, schema.sup_offsets(raw["loss_mask"], raw["seq_offsets"]))

    def shard_order(self, rank: int = 0, world: int = 1, shuffle: bool = False, seed: int = 0, epoch: int = 0) -> list[str]:
        names = self.shard_names
        if shuffle:
            g = np.random.default_rng([seed, epoch])
            names = [names[i] for i in g.permutation(len(names))]
        return names[rank::world]

    def iter_sequences(self, rank: int = 0, world: int = 1, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                       student: bool | None = None):
        """Sequences of this rank's shards; shuffled by blocks: shard order, then rows within a shard."""
        for name in self.shard_order(rank, world, shuffle, seed, epoch):
            shard = self.read_shard(name, student=student)
            rows = range(shard.n_seqs)
            if shuffle:
                rows = np.random.default_rng([seed, epoch, int(name.split("-")[-1])]).permutation(shard.n_seqs)
            for i in rows:
                yield shard.sequence(int(i))
