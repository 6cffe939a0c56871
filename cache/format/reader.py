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
from deltakd.runtime import remote

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


# 16-bit value dtypes a batch can carry as stored: −inf's bit pattern (the padding) and the torch dtype.
HALF_FILL = {"float16": (0xFC00, torch.float16), "bfloat16": (0xFF80, torch.bfloat16)}


@dataclass
class ShardData:
    """A decoded shard (or the rows of one a rank reads): per-token, per-row and flat per-entry arrays.

    `read_rows` leaves the per-entry arrays as stored (`stored`: ids in the id dtype,
    values in the storage dtype) instead of in `arrays`: `rows` converts only the entries
    of the rows it is asked for, straight into the padded batch, so a shard's entries are
    converted once, never first to a whole float32 copy."""

    arrays: dict[str, torch.Tensor]
    sup_offsets: np.ndarray  # (n_seqs + 1,) rows of each sequence
    entry_offsets: torch.Tensor  # (n_rows + 1,) entries of each row
    stored: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # per-entry arrays as stored
    value_dtype: str = "float32"  # the storage dtype of `stored` values (the manifest's value_dtype)

    @property
    def n_seqs(self) -> int:
        return len(self.sup_offsets) - 1

    def _entries(self, name: str) -> np.ndarray | None:
        if name in self.stored:
            return self.stored[name]
        return self.arrays[name].numpy() if name in self.arrays else None

    def rows(self, rows, widen: bool = True) -> dict[str, torch.Tensor]:
        """Targets of the given supervised rows, entry arrays padded to the widest: (n, K) / (n,) / (n, A).

        Padding: `valid` is False, ids repeat the row's first id, log-probs are −inf. `widen` False: the
        per-entry log-probs a cache stores in 16 bits stay float16 / bfloat16 (the same values; a device
        widens them for less work and half the host-to-device bytes), float32 otherwise."""
        a = self.arrays
        r = np.asarray(rows, dtype=np.int64)
        rt = torch.from_numpy(r)
        lengths = a["support_len"].numpy()[r]
        K = int(lengths.max()) if len(r) else 0
        col = np.arange(K)
        valid = col[None, :] < lengths[:, None]  # (n, K)
        # The rows' entries, concatenated: one slice per run of consecutive rows (a
        # sequence's rows are one run); then one boolean-mask store per array into the
        # padded batch, which converts to int64 / float32 on the way.
        eo = self.entry_offsets.numpy()
        first, end = runs(r)
        spans = list(zip(eo[first].tolist(), eo[end].tolist()))

        def entries(x: np.ndarray) -> np.ndarray:
            return (
                x[spans[0][0] : spans[0][1]]
                if len(spans) == 1
                else np.concatenate([x[:0]] + [x[s:e] for s, e in spans])
            )

        out = {"valid": torch.from_numpy(valid)}
        if (
            "sample_len" in a
        ):  # tail samples: the last sample_len entries of a row (cache/build/forward.py, sample_tail)
            first = (lengths - a["sample_len"].numpy()[r])[:, None]
            out["sampled"] = torch.from_numpy(valid & (col[None, :] >= first))
            out["sample_tau"] = a["sample_tau"][rt]
        for n in ENTRY_ARRAYS:
            x = self._entries(n)
            if x is None:
                continue
            if n == "support_ids":
                t = np.empty((len(r), K), dtype=np.int64)
                t[...] = x[eo[r]][:, None]  # padding repeats the row's first id
                t[valid] = entries(x)
            elif not widen and n in self.stored and self.value_dtype in HALF_FILL:
                # Kept as stored: the padding is −inf's bit pattern, the tensor is viewed as its 16-bit dtype.
                t = np.full((len(r), K), HALF_FILL[self.value_dtype][0], dtype=np.uint16)
                t[valid] = entries(x).view(np.uint16)
                out[n] = torch.from_numpy(t).view(HALF_FILL[self.value_dtype][1])
                continue
            else:
                t = np.full((len(r), K), -np.inf, dtype=np.float32)
                src = entries(x)
                if n in self.stored and self.value_dtype == "bfloat16":  # numpy has no bfloat16
                    src = schema.decode_values(src, "bfloat16").numpy()
                t[valid] = src.astype(np.float32, copy=False)  # converted first: numpy's casting store is slower
            out[n] = torch.from_numpy(t)
        for n in ROW_ARRAYS:
            if n in a:
                out[n] = a[n][rt]
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
        if m.get("tail_proposal", "teacher") not in schema.TAIL_PROPOSALS:
            raise CacheFormatError(
                f"{mpath}: tail_proposal {m.get('tail_proposal')!r} is not known to this deltakd; upgrade deltakd"
            )
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

    def _require_student(self) -> None:
        if not self.has_student:
            raise CacheFormatError(
                f"{self.root}: the cache holds no student-base arrays; run `deltakd cache add-student`"
            )

    @property
    def tail_proposal(self) -> str:
        """Where the tail samples were drawn from: "teacher" (πT's tail), "target" (π* at schema.PROPOSAL_ALPHA)
        or "mixture" (half of each)."""
        return self.manifest.get("tail_proposal", "teacher")

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

    def mass_outside(self, key: str, shard: int = 0) -> np.ndarray:
        """Each supervised row's mass outside the stored ids (its tail bucket) in one shard, float32:
        key "ft", "base" (teacher arrays) or "s0" (student arrays)."""
        name, array, student = self.shard_names[shard], f"tail_{key}", key == "s0"
        if student:
            self._require_student()
        group = self.root / (schema.STUDENT_DIR if student else schema.TEACHER_DIR) / name
        # The same checks as any other read: listed files, dtype and row count, then finite values.
        if self.verify:
            integrity.check_files(self.root, self.manifest, name, [] if student else [array], student)
        try:
            raw = schema.read_group(group, [array])
        except CacheFormatError as e:  # a chunk failing its crc32c, or not decodable
            raise CacheFormatError(f"{e}; {integrity.hint(self.root)}") from e
        if self.verify:
            integrity.check_raw(self.root, self.manifest, name, raw)
        tail = schema.decode_values(raw[array], self.manifest["value_dtype"])
        if self.verify:
            integrity.check_values(self.root, name, {array: tail}, self.version)
        return tail.float().exp().numpy()

    def read_shard(self, name: str, student: bool | None = None, arrays: list[str] | None = None) -> ShardData:
        """Decode a whole shard; arrays are read in parallel threads (zarr's codecs release the GIL).

        `arrays` limits the teacher arrays read (by their on-disk names); the per-sequence
        arrays are always read.
        """
        student = self.has_student if student is None else student
        if student:
            self._require_student()
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
        if student:
            self._require_student()
        rows = np.asarray(rows, dtype=np.int64)
        off, sup = index.arrays["seq_offsets"].numpy(), index.sup_offsets
        # Each run of consecutive rows is one range of tokens, of supervised rows and of entries.
        first, end = runs(rows)
        ranges = {"token": (off[first], off[end]), "sup": (sup[first], sup[end])}
        tdir, sdir = self.root / schema.TEACHER_DIR / name, self.root / schema.STUDENT_DIR / name
        if self.version >= 2:  # ragged supports: row i owns support_len[i] entries
            lens = schema.read_group(tdir, ["support_len"])["support_len"].astype(np.int64)
            ent = np.concatenate([[0], np.cumsum(lens)])
            ranges["entry"] = (ent[ranges["sup"][0]], ent[ranges["sup"][1]])
        jobs = [
            (tdir, n, ranges[spec[0]])
            for n, spec in schema.arrays_of(self.version, False, self.manifest).items()
            if spec[0] in ranges and n != "loss_mask"
        ]
        if student:
            jobs += [
                (sdir, n, ranges[spec[0]])
                for n, spec in schema.arrays_of(self.version, True).items()
                if n != "tail_star" or self.alphas
            ]
        if self.verify:
            integrity.check_files(self.root, self.manifest, name, [n for d, n, _ in jobs if d == tdir], student)
        # Version 2's entry arrays stay as stored (ShardData.rows converts a batch's own entries); they are
        # checked in the thread that read them, while the other arrays decode, not after all of them.
        tables = (schema.arrays_of(self.version, False, self.manifest), schema.arrays_of(self.version, True))
        kept = {n for t in tables for n, spec in t.items() if spec[0] == "entry"} if self.version >= 2 else set()

        def read(job) -> np.ndarray:
            try:
                a = read_ranges(*job[:2], *job[2])
            except CacheFormatError as e:  # a chunk failing its crc32c, or not decodable
                raise CacheFormatError(f"{e}; {integrity.hint(self.root)}") from e
            if self.verify and job[1] in kept:
                integrity.check_raw(self.root, self.manifest, name, {job[1]: a}, rows=False)
                integrity.check_stored(self.root, name, {job[1]: a}, self.manifest)
            return a

        with ThreadPoolExecutor(self.threads) as ex:
            raw = dict(zip([n for _, n, _ in jobs], ex.map(read, jobs)))
        if self.verify:
            integrity.check_raw(
                self.root, self.manifest, name, {n: a for n, a in raw.items() if n not in kept}, rows=False
            )
        raw["seq_offsets"] = np.concatenate([[0], np.cumsum(off[rows + 1] - off[rows])]).astype(np.int64)
        raw["loss_mask"] = take_ranges(index.arrays["loss_mask"].numpy(), *ranges["token"]).astype(np.uint8)
        raw["example_ids"] = index.arrays["example_ids"].numpy()[rows]
        data = self._decode(raw, keep_entries=self.version >= 2)
        if self.verify:  # the kept entry arrays were checked as they were read
            integrity.check_values(self.root, name, data.arrays, self.version)
        return data

    def _decode(self, raw: dict[str, np.ndarray], keep_entries: bool = False) -> ShardData:
        vd = self.manifest["value_dtype"]
        spec = {**schema.arrays_of(self.version, False), **schema.arrays_of(self.version, True)}
        out, stored = {}, {}
        for n, a in raw.items():
            kind = spec[n][2]
            if keep_entries and spec[n][0] == "entry":
                stored[n] = a
            elif kind == "value":
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
        return ShardData(out, rows, entry_offsets, stored, vd)

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


