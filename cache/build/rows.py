"""One chunk of supervised rows from every model at once: the support, its tail samples and every value on it.

Pure tensor code (no model), run by builder._chunk_rows on the logits of each chunk. The
values are defined by the plain formulas (log_softmax, top-k, masks, priority sampling with
torch's exponential_ noise), kept in tests/test_build_speed_paths.py as the reference that
this code must equal to the bit. The work is a few dozen passes over (rows, V) float
tensors for three models, memory-bound, so it is arranged to make as few as possible:

- Rows are done in blocks of about BLOCK_ELEMENTS per (rows, V) tensor on a CPU (the whole
  chunk on a GPU), so that every pass after a block's first reads cache, not memory. Every
  value is a function of its own row and no reduction ever splits a row (a block has at
  least 2 rows unless the chunk has 1), so the blocks change no bit.
- No (rows, V) mask, copy or temporary is made that a value does not need: the support is
  the sorted, de-duplicated (rows, n·k) top-k ids; the tail of πT is a scatter of −inf; the
  row maxima come with the top-k values; each target πS0·exp(α·Δ) is formed once.
- topk_exact and exponential_exact give torch.topk's and exponential_'s results to the bit,
  several times faster on a CPU (see each); on a GPU they are torch's own calls.

Beyond the ragged outputs themselves, nothing here waits for the device: the checks that
decide a fix-up in topk_exact and exponential_exact run on a CPU only.
"""

from __future__ import annotations

import functools
import math

import torch

from deltakd.cache.format.support import floored_shift, support_logprobs

# Elements per (rows, V) tensor in a CPU row block: a block's dozen working tensors stay in cache.
BLOCK_ELEMENTS = 1 << 19


def cpu_paths(device: torch.device) -> bool:
    """Whether the CPU shortcuts apply (row blocks, topk_exact's blocks, exponential_exact's draw).
    Elsewhere torch's own calls run on whole chunks: what the tests check on a CPU by patching this."""
    return device.type == "cpu"


