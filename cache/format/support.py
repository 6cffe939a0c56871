"""Log-probs on a support of token ids, and the log-mass outside it: pure tensor code.

This is the one computation the cache builder (writing a cache) and the student
trainer (reading it, with gradients) share, so it lives beside the format and runs
no model. Supports are ragged (a different number of ids per position): in memory
a batch of rows is padded to the widest row, with `valid` marking the real entries
and padded ids repeating the row's first id (scattering into a repeated id is
harmless, see below).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass
class SupportParts:
    """What `support_logprobs` leaves behind for an analytic gradient (see student/objective.py)."""

    e_tail: torch.Tensor  # (c, V) exp(logit − m) outside the support, 0 on it (the consumed logits)
    e_s: torch.Tensor  # (c, K) exp(logit − m) at the support ids
    Z: torch.Tensor  # (c,)  Σ_j exp(logit_j − m)
    m: torch.Tensor  # (c,)  row maximum
    tail_sum: torch.Tensor  # (c,) Σ_{j ∉ S} exp(logit_j − m)


def support_logprobs(
    logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor | None = None, row_max: torch.Tensor | None = None
):
    """(log p at ids (c, K), tail log-mass (c,), log Z (c,), parts) from logits (c, V), consuming them.

    One exp pass, in place (no (c, V) copy): the normaliser and the tail are sums of
    positive terms exp(logit − max), so the tail is exact even when the support holds
    nearly all the mass (no 1 − Σp cancellation). The tail is −inf when the support
    covers the whole vocabulary. Entries where `valid` is False are −inf; their ids
    must repeat an id of the same row (zeroing an entry twice changes nothing).
    log Z is the log normaliser of the logits (so `log p + log Z` gives the logits back).
    `row_max` (c,), when the caller has it, must be logits.amax(1) (it saves that pass).
    """
    assert logits.dim() == 2 and ids.shape[0] == logits.shape[0], (logits.shape, ids.shape)
    top = logits.gather(1, ids)
    m = logits.amax(dim=1) if row_max is None else row_max
    e = logits.sub_(m[:, None]).exp_()  # (c, V), in place
    Z = e.sum(dim=1)
    log_z = Z.log() + m
    e_s = e.gather(1, ids)
    tail_sum = e.scatter_(1, ids, 0.0).sum(dim=1)  # e now holds the tail entries only
    vals = top - log_z[:, None]
    if valid is not None:
        vals = vals.masked_fill(~valid, NEG_INF)
    tail = tail_sum.log() + m - log_z
    return vals, tail, log_z, SupportParts(e, e_s, Z, m, tail_sum)


def masked_tail(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ_{y ∉ ids} p(y) per row from log-probs (c, V), with autograd; −inf (and no NaN
    gradient) when the ids cover the vocabulary. Repeated ids are fine."""
    x = logp.scatter(1, ids, NEG_INF)
    empty = torch.isneginf(x).all(dim=1)
    safe = torch.where(empty[:, None], torch.zeros((), dtype=x.dtype, device=x.device), x)
    return torch.where(empty, torch.full((), NEG_INF, dtype=x.dtype, device=x.device), safe.logsumexp(1))


def pad_ragged(lengths: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gather index (n, K), valid (n, K)) into the entries of rows of `lengths`, concatenated.

    Row i owns entries off[i]:off[i]+lengths[i] with off = cumsum(lengths) − lengths;
    padding points at the row's first entry, so padded ids repeat a real id of the row.
    """
    lengths = lengths.long()
    off = torch.cumsum(lengths, 0) - lengths
    K = int(lengths.max()) if width is None and len(lengths) else (width or 0)
    col = torch.arange(K)
    valid = col[None, :] < lengths[:, None]
    idx = torch.where(valid, off[:, None] + col[None, :], off[:, None])
    return idx, valid


def floored_shift(l_ft: torch.Tensor, l_base: torch.Tensor, floor: float | None) -> torch.Tensor:
    """Δ = max(lT, f) − max(lB, f); plain lT − lB when `floor` is None.

    Where both teachers give a token almost nothing, their ratio is noise; the floor
    caps how far such tokens can move the Delta-KD target (docs/objectives.md).
    """
    if floor is None:
        return l_ft - l_base
    return l_ft.clamp_min(floor) - l_base.clamp_min(floor)
