"""Run one checkpoint over token batches and keep only what the cache needs.

The (batch x length x vocab) logits are never formed: the decoder's final hidden
states are gathered at supervised positions, then projected to the vocabulary in
chunks of rows, each chunk reduced at once to the support's ids, the log-probs on
it and the tail log-masses (cache/support.py holds the arithmetic shared with the
trainer).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from deltakd.cache.format.support import floored_shift, pad_ragged, support_logprobs

# Checkpoint identity lives with the other input checks, where the student side can use it too.
from deltakd.runtime.checkpoints import CheckpointError  # noqa: E402


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():  # never let a mistyped folder become a model hub lookup
        raise CheckpointError(f"{path}: no such checkpoint folder (the cache side reads local checkpoints only)")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load its tokenizer ({type(e).__name__}: {e})") from e


def output_rows(path: str | Path) -> int:
    """Rows of the output embedding, from config.json alone (no weights loaded)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path))
    v = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", None)
    if v is None:
        raise CheckpointError(f"{path}: config.json has no vocab_size")
    return int(v)


SHARDING = ("none", "auto", "tp", "device_map")


def has_tp_plan(path: str | Path) -> bool:
    """Whether transformers ships a tensor-parallel plan for this architecture (config alone)."""
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(str(path)), "base_model_tp_plan", None))


def resolve_sharding(mode: str, device: str, paths) -> str:
    """How to spread one checkpoint over several GPUs: "none", "tp" or "device_map".

    tp: transformers' tensor parallelism (`tp_plan="auto"`); every torchrun rank of the
    node holds a slice of each layer and all ranks run the same batches. device_map:
    accelerate's `device_map="auto"`; one process per node places whole layers on the
    GPUs it sees. "auto" picks tp under torchrun with several ranks per node when the
    architecture has a plan, else device_map. Refuses, before any weights load, what
    cannot run here.
    """
    if mode not in SHARDING:
        raise ValueError(f"--teacher-sharding {mode!r}: choose one of {', '.join(SHARDING)}")
    if mode == "none":
        return mode
    if not torch.cuda.is_available():
        raise ValueError(
            f"--teacher-sharding {mode} spreads each teacher over GPUs, but no CUDA GPU is visible "
            "(torch.cuda.is_available() is False); use --teacher-sharding none on this machine"
        )
    if torch.device(device).type != "cuda":
        raise ValueError(f"--teacher-sharding {mode} needs --device cuda (got --device {device})")
    from deltakd.runtime import dist

    world, local_world = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    plans = {str(p): has_tp_plan(p) for p in paths}
    if mode == "auto":
        mode = "tp" if dist.under_torchrun() and local_world > 1 and all(plans.values()) else "device_map"
    if mode == "tp":
        if not dist.under_torchrun() or world < 2:
            raise ValueError(
                "--teacher-sharding tp needs one process per GPU: torchrun --nproc_per_node N -m deltakd.cli "
                "cache build ... --device cuda"
            )
        if world != local_world:
            raise ValueError(
                f"--teacher-sharding tp spans the GPUs of one node, and this job has {world} ranks over "
                "several nodes: use --teacher-sharding device_map with torchrun --nproc_per_node 1 per node"
            )
        missing = [p for p, ok in plans.items() if not ok]
        if missing:
            raise ValueError(
                f"{missing[0]}: transformers has no tensor-parallel plan for this architecture; "
                "use --teacher-sharding device_map"
            )
    if mode == "device_map" and local_world > 1:
        raise ValueError(
            "--teacher-sharding device_map gives one process every GPU it sees: start one process per "
            f"node (torchrun --nproc_per_node 1), not {local_world}"
        )
    return mode


def load_model(path: str | Path, device, dtype: str, sharding: str = "none"):
    """A checkpoint in eval mode: on `device` (resolved by cache.dist), or spread over GPUs (see resolve_sharding)."""
    from transformers import AutoModelForCausalLM

    kw = {"dtype": getattr(torch, dtype)}
    if sharding == "device_map":
        kw["device_map"] = "auto"
    elif sharding == "tp":
        kw.update(_tp_kwargs(int(os.environ["WORLD_SIZE"])))
    model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    if sharding == "none":
        model = model.to(device)
    return model.eval()


def _tp_kwargs(tp_size: int) -> dict:
    try:  # transformers 5: the distributed options live in one config object
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto", "tp_size": tp_size}
    return {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=tp_size)}


def input_device(model) -> torch.device:
    """Where a (possibly spread) model takes its input ids: the input embedding's device."""
    w = model.get_input_embeddings().weight
    return w.to_local().device if hasattr(w, "to_local") else w.device


@torch.no_grad()
def supervised_hidden(model, input_ids, attention_mask, loss_mask) -> torch.Tensor:
    """Final hidden states at supervised positions, (N_sup, H), in batch-major order."""
    h = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    assert h.shape[:2] == loss_mask.shape, (h.shape, loss_mask.shape)
    return h[loss_mask.bool()]


