"""The online full-vocabulary reference of the cached trainer (benchmark code, not a user mode).

    from benchmarks.online_ref import train_online
    train_online(TrainConfig(...), teacher_ft=..., teacher_base=..., student_base=..., floor=-16.0)

Same trainer, same objective code (student/objective.py `chunked_loss`), same batches
and seeds as a cached run: the batches still come from the cache (its token ids, loss
masks and example order), but every target is recomputed from teacher_ft, teacher_base
and the student base held frozen in memory, as full-vocabulary log-probs: the support
is the whole vocabulary (support_ids = arange(V) on every row, tails −inf), so no
truncation and no tail bucket enter the loss. Two settings stay like-for-like with the
cache: the floor inside the shift Δ = max(lT, f) − max(lB, f) (part of P1/P3's
definition; the cache's −16 by default) and temperature 1. With no tail, there is no
exact-target-tail column (star_col = None).

Memory: only the frozen models the active terms read are loaded (plain KD: teacher_ft
alone; P1/P2/P3: all three). Their log-probs exist for the supervised rows of one
micro-batch, computed `chunk_rows` rows at a time; (N_sup, V) float32 each.
"""

from __future__ import annotations

import dataclasses

import torch

from deltakd.student.trainer import TrainConfig, Trainer


@torch.no_grad()
def full_vocab_logprobs(model, input_ids, attention_mask, loss_mask, vocab: int, chunk_rows: int) -> torch.Tensor:
    """log πX over the whole vocabulary at the supervised rows, (N_sup, V) float32."""
    h = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[loss_mask]
    head = model.get_output_embeddings()
    out = [
        torch.log_softmax(head(h[s : s + chunk_rows]).float()[:, :vocab], dim=-1)
        for s in range(0, h.shape[0], chunk_rows)
    ]
    return torch.cat(out) if out else h.new_zeros(0, vocab)


def online_needs(spec) -> tuple[str, ...]:
    """The frozen models whose log-probs the active terms read: KD teacher_ft; P1/P2/P3 all three; SFT none."""
    if not set(spec.active) - {"sft"}:
        return ()
    return ("ft",) + (("base", "s0") if spec.needs_student_base else ())


def full_vocab_targets(logp: dict, next_tokens: torch.Tensor, vocab: int) -> dict:
    """Loss targets whose support is the whole vocabulary (no tail): `logp` maps ft/base/s0 to (N, V) log-probs;
    a model not given is never read by the active terms and gets a cheap −inf stand-in of the same shape."""
    n, device = next_tokens.shape[0], next_tokens.device
    tg = {
        "next_tokens": next_tokens,
        # expand: one (V,) row shared by every position, no (N, V) index tensor
        "support_ids": torch.arange(vocab, device=device).expand(n, vocab),
        "valid": torch.ones(1, 1, dtype=torch.bool, device=device).expand(n, vocab),
    }
    ninf = torch.full((n,), float("-inf"), device=device)
    for key in ("ft", "base", "s0"):
        lp = logp.get(key)
        if lp is None:  # unused by the active terms; kept (cheaply) so every term sees the same keys
            lp = torch.full((1, 1), float("-inf"), device=device).expand(n, vocab)
        assert lp.shape == (n, vocab), f"logp_{key} {tuple(lp.shape)}, expected {(n, vocab)}"
        tg[f"logp_{key}"], tg[f"tail_{key}"] = lp, ninf
    return tg


class OnlineTrainer(Trainer):
    """The cached trainer with its targets replaced by full-vocabulary log-probs of frozen models (online_needs)."""

    def __init__(self, cfg: TrainConfig, teacher_ft: str, teacher_base: str, student_base: str, floor: float | None):
        from transformers import AutoModelForCausalLM

        super().__init__(cfg)
        if self.spec.temperature != 1.0:
            raise ValueError(
                "the online reference compares at temperature 1 (the cache stores temperature-1 log-probs)"
            )
        self.spec = dataclasses.replace(self.spec, floor=floor, star_col=None)
        # The step calls the loss module built in Trainer.__init__ (under DDP/FSDP when there are ranks):
        # it carries its own copy of the spec, fitted to the cache; give it the online one.
        from deltakd.student.parallel import StudentLoss

        holders = [m for m in self.module.modules() if isinstance(m, StudentLoss)]
        assert len(holders) == 1, f"expected one StudentLoss in the trainer's module, found {len(holders)}"
        holders[0].spec = self.spec
        self.s0_model = None  # the cached run's on-the-fly lS0 path is replaced by the frozen models below
        # Only the models the active terms read are held: plain KD needs teacher_ft alone, so its
        # online memory is one teacher (like the peers in benchmarks/peers.py), not three models.
        self.needs = online_needs(self.spec)
        self.frozen = {}
        for key, path in (("ft", teacher_ft), ("base", teacher_base), ("s0", student_base)):
            if key not in self.needs:
                continue
            m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(self.device).eval()
            m.requires_grad_(False)
            self.frozen[key] = m

    def batch_targets(self, batch) -> dict:
        logp = {
            key: full_vocab_logprobs(
                self.frozen[key],
                batch.input_ids,
                batch.attention_mask,
                batch.loss_mask,
                self.vocab,
                self.spec.chunk_rows,
            )
            for key in self.needs
        }
        return full_vocab_targets(logp, batch.targets["next_tokens"], self.vocab)


def train_online(
    cfg: TrainConfig, teacher_ft: str, teacher_base: str, student_base: str, floor: float | None = -16.0
) -> dict:
    """`deltakd.student.trainer.train(cfg)` with online full-vocabulary targets (seeded the same way)."""
    import random

    import numpy as np

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    return OnlineTrainer(cfg, teacher_ft, teacher_base, student_base, floor).run()