def runs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, end): the runs of consecutive values of `rows`, run i being first[i]:end[i]."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return rows, rows
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    return rows[np.r_[0, cut]], rows[np.r_[cut, len(rows)] - 1] + 1


def arange_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) for each pair, without a Python loop."""
    lens = ends - starts
    if lens.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    return np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())


def take_ranges(a: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of a[s:e] for each pair (a view when there is one range)."""
    if len(starts) == 1:
        return a[int(starts[0]) : int(ends[0])]
    return np.concatenate([a[:0]] + [a[s:e] for s, e in zip(starts.tolist(), ends.tolist())])


def read_ranges(group_dir: Path, name: str, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Rows starts[i]:ends[i] of one array (ascending, disjoint ranges), concatenated; zarr decodes
    only the chunks that hold them.

    One contiguous read per run of chunks holding rows (zarr's own selection by index is much
    slower per row), split where whole chunks hold none of the rows, so those are never decoded:
    a data-parallel rank reads its ~1/world block of a shard, and now and then a few rows elsewhere.
    """
    import zarr

    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    try:
        arr = zarr.open_group(store.zarr_store(group_dir, read_only=True), mode="r", zarr_format=3)[name]
        if not len(starts):
            return np.zeros((0,) + arr.shape[1:], dtype=arr.dtype)
        c = arr.chunks[0]
        new_read = np.flatnonzero(starts[1:] // c - (ends[:-1] - 1) // c > 1) + 1
        parts = []
        for i, j in zip(np.r_[0, new_read].tolist(), np.r_[new_read, len(starts)].tolist()):
            lo = int(starts[i])
            block = arr[lo : int(ends[j - 1])]
            parts.append(take_ranges(block, starts[i:j] - lo, ends[i:j] - lo))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    except Exception as e:
        if remote.network_failure(e) is not None:  # a store that did not answer is not a damaged cache
            remote.doing_note(e, "reading", f"{group_dir}/{name}")
            raise
        raise CacheFormatError(f"{group_dir}/{name}: cannot read rows ({type(e).__name__}: {e})") from e