@torch.no_grad()
def logit_chunks(model, hidden, vocab_size: int, chunk_rows: int):
    """Yield (row slice, float32 logits (c, vocab_size)) over the supervised rows.

    Embedding rows beyond the tokenizer (padding of the output layer) are cut off
    before the softmax: the tokenizer can never produce them.
    """
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    for s in range(0, hidden.shape[0], chunk_rows):
        logits = head(hidden[s : s + chunk_rows])[:, :vocab_size].float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        yield slice(s, s + logits.shape[0]), logits


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
) -> dict[str, torch.Tensor]:
    """One chunk of rows from every model at once: the support and all values on it.

    logits: role ("ft", "base", optional "s0") -> (c, V) float32, consumed in place.
    The support of a row is the top-k of πT ("topk"), or the union of the top-k of πT,
    πB, πS0 and π*_α for each α ("union"); ids ascend within a row. With `samples` = m,
    rows whose πT mass outside that support is at least `min_tail` also get m ids drawn
    from πT's tail by priority sampling (see sample_tail), appended after the top-k ids
    (ascending among themselves); `sample_len` counts them and `sample_tau` is the
    sampling threshold. With the student base present, `tail_star[:, a]` is the exact
    log Σ_{y∉S} πS0(y)·exp(α_a·Δ(y)) with Δ = floored_shift(lT, lB, floor), unnormalised
    like the logits lS0 + α·Δ it sums. Every tail is the mass outside all stored ids.
    Returns flat tensors: len (c,), ids/ft/base/s0 (E,), tails (c,), tail_star (c, A),
    and with samples sample_len (c,), sample_tau (c,).
    """
    # log_softmax in place: the logits are not needed again.
    lp = {r: x.sub_(x.logsumexp(1, keepdim=True)) for r, x in logits.items()}
    c, V = lp["ft"].shape
    kk = min(k, V)
    mask = torch.zeros((c, V), dtype=torch.bool, device=lp["ft"].device)
    for r in ("ft",) if support == "topk" else tuple(lp):
        mask.scatter_(1, lp[r].topk(kk, dim=1).indices, True)
    star = "s0" in lp and len(alphas) > 0
    if star:
        shift = floored_shift(lp["ft"], lp["base"], floor)  # (c, V)
        if support == "union":
            for a in alphas:
                mask.scatter_(1, (lp["s0"] + a * shift).topk(kk, dim=1).indices, True)
    out = {}
    if samples > 0:
        drawn, out["sample_tau"] = sample_tail(lp["ft"], mask, samples, min_tail, generator)
        out["sample_len"] = drawn.sum(1)
        # Sampled ids sit after the row's top-k ids: columns V.. of a (c, 2V) mask keep
        # that order under one row-major nonzero().
        mask = torch.cat([mask, drawn], dim=1)
        del drawn
    lengths = mask.sum(1)
    cols = mask.nonzero(as_tuple=True)[1] % V  # row-major: rows in order, ids ascending (then the sampled ones)
    del mask
    idx, valid = pad_ragged(lengths.cpu())
    ids = cols[idx.to(cols.device)]
    valid = valid.to(ids.device)
    out["len"] = lengths
    if star:
        tails = []
        for a in alphas:
            _, t, log_z, _ = support_logprobs(lp["s0"] + a * shift, ids, valid)
            tails.append(t + log_z)
        out["tail_star"] = torch.stack(tails, dim=1)
        del shift
    out["ids"] = ids[valid]
    for r in tuple(lp):
        vals, tail, _, _ = support_logprobs(lp.pop(r), ids, valid)
        out[r], out[f"tail_{r}"] = vals[valid], tail
    return {key: v.cpu() for key, v in out.items()}


@torch.no_grad()
def sample_tail(lt: torch.Tensor, support: torch.Tensor, m: int, min_tail: float, generator=None):
    """Priority sampling (Duffield, Lund, Thorup 2007) of m ids from πT outside `support`.

    Each tail id y gets the priority πT(y)/u_y, u_y ~ U(0, 1); the m largest are kept
    and τ is the (m+1)-th largest priority. For any function g of the token,
    Σ_kept g(y)·max(πT(y), τ)/πT(y) is an unbiased estimate of Σ_{y∉S} g(y). The
    student side uses it to spread each target's exact tail mass over the kept ids
    (student/losses.tail_cells). Rows whose tail holds less than `min_tail` of πT draw
    nothing. lt: (c, V) log πT; support: (c, V) bool. Returns (drawn (c, V) bool,
    log τ (c,), −inf where nothing was drawn or the whole tail was kept).
    """
    c, V = lt.shape
    neg = torch.full((), float("-inf"), device=lt.device)
    tail = torch.where(support, neg, lt)
    rows = tail.logsumexp(1) >= math.log(max(min_tail, 1e-30))
    # log priority = log πT − log u, and −log u ~ Exp(1)
    noise = torch.empty_like(lt).exponential_(generator=generator)
    pri = tail.add_(noise)
    del noise
    top = pri.topk(min(m + 1, V), dim=1)
    take = torch.isfinite(top.values[:, :m]) & rows[:, None]
    drawn = torch.zeros((c, V), dtype=torch.bool, device=lt.device)
    drawn.scatter_(1, top.indices[:, :m], take)
    tau = top.values[:, m] if top.values.shape[1] > m else torch.full((c,), float("-inf"), device=lt.device)
    return drawn, torch.where(rows, tau, neg)
