"""The shard plan of a cache build, streamed: memory holds one shard, never the dataset.

    plan = scan(source, tok, max_length, shard_tokens)        # pass 1: identity, counts, shard boundaries
    shards = stage(source, plan, {i: stage_dir}, tok, ...)    # pass 2: token ids of the shards to build
    shards["shard-00003"]                                     # -> list[Sequence], read from its stage file

Records are tokenised and grouped, in data order, into shards of about `shard_tokens`
tokens (`iter_shards`); the grouping depends on the data and the tokenizer alone. Pass 1
reads every record once: it computes the data's identity (a resume on other data is
refused before anything is written), the truncation count, and per shard its number of
records and a digest of its token ids. Pass 2 reads the data again, tokenises only the
records of the shards this rank still has to build and writes each to a stage file,
checking it against pass 1's digest (data that changed in between is refused).
`plan_shards` keeps the whole plan in memory, for small data and benchmarks.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deltakd.cache.format.records import DataError, Record, encode_record, loss_mask_for
from deltakd.cache.format.sources import DataSource, open_records

SEQS_FILE = "seqs.npz"


@dataclass
class Sequence:
    example_id: int
    tokens: list[int]
    loss_mask: list[int]


@dataclass
class Plan:
    shards: list[list[Sequence]]
    n_truncated: int


def encode(rec: Record, tokenizer, max_length: int) -> tuple[Sequence, bool]:
    ids, plen, truncated = encode_record(tokenizer, rec, max_length)
    return Sequence(rec.example_id, ids, loss_mask_for(len(ids), plen)), truncated


def iter_shards(records: Iterable[Record], tokenizer, max_length: int, shard_tokens: int, counts: dict):
    """Shards (lists of sequences) in data order; `counts` accumulates n_records and n_truncated."""
    cur, cur_tokens = [], 0
    for rec in records:
        seq, truncated = encode(rec, tokenizer, max_length)
        counts["n_records"] = counts.get("n_records", 0) + 1
        counts["n_truncated"] = counts.get("n_truncated", 0) + truncated
        cur.append(seq)
        cur_tokens += len(seq.tokens)
        if cur_tokens >= shard_tokens:
            yield cur
            cur, cur_tokens = [], 0
    if cur:
        yield cur


def plan_shards(records, tokenizer, max_length: int, shard_tokens: int) -> Plan:
    counts: dict = {}
    shards = list(iter_shards(records, tokenizer, max_length, shard_tokens, counts))
    return Plan(shards, counts.get("n_truncated", 0))


def digest(seqs: list[Sequence]) -> str:
    h = hashlib.sha256()
    for s in seqs:
        h.update(np.asarray([s.example_id, len(s.tokens)], dtype=np.int64).tobytes())
        h.update(np.asarray(s.tokens, dtype=np.int64).tobytes())
        h.update(np.asarray(s.loss_mask, dtype=np.uint8).tobytes())
    return h.hexdigest()


@dataclass
class ShardPlan:
    """What the cache will hold, without holding it."""

    data: dict  # the data's identity (sources.RecordStream.identity)
    n_records: int
    n_truncated: int
    sizes: list[int] = field(default_factory=list)  # records per shard
    digests: list[str] = field(default_factory=list)  # of each shard's sequences

    @property
    def n_shards(self) -> int:
        return len(self.sizes)


def scan(source: DataSource, tokenizer, max_length: int, shard_tokens: int, progress: bool = True) -> ShardPlan:
    """Pass 1 over the data: identity, counts and shard boundaries."""
    from tqdm import tqdm

    stream = open_records(source)
    counts: dict = {}
    sizes, digests = [], []
    bar = tqdm(desc="plan", unit="rec", disable=not progress, dynamic_ncols=True, leave=False)
    for seqs in iter_shards(_counted(stream, bar), tokenizer, max_length, shard_tokens, counts):
        sizes.append(len(seqs))
        digests.append(digest(seqs))
    bar.close()
    return ShardPlan(stream.identity, counts.get("n_records", 0), counts.get("n_truncated", 0), sizes, digests)


def _counted(records: Iterable[Record], bar) -> Iterator[Record]:
    for rec in records:
        bar.update(1)
        yield rec


def stage(source: DataSource, plan: ShardPlan, dirs: dict[int, Path], tokenizer, max_length: int) -> StagedShards:
    """Pass 2: write the sequences of shards `dirs` (index -> its stage folder, named after the shard) that have
    no stage file yet; a stage file left by an interrupted build is kept when its digest matches."""
    todo = {i: d for i, d in dirs.items() if not _staged(d, plan.digests[i])}
    if todo:
        records = iter(open_records(source))
        last = max(todo)
        for i, size in enumerate(plan.sizes[: last + 1]):
            recs = [r for _, r in zip(range(size), records)]
            if len(recs) < size:
                raise DataError(
                    f"{source.data} changed while the cache was being built (it ended early); run the "
                    "same command again"
                )
            if i not in todo:
                continue  # read, not tokenised
            seqs = [encode(r, tokenizer, max_length)[0] for r in recs]
            if digest(seqs) != plan.digests[i]:
                raise DataError(
                    f"{source.data} changed while the cache was being built (shard {i} differs from the first "
                    "read); run the same command again"
                )
            _write(todo[i], seqs, plan.digests[i])
    return StagedShards(dirs)


def _staged(d: Path, want: str) -> bool:
    p = d / SEQS_FILE
    if not p.is_file():
        return False
    with np.load(p) as z:
        return str(z["digest"]) == want


def _write(d: Path, seqs: list[Sequence], dig: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    # A name of this process's own: ranks that build the same shards (tensor parallel) may write at once.
    tmp = d / f"{SEQS_FILE}.{os.getpid()}.tmp.npz"
    np.savez(
        tmp,
        tokens=np.concatenate([np.asarray(s.tokens, dtype=np.int64) for s in seqs]),
        loss_mask=np.concatenate([np.asarray(s.loss_mask, dtype=np.uint8) for s in seqs]),
        lengths=np.asarray([len(s.tokens) for s in seqs], dtype=np.int64),
        example_ids=np.asarray([s.example_id for s in seqs], dtype=np.int64),
        digest=np.asarray(dig),
    )
    os.replace(tmp, d / SEQS_FILE)


class StagedShards(Mapping):
    """shard name -> its sequences, read from the stage file on each access (one shard in memory at a time)."""

    def __init__(self, dirs: dict[int, Path]):
        self.dirs = {Path(d).name: Path(d) for d in dirs.values()}

    def __getitem__(self, name: str) -> list[Sequence]:
        with np.load(self.dirs[name] / SEQS_FILE) as z:
            off = np.concatenate([[0], np.cumsum(z["lengths"])])
            toks, mask, ids = z["tokens"], z["loss_mask"], z["example_ids"]
            return [
                Sequence(int(ids[i]), toks[off[i] : off[i + 1]].tolist(), mask[off[i] : off[i + 1]].tolist())
                for i in range(len(ids))
            ]

    def __iter__(self):
        return iter(self.dirs)

    def __len__(self) -> int:
        return len(self.dirs)
