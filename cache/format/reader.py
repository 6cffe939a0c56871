"""Open a cache, check it against the format, and read its shards.

    reader = CacheReader("cache/")
    for seq in reader.iter_sequences(rank=0, world=1, shuffle=True, seed=0):
        seq.tokens, seq.loss_mask, seq.support_ids, seq.valid, seq.logp_ft, seq.logp_base, ...

Both format versions decode to one in-memory form: per supervised position a ragged
support (`support_len`) over flat entry arrays (`support_ids`, `logp_ft`,
`logp_base`, `logp_s0`); version 1's fixed top-k rows are k entries each, and its
stored Δ becomes `logp_base = logp_ft − delta`. This module, `schema` and `support`
are all that the student side imports from the cache side.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from deltakd.cache.format import integrity, schema, store
from deltakd.cache.format.schema import CacheFormatError
from deltakd.cache.format.support import pad_ragged

ENTRY_ARRAYS = ("support_ids", "logp_ft", "logp_base", "logp_s0", "delta")  # delta: version 1 only
ROW_ARRAYS = ("tail_ft", "tail_base", "tail_s0", "tail_star")


@dataclass
class CachedSequence:
    """One sequence with its targets. Row i of the (n_sup, ...) tensors belongs to the
    i-th supervised position, i.e. `loss_mask.nonzero()[i]`. Supports are padded to the
    widest row of the sequence: `valid` marks real entries, padded ids repeat the row's
    first id and padded log-probs are −inf."""

    example_id: int
    tokens: torch.Tensor  # (L,) int64
    loss_mask: torch.Tensor  # (L,) bool
    support_ids: torch.Tensor  # (n_sup, K) int64
    valid: torch.Tensor  # (n_sup, K) bool
    logp_ft: torch.Tensor  # (n_sup, K) float32
    logp_base: torch.Tensor  # (n_sup, K) float32
    tail_ft: torch.Tensor  # (n_sup,) float32
    tail_base: torch.Tensor  # (n_sup,) float32
    logp_s0: torch.Tensor | None = None  # (n_sup, K) float32
    tail_s0: torch.Tensor | None = None  # (n_sup,) float32
    tail_star: torch.Tensor | None = None  # (n_sup, n_alphas) float32
    stored_delta: torch.Tensor | None = None  # (n_sup, k) version 1's stored Δ, exactly as stored
    sampled: torch.Tensor | None = None  # (n_sup, K) bool: entries drawn from πT's tail (the row's last sample_len)
    sample_tau: torch.Tensor | None = None  # (n_sup,) log τ of the priority sampling, −inf where none was drawn

    @property
    def topk_ids(self) -> torch.Tensor:
        """Version-1 name of the support ids."""
        return self.support_ids

    @property
    def delta(self) -> torch.Tensor:
        """Δ = lT − lB on the support (0 on padding)."""
        if self.stored_delta is not None:
            return self.stored_delta
        return torch.where(self.valid, self.logp_ft - self.logp_base, torch.zeros(()))


@dataclass
class ShardData:
    """A whole decoded shard: per-token, per-row and flat per-entry tensors."""

    arrays: dict[str, torch.Tensor]
    sup_offsets: np.ndarray  # (n_seqs + 1,) rows of each sequence
    entry_offsets: torch.Tensor  # (n_rows + 1,) entries of each row
    _sentinels: dict = field(default_factory=dict, repr=False)  # value arrays with a trailing −inf

    @property
    def n_seqs(self) -> int:
        return len(self.sup_offsets) - 1

    def _with_sentinel(self, name: str) -> torch.Tensor:
        v = self._sentinels.get(name)
        if v is None:
            v = self._sentinels[name] = torch.cat([self.arrays[name], torch.full((1,), float("-inf"))])
        return v

    def rows(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Targets of the given supervised rows, entry arrays padded to the widest: (n, K) / (n,) / (n, A)."""
        a = self.arrays
        lengths = a["support_len"][rows]
        idx, valid = pad_ragged(lengths)  # into the selected rows' entries, concatenated
        starts = torch.cumsum(lengths, 0) - lengths
        flat = idx - starts[:, None] + self.entry_offsets[rows][:, None]  # (n, K) into the shard's entries
        # Padded value entries read a −inf appended after the shard's last entry: one
        # index select per array, no masking pass (this runs for every batch).
        flat_vals = torch.where(valid, flat, self.entry_offsets[-1])
        out = {"valid": valid}
        if (
            "sample_len" in a
        ):  # tail samples: the last sample_len entries of a row (cache/build/forward.py, sample_tail)
            first = (lengths - a["sample_len"][rows])[:, None]
            out["sampled"] = valid & (torch.arange(valid.shape[1])[None, :] >= first)
            out["sample_tau"] = a["sample_tau"][rows]
        for n in ENTRY_ARRAYS:
            if n == "support_ids" and n in a:
                out[n] = a[n][flat]
            elif n in a:
                out[n] = self._with_sentinel(n)[flat_vals]
        for n in ROW_ARRAYS:
            if n in a:
                out[n] = a[n][rows]
        return out

    def sequence(self, i: int) -> CachedSequence:
        a, off = self.arrays, self.arrays["seq_offsets"]
        t0, t1 = int(off[i]), int(off[i + 1])
        t = self.rows(torch.arange(int(self.sup_offsets[i]), int(self.sup_offsets[i + 1])))
        if "delta" in t:
            t["stored_delta"] = t.pop("delta")
        return CachedSequence(int(a["example_ids"][i]), a["tokens"][t0:t1], a["loss_mask"][t0:t1], **t)


