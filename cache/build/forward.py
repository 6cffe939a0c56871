"""Run one checkpoint over token batches and keep only what the cache needs.

The (batch x length x vocab) logits are never formed: the decoder's final hidden
states are gathered at supervised positions, then projected to the vocabulary in
chunks of rows, each chunk reduced at once to the support's ids, the log-probs on
it and the tail log-masses (rows.py; cache/format/support.py holds the arithmetic
shared with the trainer).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# The row arithmetic (support, tail samples, values) lives in rows.py; imported from here by its users.
from deltakd.cache.build.rows import lockstep_rows, sample_tail  # noqa: F401

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
