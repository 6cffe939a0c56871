"""Stream a cache as padded token batches with aligned targets, for one rank of N.

Batch plan: per epoch, the shards are visited in a seeded order; inside a shard, the
rows are permuted, cut into windows of `window` rows, each window sorted by length
and packed into batches of at most `batch_tokens` padded tokens (little padding);
the batches of a shard are then shuffled. All ranks compute the same global batch
sequence and rank r takes batches r, r+N, r+2N, ...: a step over N ranks sees the
same batches as one rank accumulating N micro-batches. A rank plans a shard from its
small per-sequence arrays, then reads and converts only the rows of its own batches.

The loader position {epoch, shard, batch, index} is exact: a resumed run rebuilds
the shard's plan from the seed and skips to the batch, replaying nothing.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from deltakd.cache.reader import CacheReader, ShardData

TARGET_KEYS = ("support_ids", "valid", "logp_ft", "logp_base", "tail_ft", "tail_base", "sampled", "sample_tau")
STUDENT_KEYS = ("logp_s0", "tail_s0", "tail_star")


@dataclass
class Batch:
    input_ids: torch.Tensor       # (B, L) int64, right-padded
    attention_mask: torch.Tensor  # (B, L) int64
    loss_mask: torch.Tensor       # (B, L) bool; hidden[loss_mask] lines up with the target rows
    targets: dict                 # (N_sup, K) support / (N_sup,) tail tensors, batch-major; next_tokens (N_sup,)
    example_ids: list
    state: dict                   # loader position after this batch
    counts: tuple | None = None   # (supervised, tokens), taken on the host so that no step syncs for them

    @property
    def n_supervised(self) -> int:
        return self.counts[0] if self.counts else int(self.loss_mask.sum())

    @property
    def n_tokens(self) -> int:
        return self.counts[1] if self.counts else int(self.attention_mask.sum())

    def pin_memory(self) -> "Batch":
        """Page-locked host copies (loader thread), so that `to(cuda, non_blocking=True)` is asynchronous."""
        pin = lambda t: t.pin_memory()  # noqa: E731
        return Batch(pin(self.input_ids), pin(self.attention_mask), pin(self.loss_mask),
                     {k: pin(v) for k, v in self.targets.items()}, self.example_ids, self.state,
                     (self.n_supervised, self.n_tokens))

    def to(self, device, non_blocking: bool = False):
        mv = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.attention_mask), mv(self.loss_mask),
                     {k: mv(v) for k, v in self.targets.items()}, self.example_ids, self.state,
                     (self.n_supervised, self.n_tokens))


def in_split(example_ids: np.ndarray, split: str, eval_percent: float) -> np.ndarray:
    """Held-out rows: a fixed hash of the example id, so the split never depends on sharding."""
    h = (example_ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(10000)
    held = h < np.uint64(int(eval_percent * 100))
    return held if split == "eval" else ~held


def plan_shard(lengths: np.ndarray, rows: np.ndarray, batch_tokens: int, window: int, rng) -> list[list[int]]:
    """Batches (lists of row indices) of one shard, under a padded-token budget."""
    if rng is not None:
        rows = rows[rng.permutation(len(rows))]
    batches = []
    for s in range(0, len(rows), window):
        w = rows[s:s + window]
        w = w[np.argsort(lengths[w], kind="stable")]
        cur, longest = [], 0
        for r in w.tolist():
            longest_new = max(longest, int(lengths[r]))
            if cur and longest_new * (len(cur) + 1) > batch_tokens:
                batches.append(cur)
                cur, longest_new = [], int(lengths[r])
            cur.append(r)
            longest = longest_new
        if cur:
            batches.append(cur)
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def collate(shard: ShardData, rows: list[int], pad_id: int, with_student: bool) -> tuple:
    a = shard.arrays
    off = a["seq_offsets"]
    L = max(int(off[r + 1] - off[r]) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), L), dtype=torch.long)
    msk = torch.zeros((len(rows), L), dtype=torch.bool)
    nxt = torch.zeros((len(rows), L), dtype=torch.long)
    sup_rows = []
    for i, r in enumerate(rows):
        t0, t1 = int(off[r]), int(off[r + 1])
        n = t1 - t0
        ids[i, :n] = a["tokens"][t0:t1]
        att[i, :n] = 1
        msk[i, :n] = a["loss_mask"][t0:t1]
        nxt[i, :n - 1] = a["tokens"][t0 + 1:t1]
        sup_rows.append(torch.arange(int(shard.sup_offsets[r]), int(shard.sup_offsets[r + 1])))
    got = shard.rows(torch.cat(sup_rows))  # supports padded to the batch's widest row
    keys = TARGET_KEYS + (STUDENT_KEYS if with_student else ())
    targets = {k: got[k] for k in keys if k in got}
    targets["next_tokens"] = nxt[msk]
    assert targets["support_ids"].shape[0] == int(msk.sum()), "cached rows do not line up with the loss mask"
    return ids, att, msk, targets, [int(a["example_ids"][r]) for r in rows]


class StreamingLoader:
    """Endless iterator of this rank's batches, prefetched by a background thread."""

    def __init__(self, reader: CacheReader, batch_tokens: int, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True, split: str = "train", eval_percent: float = 0.0, with_student: bool = False,
                 pad_id: int = 0, window: int = 256, prefetch: int = 8, state: dict | None = None, epochs: int | None = None,
                 pin_memory: bool = False):
        self.reader, self.batch_tokens, self.rank, self.world = reader, batch_tokens, rank, world
        self.seed, self.shuffle, self.split, self.eval_percent = seed, shuffle, split, eval_percent
        self.with_student, self.pad_id, self.window, self.epochs = with_student, pad_id, window, epochs
        self.start = dict(state or {"epoch": 0, "shard": 0, "batch": 0, "index": 0})
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self._q: queue.Queue | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ planning
    def _shard_index(self, name: str) -> ShardData:
        """The small per-sequence arrays a plan needs (no per-position targets)."""
        return self.reader.read_shard(name, student=False, arrays=["seq_offsets", "loss_mask", "example_ids"])

    def _shard_plan(self, name: str, shard_pos: int, epoch: int, index: ShardData | None = None):
        a = (index or self._shard_index(name)).arrays
        lengths = (a["seq_offsets"][1:] - a["seq_offsets"][:-1]).numpy()
        rows = np.nonzero(in_split(a["example_ids"].numpy(), self.split, self.eval_percent))[0]
        rng = np.random.default_rng([self.seed, epoch, shard_pos]) if self.shuffle else None
        return plan_shard(lengths, rows, self.batch_tokens, self.window, rng)

    def batches_per_epoch(self) -> int:
        """Global batches in one epoch (all ranks); reads only the small per-sequence arrays."""
        names = self.reader.shard_order(shuffle=self.shuffle, seed=self.seed, epoch=0)
        return sum(len(self._shard_plan(n, i, 0)) for i, n in enumerate(names))

    # ------------------------------------------------------------ producing
    def _produce(self):
        epoch, index = self.start["epoch"], self.start["index"]
        shard0, batch0 = self.start["shard"], self.start["batch"]  # where a resumed run picks up
        while not self._stop.is_set() and (self.epochs is None or epoch < self.epochs):
            names = self.reader.shard_order(shuffle=self.shuffle, seed=self.seed, epoch=epoch)
            for sp in range(shard0, len(names)):
                idx = self._shard_index(names[sp])
                plan = self._shard_plan(names[sp], sp, epoch, idx)
                # Global batch b of this shard has global index `index + (b - batch0)`.
                mine = [b for b in range(batch0, len(plan)) if (index + b - batch0) % self.world == self.rank]
                index += len(plan) - batch0
                if mine:
                    rows = np.unique(np.concatenate([plan[b] for b in mine]))
                    shard = self.reader.read_rows(names[sp], idx, rows, student=self.with_student)
                    at = np.full(len(idx.sup_offsets) - 1, -1, dtype=np.int64)
                    at[rows] = np.arange(len(rows))  # shard row -> row of the compact read
                for b in mine:
                    ids, att, msk, tg, ex = collate(shard, at[plan[b]].tolist(), self.pad_id, self.with_student)
                    done = index - (len(plan) - b - 1)  # global index after batch b
                    batch = Batch(ids, att, msk, tg, ex, {"epoch": epoch, "shard": sp, "batch": b + 1, "index": done},
                                  (int(msk.sum()), int(att.sum())))
                    self._put(batch.pin_memory() if self.pin_memory else batch)
                    if self._stop.is_set():
                        return
                batch0 = 0
            shard0 = 0
            epoch += 1
        self._put(None)

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self):
        try:
            self._produce()
        except BaseException as e:  # re-raised in the consumer, never swallowed
            self._error = e
            self._put(None)

    def __iter__(self):
        self.close()
        self._stop.clear()
        self._q = queue.Queue(self.prefetch)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        while True:
            item = self._q.get()
            if item is None:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def close(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