class CacheReader:
    def __init__(self, path: str | Path, threads: int = 4, verify: bool = True):
        self.root = store.cache_root(path)
        mpath = self.root / schema.MANIFEST
        if not mpath.exists():
            hint = (
                " (a build is in progress or was interrupted: rerun the same `deltakd cache build`)"
                if (self.root / schema.BUILD_FILE).exists()
                else ""
            )
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
                f"(reads {schema.READABLE_VERSIONS}); upgrade deltakd"
            )
        if m.get("support", "topk") not in schema.SUPPORTS or (
            self.version == 1 and m.get("support", "topk") != "topk"
        ):
            raise CacheFormatError(f"{mpath}: support {m.get('support')!r} is not known to this deltakd")
        for s in m["shards"]:
            if not schema.is_committed(self.root / schema.TEACHER_DIR / s["name"]):
                raise CacheFormatError(f"{self.root}: shard {s['name']} listed in the manifest is missing")
        self.threads = threads
        self.verify = verify  # see integrity.py; off only to measure its cost

    @property
    def version(self) -> int:
        return int(self.manifest["format_version"])

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def support(self) -> str:
        return self.manifest.get("support", "topk")

    @property
    def floor(self) -> float | None:
        """The floor inside Δ used for the stored target tails (None: none, or version 1)."""
        return self.manifest.get("floor")

    @property
    def alphas(self) -> tuple[float, ...]:
        """The alphas with exact Delta-KD target tails (`tail_star` columns); empty when none are stored."""
        return tuple((self.manifest.get("student") or {}).get("alphas") or ())

    @property
    def covers_vocabulary(self) -> bool:
        return schema.covers_vocabulary(self.support, self.k, self.vocab_size)

    @property
    def has_student(self) -> bool:
        return bool(self.manifest.get("student"))

    @property
    def shard_names(self) -> list[str]:
        return [s["name"] for s in self.manifest["shards"]]

    def __len__(self) -> int:
        return int(self.manifest["totals"]["n_seqs"])

    def read_shard(self, name: str, student: bool | None = None, arrays: list[str] | None = None) -> ShardData:
        """Decode a whole shard; arrays are read in parallel threads (zarr's codecs release the GIL).

        `arrays` limits the teacher arrays read (by their on-disk names); the per-sequence
        arrays are always read.
        """
        student = self.has_student if student is None else student
        if student and not self.has_student:
            raise CacheFormatError(
                f"{self.root}: the cache holds no student-base arrays; run `deltakd cache add-student`"
            )
        table = schema.arrays_of(self.version, student=False, manifest=self.manifest)
        names = list(arrays or table)
        for needed in ("seq_offsets", "loss_mask", "example_ids"):
            if needed not in names:
                names.append(needed)
        jobs = [(self.root / schema.TEACHER_DIR / name, n) for n in names]
        if student:
            st = schema.arrays_of(self.version, student=True)
            jobs += [(self.root / schema.STUDENT_DIR / name, n) for n in st if n != "tail_star" or self.alphas]
        if self.verify:
            integrity.check_files(self.root, self.manifest, name, names, student)
        try:
            with ThreadPoolExecutor(self.threads) as ex:
                raw = dict(zip([n for _, n in jobs], ex.map(lambda j: schema.read_group(j[0], [j[1]])[j[1]], jobs)))
        except CacheFormatError as e:  # a chunk failing its crc32c, or not decodable
            raise CacheFormatError(f"{e}; {integrity.hint(self.root)}") from e
        if self.verify:
            integrity.check_raw(self.root, self.manifest, name, raw)
        data = self._decode(raw)
        if self.verify:
            integrity.check_values(self.root, name, data.arrays, self.version)
        return data

    def read_rows(self, name: str, index: ShardData, rows: np.ndarray, student: bool | None = None) -> ShardData:
        """Only the sequences `rows` (ascending) of a shard, in that order, as a compact ShardData.

        `index` holds the shard's seq_offsets, loss_mask and example_ids (read already to
        plan the batches). zarr decompresses the chunks that hold the rows; only the
        selected rows are gathered and converted (a data-parallel rank's share, ~1/world).
        """
        student = self.has_student if student is None else student
        if student and not self.has_student:
            raise CacheFormatError(
                f"{self.root}: the cache holds no student-base arrays; run `deltakd cache add-student`"
            )
        rows = np.asarray(rows, dtype=np.int64)
        off, sup = index.arrays["seq_offsets"].numpy(), index.sup_offsets
        idx = {"token": _ranges(off[rows], off[rows + 1]), "sup": _ranges(sup[rows], sup[rows + 1])}
        tdir, sdir = self.root / schema.TEACHER_DIR / name, self.root / schema.STUDENT_DIR / name
        if self.version >= 2:  # ragged supports: row i owns support_len[i] entries
            lens = schema.read_group(tdir, ["support_len"])["support_len"].astype(np.int64)
            ent = np.concatenate([[0], np.cumsum(lens)])
            idx["entry"] = _ranges(ent[idx["sup"]], ent[idx["sup"] + 1])
        jobs = [
            (tdir, n, idx[spec[0]])
            for n, spec in schema.arrays_of(self.version, False, self.manifest).items()
            if spec[0] in idx and n != "loss_mask"
        ]
        if student:
            jobs += [
                (sdir, n, idx[spec[0]])
                for n, spec in schema.arrays_of(self.version, True).items()
                if n != "tail_star" or self.alphas
            ]
        if self.verify:
            integrity.check_files(self.root, self.manifest, name, [n for d, n, _ in jobs if d == tdir], student)
        try:
            with ThreadPoolExecutor(self.threads) as ex:
                raw = dict(zip([n for _, n, _ in jobs], ex.map(lambda j: schema.read_rows(*j), jobs)))
        except CacheFormatError as e:  # a chunk failing its crc32c, or not decodable
            raise CacheFormatError(f"{e}; {integrity.hint(self.root)}") from e
        if self.verify:
            integrity.check_raw(self.root, self.manifest, name, raw, rows=False)
        lengths = off[rows + 1] - off[rows]
        raw["seq_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        raw["loss_mask"] = index.arrays["loss_mask"].numpy()[idx["token"]].astype(np.uint8)
        raw["example_ids"] = index.arrays["example_ids"].numpy()[rows]
        data = self._decode(raw)
        if self.verify:
            integrity.check_values(self.root, name, data.arrays, self.version)
        return data

    def _decode(self, raw: dict[str, np.ndarray]) -> ShardData:
        vd = self.manifest["value_dtype"]
        spec = {**schema.arrays_of(self.version, False), **schema.arrays_of(self.version, True)}
        out = {}
        for n, a in raw.items():
            kind = spec[n][2]
            if kind == "value":
                out[n] = schema.decode_values(a, vd)
            elif n == "loss_mask":
                out[n] = torch.from_numpy(a.astype(bool))
            else:
                out[n] = torch.from_numpy(a.astype(np.int64))
        rows = schema.sup_offsets(raw["loss_mask"], raw["seq_offsets"])
        if self.version == 1:
            out = _v1_to_entries(out, int(rows[-1]))
        lengths = out.get("support_len")
        entry_offsets = (
            torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
            if lengths is not None
            else torch.zeros(1, dtype=torch.long)
        )
        return ShardData(out, rows, entry_offsets)

    def shard_order(
        self, rank: int = 0, world: int = 1, shuffle: bool = False, seed: int = 0, epoch: int = 0
    ) -> list[str]:
        names = self.shard_names
        if shuffle:
            g = np.random.default_rng([seed, epoch])
            names = [names[i] for i in g.permutation(len(names))]
        return names[rank::world]

    def iter_sequences(
        self,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        student: bool | None = None,
    ):
        """Sequences of this rank's shards; shuffled by blocks: shard order, then rows within a shard."""
        for name in self.shard_order(rank, world, shuffle, seed, epoch):
            shard = self.read_shard(name, student=student)
            rows = range(shard.n_seqs)
            if shuffle:
                rows = np.random.default_rng([seed, epoch, int(name.split("-")[-1])]).permutation(shard.n_seqs)
            for i in rows:
                yield shard.sequence(int(i))


def _v1_to_entries(a: dict[str, torch.Tensor], n_rows: int) -> dict[str, torch.Tensor]:
    """Version 1's (S, k) arrays as version 2's flat entries with k entries per row."""
    out = {n: v for n, v in a.items() if n not in ("topk_ids", "logp_ft", "delta", "logp_s0")}
    if "topk_ids" in a:
        k = a["topk_ids"].shape[1]
        out["support_len"] = torch.full((n_rows,), k, dtype=torch.long)
        out["support_ids"] = a["topk_ids"].reshape(-1)
    if "logp_ft" in a:
        out["logp_ft"] = a["logp_ft"].reshape(-1)
        if "delta" in a:
            out["logp_base"] = (a["logp_ft"] - a["delta"]).reshape(-1)
            out["delta"] = a["delta"].reshape(-1)
    if "logp_s0" in a:
        out["logp_s0"] = a["logp_s0"].reshape(-1)
    return out


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) for each pair, without a Python loop."""
    lens = ends - starts
    if lens.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    return np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
