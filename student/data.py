"""Stream a cache as padded token batches with aligned targets, for one rank of N.

Batch plan: per epoch, the shards are visited in a seeded order. A step of training
consumes M = world × accum micro-batches (global indices t·M … t·M + M − 1; rank r's
micro-batch i is index t·M + i·world + r). Inside a shard, the rows are cut into M
*lanes*: contiguous row ranges of about equal token count. Each lane is planned as
one shard used to be: its rows permuted, cut into windows of `window` rows, each
window sorted by length and packed into batches of at most `batch_tokens` padded
tokens, the lane's batches shuffled. The shard's global batch list takes the lanes in
turn, so that global index g reads lane g mod M: rank r's lanes are the same in every
shard, and `lane_ranges` places them so that one rank's lanes are one contiguous
~1/world of the shard (see `lane_range_of`). A rank plans a shard from its small
per-sequence arrays, then reads only the rows of its own batches: zarr decodes the
chunks holding that ~1/world, not the whole shard. With M = 1 (one process, no
accumulation) the plan is exactly the single-lane plan of earlier versions.

The plan depends on M only, never on how M splits into ranks and accumulation: one
rank accumulating N micro-batches sees the same global batches as N ranks with one
micro-batch each (and as 2 ranks accumulating N/2). Lanes' batch counts differ a
little: when a position's lane has run out, it takes the next batch of the lane with
the most batches to spare (nearest in the shard first); such a batch may be another
rank's rows, read on their own (a few chunks more).

Threads: one thread plans the next shard and reads it (zarr decodes, the reader verifies)
while `workers` threads build this shard's batches (numpy, no torch intra-op threads); the
batches are queued in plan order, so threads change no batch, only when it is ready.

The loader position {epoch, shard, batch, index} is exact: a resumed run rebuilds
the shard's plan from the seed and skips to the batch, replaying nothing. A rank
resumed from any rank's position starts at the next round of `world` global batches,
so the trainer's one saved position (rank 0's last micro-batch of a step) resumes
every rank at the next step.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from deltakd.cache.format.reader import CacheReader, ShardData, arange_ranges, take_ranges

TARGET_KEYS = ("support_ids", "valid", "logp_ft", "logp_base", "tail_ft", "tail_base", "sampled", "sample_tau")
STUDENT_KEYS = ("logp_s0", "tail_s0", "tail_star")


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) int64, right-padded
    attention_mask: torch.Tensor  # (B, L) int64
    loss_mask: torch.Tensor  # (B, L) bool; hidden[loss_mask] lines up with the target rows
    targets: dict  # (N_sup, K) support / (N_sup,) tail tensors, batch-major; next_tokens (N_sup,)
    example_ids: list
    state: dict  # loader position after this batch
    counts: tuple | None = None  # (supervised, tokens), taken on the host so that no step syncs for them

    @property
    def n_supervised(self) -> int:
        return self.counts[0] if self.counts else int(self.loss_mask.sum())

    @property
    def n_tokens(self) -> int:
        return self.counts[1] if self.counts else int(self.attention_mask.sum())

    def pin_memory(self) -> Batch:
        """Page-locked host copies (loader thread), so that `to(cuda, non_blocking=True)` is asynchronous."""
        pin = lambda t: t.pin_memory()  # noqa: E731
        return Batch(
            pin(self.input_ids),
            pin(self.attention_mask),
            pin(self.loss_mask),
            {k: pin(v) for k, v in self.targets.items()},
            self.example_ids,
            self.state,
            (self.n_supervised, self.n_tokens),
        )

    def to(self, device, non_blocking: bool = False):
        """On `device`; targets carried in 16 bits (StreamingLoader's half_targets) become float32 there."""
        mv = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        wide = lambda t: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t  # noqa: E731
        return Batch(
            mv(self.input_ids),
            mv(self.attention_mask),
            mv(self.loss_mask),
            {k: wide(mv(v)) for k, v in self.targets.items()},
            self.example_ids,
            self.state,
            (self.n_supervised, self.n_tokens),
        )


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
        w = rows[s : s + window]
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


def _prime_factors(m: int) -> list[int]:
    out, p = [], 2
    while p * p <= m:
        while m % p == 0:
            out.append(p)
            m //= p
        p += 1
    return out + ([m] if m > 1 else [])


def lane_range_of(m: int) -> list[int]:
    """For each of m lanes, the number of its row range in the shard (a permutation of range(m)).

    Rank r of `world` reads lanes r, r + world, r + 2·world, ... Mixed-radix digit
    reversal over m's prime factors (ascending; bit reversal when m is a power of two)
    maps those lanes onto one contiguous block of ranges whenever world is a product of
    m's smallest prime factors: any power-of-two world when m is one, every world = m,
    world 1. Other splits (3 ranks × 2) give a rank a few blocks, each read on its own.
    It depends on m alone, so that every split of m into ranks × accumulation plans alike.
    """
    radices = _prime_factors(m)
    out = []
    for lane in range(m):
        r = 0
        for b in radices:  # lane's least significant digit becomes the range's most significant
            r, lane = r * b + lane % b, lane // b
        out.append(r)
    return out


def lane_ranges(lengths: np.ndarray, rows: np.ndarray, m: int) -> list[np.ndarray]:
    """`rows` (ascending) cut into m contiguous pieces of about equal token count; some empty when rows < m.

    A row belongs to the piece in which its middle token falls, so the pieces' token
    counts differ by at most about one sequence."""
    if m == 1 or len(rows) == 0:
        return [rows] + [rows[:0]] * (m - 1)
    tok = lengths[rows].astype(np.float64)
    mid = np.cumsum(tok) - tok / 2
    piece = np.minimum((mid * m / tok.sum()).astype(np.int64), m - 1)
    return [rows[piece == j] for j in range(m)]


def plan_lanes(
    lengths: np.ndarray, rows: np.ndarray, batch_tokens: int, window: int, rng, m: int
) -> list[list[list[int]]]:
    """Each lane's batches (as `plan_shard`, one rng consumed lane by lane: m = 1 is `plan_shard`)."""
    pieces, where = lane_ranges(lengths, rows, m), lane_range_of(m)
    return [plan_shard(lengths, pieces[where[lane]], batch_tokens, window, rng) for lane in range(m)]


def interleave(lanes: list[list[list[int]]], first: int = 0) -> list[list[int]]:
    """One shard's global batch list: position p (global index g = start + p, first = start mod m) reads lane g mod m.

    While every lane has batches this is round robin. Once a position's lane has run
    out it takes the next batch of the lane with the largest surplus (batches left
    minus positions left that read it); stealing only from a surplus never leaves that
    lane short later, so the number of substituted positions is the least possible:
    the sum of the lanes' shortfalls. Among lanes of equal surplus the one whose row
    range is nearest wins: likely the same rank's rows, read anyway.
    """
    m = len(lanes)
    total = sum(len(b) for b in lanes)
    where = lane_range_of(m)
    taken = [0] * m
    wants = [0] * m  # positions left that read each lane
    for p in range(total):
        wants[(first + p) % m] += 1
    out = []
    for p in range(total):
        lane = (first + p) % m
        wants[lane] -= 1
        if taken[lane] == len(lanes[lane]):
            surplus = [len(lanes[k]) - taken[k] - wants[k] for k in range(m)]
            lane = max(range(m), key=lambda k: (surplus[k], -abs(where[k] - where[lane]), -k))
        out.append(lanes[lane][taken[lane]])
        taken[lane] += 1
    assert taken == [len(b) for b in lanes]
    return out


def in_order(pool: ThreadPoolExecutor, fn, items, ahead: int):
    """fn(*item) for each item on a thread pool, results in order, at most `ahead` submitted and not yet taken."""
    pending = deque()
    for item in items:
        pending.append(pool.submit(fn, *item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def collate(
    shard: ShardData, rows: np.ndarray | list[int], pad_id: int, with_student: bool, widen: bool = True
) -> tuple:
    """(input ids, attention mask, loss mask, targets, example ids) of sequences `rows` of a shard; `widen`
    as ShardData.rows."""
    a = shard.arrays
    rows = np.asarray(rows, dtype=np.int64)
    off = a["seq_offsets"].numpy()
    t0, t1 = off[rows], off[rows + 1]
    n = t1 - t0
    col = np.arange(int(n.max()))
    # Ragged -> padded with one boolean-mask store per array: row i's first n[i] columns
    # take its tokens (concatenated by take_ranges), the rest keeps the fill value.
    real, has_next = col[None, :] < n[:, None], col[None, :] < n[:, None] - 1  # (B, L)
    tokens = a["tokens"].numpy()
    ids = np.full(real.shape, pad_id, dtype=np.int64)
    ids[real] = take_ranges(tokens, t0, t1)
    nxt = np.zeros(real.shape, dtype=np.int64)
    nxt[has_next] = take_ranges(tokens, t0 + 1, t1)
    msk = np.zeros(real.shape, dtype=bool)
    msk[real] = take_ranges(a["loss_mask"].numpy(), t0, t1)
    sup = shard.sup_offsets
    got = shard.rows(arange_ranges(sup[rows], sup[rows + 1]), widen)  # supports padded to the widest row
    keys = TARGET_KEYS + (STUDENT_KEYS if with_student else ())
    targets = {k: got[k] for k in keys if k in got}
    msk = torch.from_numpy(msk)
    targets["next_tokens"] = torch.from_numpy(nxt)[msk]
    assert targets["support_ids"].shape[0] == int(msk.sum()), "cached rows do not line up with the loss mask"
    att = torch.from_numpy(real.astype(np.int64))
    return torch.from_numpy(ids), att, msk, targets, a["example_ids"].numpy()[rows].tolist()


class StreamingLoader:
    """Endless iterator of this rank's batches, prefetched by a background thread."""

    def __init__(
        self,
        reader: CacheReader,
        batch_tokens: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        split: str = "train",
        eval_percent: float = 0.0,
        with_student: bool = False,
        pad_id: int = 0,
        window: int = 256,
        prefetch: int = 8,
        state: dict | None = None,
        epochs: int | None = None,
        pin_memory: bool = False,
        accum: int = 1,
        workers: int = 2,
        half_targets: bool = False,
    ):
        if not (0 <= rank < world) or accum < 1:
            raise ValueError(f"rank {rank} of world {world} with accum {accum}: need 0 <= rank < world and accum >= 1")
        self.reader, self.batch_tokens, self.rank, self.world = reader, batch_tokens, rank, world
        # Micro-batches per optimizer step over all ranks: the plan's lanes (see the module docstring).
        self.lanes = world * accum
        self.seed, self.shuffle, self.split, self.eval_percent = seed, shuffle, split, eval_percent
        self.with_student, self.pad_id, self.window, self.epochs = with_student, pad_id, window, epochs
        self.start = dict(state or {"epoch": 0, "shard": 0, "batch": 0, "index": 0})
        self.prefetch, self.pin_memory, self.workers = prefetch, pin_memory, workers
        # Per-entry log-probs as the cache stores them (16 bits), widened by Batch.to on the device: 42% less
        # collate work and half the pinned bytes; the values are the same.
        self.half_targets = half_targets
        self._q: queue.Queue | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ planning
    def _shard_index(self, name: str) -> ShardData:
        """The small per-sequence arrays a plan needs (no per-position targets)."""
        return self.reader.read_shard(name, student=False, arrays=["seq_offsets", "loss_mask", "example_ids"])

    def _shard_lanes(self, name: str, shard_pos: int, epoch: int, index: ShardData | None = None):
        a = (index or self._shard_index(name)).arrays
        lengths = (a["seq_offsets"][1:] - a["seq_offsets"][:-1]).numpy()
        rows = np.nonzero(in_split(a["example_ids"].numpy(), self.split, self.eval_percent))[0]
        rng = np.random.default_rng([self.seed, epoch, shard_pos]) if self.shuffle else None
        return plan_lanes(lengths, rows, self.batch_tokens, self.window, rng, self.lanes)

    def _shard_plan(self, name: str, shard_pos: int, epoch: int, start: int, index: ShardData | None = None):
        """The shard's global batch list, when its first batch has global index `start`."""
        return interleave(self._shard_lanes(name, shard_pos, epoch, index), start % self.lanes)

    def batches_per_epoch(self) -> int:
        """Global batches in one epoch (all ranks); reads only the small per-sequence arrays."""
        names = self.reader.shard_order(shuffle=self.shuffle, seed=self.seed, epoch=0)
        return sum(len(b) for i, n in enumerate(names) for b in self._shard_lanes(n, i, 0))

    # ------------------------------------------------------------ producing
    def _positions(self):
        """(epoch, shard position, shard name, first batch) of each shard to stream, in order."""
        epoch, shard0, batch0 = self.start["epoch"], self.start["shard"], self.start["batch"]  # a resumed run
        while not self._stop.is_set() and (self.epochs is None or epoch < self.epochs):
            names = self.reader.shard_order(shuffle=self.shuffle, seed=self.seed, epoch=epoch)
            for sp in range(shard0, len(names)):
                yield epoch, sp, names[sp], batch0
                batch0 = 0
            shard0 = 0
            epoch += 1

    def _read(self, pos: tuple, start: int, first: int) -> tuple:
        """Plan a shard whose batch 0 has global index `start`, and read this rank's rows of it."""
        epoch, sp, name, batch0 = pos
        idx = self._shard_index(name)
        plan = self._shard_plan(name, sp, epoch, start, idx)
        mine = [b for b in range(batch0, len(plan)) if start + b >= first and (start + b) % self.world == self.rank]
        if not mine:
            return plan, mine, None, None
        rows = np.unique(np.concatenate([plan[b] for b in mine]))
        shard = self.reader.read_rows(name, idx, rows, student=self.with_student)
        at = np.full(len(idx.sup_offsets) - 1, -1, dtype=np.int64)
        at[rows] = np.arange(len(rows))  # shard row -> row of the compact read
        return plan, mine, shard, at

    def _batch(self, shard: ShardData, rows: np.ndarray, state: dict) -> Batch:
        ids, att, msk, tg, ex = collate(shard, rows, self.pad_id, self.with_student, not self.half_targets)
        batch = Batch(ids, att, msk, tg, ex, state, (int(msk.sum()), int(att.sum())))
        return batch.pin_memory() if self.pin_memory else batch

    def _produce(self):
        index = self.start["index"]
        # A position saved by any rank resumes at the next round of `world` batches: the
        # trainer saves rank 0's last micro-batch of a step, whose round ends the step.
        first = -(-index // self.world) * self.world
        positions = self._positions()
        # One thread reads (decodes) the next shard while `workers` threads build this
        # shard's batches; batches are queued in plan order, so threads change no batch.
        with ThreadPoolExecutor(1) as reads, ThreadPoolExecutor(self.workers) as builds:
            pos = next(positions, None)
            ahead = reads.submit(self._read, pos, index - pos[3], first) if pos else None
            while ahead is not None:
                epoch, sp, _, batch0 = pos
                start = index - batch0  # global index of the shard's batch 0
                plan, mine, shard, at = ahead.result()
                index = start + len(plan)
                pos = next(positions, None) if not self._stop.is_set() else None
                ahead = reads.submit(self._read, pos, index - pos[3], first) if pos else None
                work = [
                    (shard, at[plan[b]], {"epoch": epoch, "shard": sp, "batch": b + 1, "index": start + b + 1})
                    for b in mine
                ]
                for batch in in_order(builds, self._batch, work, self.workers + 1):
                    self._put(batch)
                    if self._stop.is_set():
                        return
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
                self._thread.join()  # the producer has finished: no thread outlives the iteration
                if self._error is not None:
                    raise self._error
                return
            yield item

    def close(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