def block_rows(c: int, V: int, device: torch.device) -> int:
    """Rows per block: the whole chunk on an accelerator (fewer, larger kernels), else about BLOCK_ELEMENTS."""
    return max(2, BLOCK_ELEMENTS // max(V, 1)) if cpu_paths(device) else c


def row_blocks(c: int, rows: int):
    """Slices of `rows` rows covering range(c); a last block of 1 row joins the one before it."""
    starts = list(range(0, c, rows))
    if len(starts) > 1 and c - starts[-1] == 1:
        starts.pop()
    return [slice(s, e) for s, e in zip(starts, starts[1:] + [c])]


@torch.no_grad()
def lockstep_rows(
    logits: dict[str, torch.Tensor],
    support: str,
    k: int,
    alphas: tuple[float, ...],
    floor: float | None,
    samples: int = 0,
    min_tail: float = 0.0,
    generator: torch.Generator | None = None,
    mass: float = 0.0,
    min_k: int = 1,
    proposal: str = "teacher",
    proposal_alpha: float = 1.0,
) -> dict[str, torch.Tensor]:
    """One chunk of rows from every model at once: the support and all values on it.

    logits: role ("ft", "base", optional "s0") -> (c, V) float32, consumed in place.
    The support of a row is the top-k of πT ("topk"), or the union of the top-k of πT,
    πB, πS0 and π*_α for each α ("union"); ids ascend within a row. With `mass` in (0, 1)
    each distribution gives only the fewest of its top-k ids whose probability reaches
    `mass` (at least `min_k`; ids tied with the last one kept are kept too, so the set
    does not depend on the order of ties): more ids where it is flat, fewer where it is
    peaked (by_mass). With `samples` = m,
    rows whose πT mass outside that support is at least `min_tail` also get m ids drawn
    from πT's tail by priority sampling (see sample_tail), appended after the top-k ids
    (ascending among themselves); `sample_len` counts them and `sample_tau` is the
    sampling threshold. With `proposal` "target" (student base present, `proposal_alpha` one
    of `alphas`) the ids are drawn from the tail of π* at that α instead, with priorities on
    its unnormalised log-probs lS0 + α·Δ, and rows draw where π*'s mass outside the support
    reaches `min_tail`. With "mixture" they are drawn from ρ = ½·πT/T_T + ½·π*/T_* on the tail
    (T_x: x's mass outside the top ids), a defensive mixture whose importance weights stay
    bounded for πT and for π* alike, and rows draw where either tail reaches `min_tail`.
    With the student base present, `tail_star[:, a]` is the exact
    log Σ_{y∉S} πS0(y)·exp(α_a·Δ(y)) with Δ = floored_shift(lT, lB, floor), unnormalised
    like the logits lS0 + α·Δ it sums. Every tail is the mass outside all stored ids.
    Returns flat tensors: len (c,), ids/ft/base/s0 (E,), tails (c,), tail_star (c, A),
    and with samples sample_len (c,), sample_tau (c,).
    """
    x0 = logits["ft"]
    c, V = x0.shape
    parts = [
        _block(
            {r: z[sl] for r, z in logits.items()},
            support,
            k,
            alphas,
            floor,
            samples,
            min_tail,
            generator,
            mass,
            min_k,
            proposal,
            proposal_alpha,
        )
        for sl in row_blocks(c, block_rows(c, V, x0.device))
    ]
    if len(parts) == 1:
        return {key: v.cpu() for key, v in parts[0].items()}
    return {key: torch.cat([p[key] for p in parts]).cpu() for key in parts[0]}


def _block(
    lg, support, k, alphas, floor, samples, min_tail, generator, mass, min_k, proposal, proposal_alpha
) -> dict[str, torch.Tensor]:
    """lockstep_rows on one block of rows (views into the chunk's logits, consumed in place)."""
    R, V = lg["ft"].shape
    kk = min(k, V)
    tops, row_max = [], {}
    buf = torch.empty_like(lg["ft"]) if cpu_paths(lg["ft"].device) else None
    for r, x in lg.items():
        want_top = r == "ft" or support == "union"
        # One pass of block maxima serves the top-k and the logsumexp (its row max): the
        # log-probs are the logits shifted per row, so the blocks rank the same on both.
        bm = block_maxima(x, kk) if want_top else None
        if bm is not None:
            mx = bm.row_max
        elif buf is not None or not want_top:
            mx = x.amax(1)
        else:
            mx = None  # on a GPU with a top-k: torch.logsumexp finds it, the top-k gives the log-probs' max
        lse = logsumexp_rows(x, mx, buf)  # (R, 1)
        x.sub_(lse)  # log_softmax in place: the logits are not needed again
        if want_top:
            vals, ids = topk_exact(x, kk, block_max=bm)
            tops.append(by_mass(vals, ids, mass, min_k))
            row_max[r] = vals[:, 0]
        else:
            row_max[r] = mx - lse[:, 0]  # max(x − lse) = max(x) − lse: rounding is monotone
    star = "s0" in lg and len(alphas) > 0
    # A CPU block keeps its targets for their tails; on a GPU each is a (c, V) tensor, formed again there.
    keep = buf is not None
    targets = []
    if star:
        shift = floored_shift(lg["ft"], lg["base"], floor)  # (R, V)
        for a in alphas:
            t = torch.mul(shift, a).add_(lg["s0"])  # lS0 + α·Δ, the same float ops in the same order
            m = None
            if support == "union":
                vals, ids = topk_exact(t, kk)
                m = vals[:, 0]
                if mass > 0:  # π*'s own probabilities: one more pass over the block for its normaliser
                    vals = vals - logsumexp_rows(t, m, buf if keep else None)
                tops.append(by_mass(vals, ids, mass, min_k))
            targets.append((a, t if keep else None, m))
        del t
        if keep:
            del shift
    ids, n_top = union_ids(tops, V)  # (R, W) ascending, V past n_top
    out = {}
    if samples > 0:
        top = _pad_first(ids, n_top)
        source, total, draw = lg["ft"], None, None  # πT's log-probs: normalised
        if proposal != "teacher":
            assert star and proposal_alpha in alphas, "a π* proposal needs the student base and its alpha"
            a, t, m = targets[alphas.index(proposal_alpha)]
            star_t = torch.mul(shift, a).add_(lg["s0"]) if t is None else t
            total = logsumexp_rows(star_t, m, buf)[:, 0]  # off a CPU (no buf): torch's logsumexp, m unused
            source = star_t
            if proposal == "mixture":
                source, draw = mixture_proposal(lg["ft"], star_t, total, top, min_tail)
                total = None
            del star_t
        drawn, n_drawn, out["sample_tau"] = sample_tail(
            source, top, samples, min_tail, generator, log_total=total, rows=draw
        )
        del source
        out["sample_len"] = n_drawn
        # The drawn ids go after the row's top-k ids: columns n_top.. (all V there so far).
        ids = torch.cat([ids, torch.full_like(drawn, V)], dim=1)
        ids.scatter_(1, n_top[:, None] + torch.arange(drawn.shape[1], device=ids.device), drawn)
        lengths = n_top + n_drawn
    else:
        lengths = n_top
    valid = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
    ids = torch.where(valid, ids, ids[:, :1])  # padding repeats the row's first id (see support_logprobs)
    out["len"] = lengths
    if star:
        tails = []
        while targets:
            a, t, m = targets.pop(0)
            t = torch.mul(shift, a).add_(lg["s0"]) if t is None else t
            _, tl, log_z, _ = support_logprobs(t, ids, valid, row_max=m)
            tails.append(tl + log_z)
        out["tail_star"] = torch.stack(tails, dim=1)
        del t
    out["ids"] = ids[valid]
    for r, x in lg.items():
        vals, tail, _, _ = support_logprobs(x, ids, valid, row_max=row_max.get(r))
        out[r], out[f"tail_{r}"] = vals[valid], tail
    return out


def mixture_proposal(lt, star, log_z_star, support_ids, min_tail):
    """(log ρ (R, V), rows that draw (R,)) of the defensive mixture ρ = ½·πT/T_T + ½·π*/T_* on the tail.

    lt: log πT; star: π*'s unnormalised log-probs, log_z_star its log normaliser (R,); T_x is x's
    mass outside `support_ids`, where ρ is −inf. A row draws where πT's or π*'s tail holds at least
    `min_tail`; a component with no tail mass (T_x = 0) takes no part in its row.
    """
    neg = float("-inf")
    parts, masses = [], []
    for x in (lt, star):
        t = x.clone().scatter_(1, support_ids, neg)
        m = t.logsumexp(1, keepdim=True)
        # x/T_x on the tail; T_x = 0 gives −inf, not −inf − (−inf)
        parts.append(t.sub_(torch.where(m == neg, math.inf, m)))
        masses.append(m[:, 0])
    draw = torch.maximum(masses[0], masses[1] - log_z_star) >= math.log(max(min_tail, 1e-30))
    return torch.logaddexp(*parts).sub_(math.log(2.0)), draw


def by_mass(logp: torch.Tensor, ids: torch.Tensor, mass: float, min_k: int) -> torch.Tensor:
    """`ids` (R, k), the top ids of one distribution with their log-probs `logp` in descending order,
    cut to the fewest whose probability reaches `mass` (at least `min_k`, and every id tied with the
    last one kept; the top id always); the ids cut are replaced by the row's first id, which the
    union drops as a repeat.
    With `mass` 0, `ids` unchanged."""
    if mass <= 0:
        return ids
    kk = ids.shape[1]
    short = (logp.exp().cumsum(1) < mass).sum(1)  # ids before the one that reaches the mass
    n = (short + 1).clamp(min(min_k, kk), kk)
    last = logp.gather(1, (n - 1)[:, None])  # the value of the last id kept
    keep = logp >= last  # descending: a prefix, extended over ties with the last id kept
    return torch.where(keep, ids, ids[:, :1])


def union_ids(tops: list[torch.Tensor], V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (R, W) ascending and distinct, then V; count (R,)) of the union of the rows of `tops`, W = Σ widths.

    Sorted and de-duplicated; on a CPU, where the W ids are many for the vocabulary (a small
    vocabulary, a large k), marked in a (R, V) mask and read back in order, which is cheaper.
    """
    s = torch.cat(tops, dim=1)  # (R, W)
    R, W = s.shape
    if cpu_paths(s.device) and V <= 32 * W:
        mask = torch.zeros((R, V), dtype=torch.bool).scatter_(1, s, True)
        rows, cols = mask.nonzero(as_tuple=True)  # row-major: ids ascending within a row
        n = torch.bincount(rows, minlength=R)
        out = torch.full((R, W), V, dtype=s.dtype)
        out[rows, torch.arange(len(rows)) - (n.cumsum(0) - n)[rows]] = cols
        return out, n
    s = s.sort(dim=1).values
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    return s.masked_fill_(dup, V).sort(dim=1).values, (~dup).sum(1)


def _pad_first(ids: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """ids with the entries past n[i] replaced by the row's first id (a scatter index, repeats harmless)."""
    return torch.where(torch.arange(ids.shape[1], device=ids.device)[None, :] < n[:, None], ids, ids[:, :1])


@torch.no_grad()
def sample_tail(
    lt: torch.Tensor,
    support_ids: torch.Tensor,
    m: int,
    min_tail: float,
    generator=None,
    log_total: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
):
    """Priority sampling (Duffield, Lund, Thorup 2007) of m ids from πT outside the support.

    (Or from any distribution given by its log-probs `lt`, unnormalised with `log_total` (c,), the
    log of each row's total: the priorities, τ and the weights below are in `lt`'s own units.)

    Each tail id y gets the priority πT(y)/u_y, u_y ~ U(0, 1); the m largest are kept
    and τ is the (m+1)-th largest priority. For any function g of the token,
    Σ_kept g(y)·max(πT(y), τ)/πT(y) is an unbiased estimate of Σ_{y∉S} g(y). The
    student side uses it to spread each target's exact tail mass over the kept ids
    (student/losses.tail_cells). Rows whose tail holds less than `min_tail` of πT draw
    nothing, unless `rows` (c,) says which rows draw. lt: (c, V) log πT; support_ids: (c, W)
    the support (repeats allowed). The noise −log u is one Exp(1) draw per (row, id) from
    `generator`, in row-major order.
    Returns (drawn ids (c, min(m, V)) ascending then V, number drawn (c,), log τ (c,),
    −inf where nothing was drawn or the whole tail was kept).
    """
    c, V = lt.shape
    neg = torch.full((), float("-inf"), device=lt.device)
    tail = lt.clone().scatter_(1, support_ids, float("-inf"))  # log πT off the support
    if rows is None:
        buf = torch.empty_like(tail) if cpu_paths(lt.device) else None
        mx = tail.amax(1) if buf is not None else None
        tail_mass = logsumexp_rows(tail, mx, buf)[:, 0]
        if log_total is not None:
            tail_mass = tail_mass - log_total
        rows = tail_mass >= math.log(max(min_tail, 1e-30))
        del buf
    # log priority = log πT − log u, and −log u ~ Exp(1)
    pri = tail.add_(exponential_exact((c, V), generator, lt.device))
    n = min(m + 1, V)
    top_v, top_i = topk_exact(pri, n, tie_at=min(m, n), redo_inf_ties=False)
    take = torch.isfinite(top_v[:, :m]) & rows[:, None]
    drawn = torch.where(take, top_i[:, :m], V).sort(dim=1).values
    tau = top_v[:, m] if top_v.shape[1] > m else torch.full((c,), float("-inf"), device=lt.device)
    return drawn, take.sum(1), torch.where(rows, tau, neg)


# ---------------------------------------------------------------- torch ops, to the bit, faster on a CPU


def logsumexp_rows(x: torch.Tensor, row_max: torch.Tensor | None, buf: torch.Tensor | None) -> torch.Tensor:
    """torch.logsumexp(x, 1, keepdim=True) to the bit, given row_max = x.amax(1) and a (R, V) scratch `buf`.

    The same float ops as torch's CPU kernel (max, masked to 0 where infinite; Σ exp(x − max);
    log; + max) without its own amax pass and (R, V) temporary. Without both: torch's call.
    """
    if buf is None or row_max is None:
        return x.logsumexp(1, keepdim=True)
    m0 = row_max.masked_fill(row_max.abs() == math.inf, 0.0)[:, None]
    return torch.sub(x, m0, out=buf).exp_().sum(1, keepdim=True).log_().add_(m0)


class BlockMax:
    """Column-block maxima of a CPU tensor (R, V) for topk_exact: block j holds ids j, j + nb, j + 2·nb, ...
    (the first nb·b ids, b per block; the last V mod b ids are always candidates)."""

    def __init__(self, x: torch.Tensor, b: int, nb: int):
        R, V = x.shape
        self.b, self.nb = b, nb
        self.values = x[:, : nb * b].view(R, b, nb).amax(dim=1)  # (R, nb)
        mx = self.values.amax(dim=1)
        self.row_max = torch.maximum(mx, x[:, nb * b :].amax(dim=1)) if nb * b < V else mx


def block_maxima(x: torch.Tensor, k: int, tie_at: int | None = None) -> BlockMax | None:
    """The block maxima topk_exact(x, k, tie_at) uses, or None where it calls torch.topk."""
    R, V = x.shape
    k = min(k, V)
    n = min(max(k, (k if tie_at is None else tie_at) + 1), V)  # values needed: the first k and one past tie_at
    b = int(math.sqrt(V / (n + 1)))  # ids per block: about as many candidates as blocks
    nb = V // b if b else 0
    if not cpu_paths(x.device) or R == 0 or b < 2 or nb < 4 * n:
        return None
    return BlockMax(x, b, nb)


def topk_exact(
    x: torch.Tensor,
    k: int,
    tie_at: int | None = None,
    redo_inf_ties: bool = True,
    block_max: BlockMax | None = None,
):
    """(values (R, k), indices (R, k)) of torch.topk(x, k, dim=1): the same values, in order, and
    the same index set among the first `tie_at` (default k) to the bit.

    torch's CPU topk sorts a copy of every row. Here a row is cut into nb column blocks
    (block j: ids j, j + nb, j + 2·nb, ...); the n = max(k, tie_at + 1) largest values all
    lie in the n blocks with the largest maxima (a block left out has n blocks above it,
    each holding a larger element), so one reduction over the blocks and two top-k over
    about 2·sqrt(n·V) candidates find them. Where the tie_at-th and the next value are equal
    (which of them is kept then depends on torch's sort) or a row holds NaN, the row is
    redone by torch.topk. With redo_inf_ties=False, equal −inf values there are not redone
    (for callers that ignore −inf entries). On a GPU this is torch.topk itself.
    `block_max`: block_maxima(y, k, tie_at) of x or of any y that x is a non-decreasing
    function of, row by row (the logits of log-probs): the blocks rank the same.
    """
    R, V = x.shape
    k = min(k, V)
    t = k if tie_at is None else tie_at
    n = min(max(k, t + 1), V)
    bm = block_maxima(x, k, tie_at) if block_max is None else block_max
    if bm is None:
        return x.topk(k, dim=1)
    offsets, rest = _block_ids(bm.b, bm.nb, V)
    blocks = bm.values.topk(n, dim=1).indices  # (R, n)
    cand = blocks[:, :, None].add(offsets).view(R, -1)  # (R, n·b) the ids of those blocks
    if rest is not None:  # the last V mod b ids belong to no block: always candidates
        cand = torch.cat([cand, rest.expand(R, -1)], dim=1)
    vals, pos = x.gather(1, cand).topk(n, dim=1)
    ids = cand.gather(1, pos)
    redo = vals[:, 0].isnan()  # a NaN ranks first, in its block and among the candidates
    if t < n:
        tie = vals[:, t - 1] == vals[:, t]
        redo |= tie if redo_inf_ties else tie & torch.isfinite(vals[:, t - 1])
    vals, ids = vals[:, :k], ids[:, :k]
    if redo.any():  # host sync: CPU only
        rows = redo.nonzero()[:, 0]
        vals[rows], ids[rows] = x[rows].topk(k, dim=1)
    return vals, ids


@functools.lru_cache(maxsize=16)
def _block_ids(b: int, nb: int, V: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(offsets (1, 1, b) of a block's ids from its first, the ids past the blocks (1, V − nb·b) or None)."""
    return nb * torch.arange(b).view(1, 1, b), torch.arange(nb * b, V).view(1, -1) if nb * b < V else None


def exponential_exact(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """torch.empty(shape, device=device).exponential_(generator=generator), to the bit.

    On a CPU torch draws each element in a serial loop: u = (random64 & (2^53 − 1))·2^−53
    (a uniform double) and −log1p(−u) with the C library's log1p, rounded to float32. Here
    one uniform_ call on a float64 tensor consumes the same random64 per element, log1p is
    vectorised (it may differ from the C library's by an ulp of a double), and the elements
    whose double lies within 64 ulps of a float32 rounding midpoint (about 2 in 10^7) take
    the C library's log1p (math.log1p). `_cpu_draws_match` checks the whole path against
    exponential_ once per process; where it does not hold, exponential_ itself runs.
    """
    device = torch.device(device)
    if not cpu_paths(device) or not _cpu_draws_match():
        return torch.empty(shape, device=device).exponential_(generator=generator)
    return _cpu_exponential(shape, generator)


# Ulps of a double that the vectorised log1p may be from the C library's (both are within 1-2 of exact).
MIDPOINT_ULPS = 64


def _cpu_exponential(shape, generator) -> torch.Tensor:
    neg_u = torch.empty(shape, dtype=torch.float64).uniform_(generator=generator).neg_()
    d = torch.log1p(neg_u)  # log1p(−u) ≤ 0
    out = d.float().neg_()  # float(−d) = −float(d): rounding is symmetric
    # The 29 bits a float32 drops: within MIDPOINT_ULPS of half (2^28) is that near a midpoint.
    low = d.view(torch.int64).sub_(2**28 - MIDPOINT_ULPS).bitwise_and_(2**29 - 1)  # d is spent
    if low.amin() <= 2 * MIDPOINT_ULPS:  # rare: one reduction decides, then the few are found
        at = tuple((low <= 2 * MIDPOINT_ULPS).nonzero().T)
        out[at] = torch.tensor([-math.log1p(v) for v in neg_u[at].tolist()], dtype=torch.float64).float()
    return out


@functools.lru_cache(maxsize=1)
def _cpu_draws_match() -> bool:
    """Whether _cpu_exponential gives exponential_'s values and leaves the generator where it does."""
    a, b = torch.Generator().manual_seed(20250901), torch.Generator().manual_seed(20250901)
    ref = torch.empty(3, 4099).exponential_(generator=a)
    got = _cpu_exponential((3, 4099), b)
    return torch.equal(ref.view(torch.int32), got.view(torch.int32)) and torch.equal(a.get_state(), b.get_state())
