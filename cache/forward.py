"""Run one checkpoint over token batches and keep only what the cache needs.

The (batch x length x vocab) logits are never formed: the decoder's final hidden
states are gathered at supervised positions, then projected to the vocabulary in
chunks of rows, each chunk reduced to top-k values/ids and tail log-masses at once.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this cache; the message names it."""


def checkpoint_identity(path: str | Path) -> dict:
    """Identity of a local Hugging Face checkpoint: hashes of its config and weight files."""
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: not a Hugging Face checkpoint folder (no config.json)")
    weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise CheckpointError(f"{path}: no weight files (*.safetensors or *.bin)")
    h = hashlib.sha256()
    for p in weights:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return {
        "path": str(path.resolve()),
        "config_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest(),
        "weights_sha256": h.hexdigest(),
    }


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

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


def load_model(path: str | Path, device: str, dtype: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    return model.to(device).eval()


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
        logits = head(hidden[s:s + chunk_rows])[:, :vocab_size].float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        yield slice(s, s + logits.shape[0]), logits


def support_values(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs at the support ids (c, k) and the log-mass outside it (c,), −inf when k = V.

    Consumes `logits` (overwritten in place, no (c, V) copy) with one exp pass: the
    normaliser and the tail are sums of positive terms exp(logit − max), so the tail
    is exact even when the support holds nearly all the mass (no 1 − Σp cancellation).
    """
    top = logits.gather(1, ids)
    m = logits.amax(dim=1, keepdim=True)
    e = logits.sub_(m).exp_()
    log_z = e.sum(dim=1).log() + m[:, 0]
    tail_sum = e.scatter_(1, ids, 0.0).sum(dim=1)
    return top - log_z[:, None], tail_sum.log() + m[:, 0] - log_z
