"""Train a student from a cache: `train(cfg)` with one explicit `train_step()`.

    deltakd train --cache CACHE --student S0 --out RUN [--loss p1 --alpha 1.0 ...]
    torchrun --nproc_per_node N -m deltakd.cli train ... --device cuda [--parallel fsdp]

The loss of a step is Σ_terms weight · (sum over the supervised tokens of all its
micro-batches on all ranks) / (number of those tokens): normalised once per step.
Data parallelism is torch's own (student/parallel.py): DDP or FSDP2 sum the gradients.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from deltakd.cache.format.reader import CacheReader
from deltakd.cache.format.schema import CacheFormatError
from deltakd.runtime import dist
from deltakd.runtime.config import check_fields
from deltakd.runtime.stop import Stopped, signal_name, stop_requested
from deltakd.student import lora, parallel, tracking
from deltakd.student.checkpointing import find_resume, load_training_state, save_final, save_training_state
from deltakd.student.data import StreamingLoader
from deltakd.student.objective import TERMS, LossSpec, TailProposal, student_base_targets
from deltakd.student.run_guard import guarded

LOSS_PRESETS = {
    "sft": {"sft": 1.0},
    "kd": {"kd": 1.0},
    "p1": {"p1": 1.0},
    "p2": {"p2": 1.0},
    "p3": {"p3": 1.0},
    "kd+p3": {"kd": 1.0, "p3": 1.0},
}


# Range of each numeric option (types and finiteness are checked for every field).
TRAIN_RULES = {
    "w_sft": (">=0",),
    "w_kd": (">=0",),
    "w_p1": (">=0",),
    "w_p2": (">=0",),
    "w_p3": (">=0",),
    "temperature": (">0",),
    "skew": (">=0", "<1"),
    "lr": (">=0",),  # jsd_beta: LossSpec, for JSD
    "weight_decay": (">=0",),
    "warmup_steps": (">=0",),
    "min_lr_ratio": (">=0", "<=1"),
    "batch_tokens": (">=1",),
    "grad_accum": (">=1",),
    "clip": (">=0",),
    "max_steps": (">=1",),
    "epochs": (">0",),
    "eval_every": (">=0",),
    "eval_percent": (">=0", "<100"),
    "eval_batches": (">=1",),
    "log_every": (">=1",),
    "save_every": (">=1",),
    "seed": (">=0",),
    "chunk_rows": (">=1",),
    "lora_r": (">=0",),
    "lora_alpha": (">0",),
    "lora_dropout": (">=0", "<1"),
}


def _nonzero(w: dict) -> dict:
    return {t: v for t, v in w.items() if v}


def describe_mix(weights: dict) -> str:
    """{'sft': 0.5, 'kd': 0.5} -> '0.5*sft + 0.5*kd', in TERMS order."""
    return " + ".join(f"{weights[t]:g}*{t}" for t in TERMS if t in weights)


@dataclass(frozen=True)
class TrainConfig:
    cache: str = field(metadata={"help": "teacher cache folder (deltakd cache build)"})
    student: str = field(metadata={"help": "student checkpoint to start from (Hugging Face folder)"})
    out: str = field(metadata={"help": "run folder: checkpoints, metrics.jsonl, final/"})
    loss: str | None = field(
        default=None,
        metadata={
            "help": (
                f"preset: {', '.join(LOSS_PRESETS)} (default p1). Not combinable with --w-*: named weights are the "
                "whole mix. With --lam it names the distillation term D"
            )
        },
    )
    lam: float | None = field(
        default=None,
        metadata={
            "help": (
                "the paper's recipe lam*SFT + (1-lam)*D, D = the --loss preset (kd, p1, p2, p3, kd+p3); lam in [0, 1]"
            )
        },
    )
    w_sft: float | None = field(
        default=None, metadata={"help": "weight of SFT cross-entropy (any --w-*: the named weights are the whole mix)"}
    )
    w_kd: float | None = field(default=None, metadata={"help": "weight of KD D(pT||p_theta)"})
    w_p1: float | None = field(default=None, metadata={"help": "weight of Delta-KD P1 D(pi*||p_theta)"})
    w_p2: float | None = field(default=None, metadata={"help": "weight of Delta-KD P2 D(pT||norm(pB p_theta/pS0))"})
    w_p3: float | None = field(
        default=None,
        metadata={
            "help": "weight of Delta-KD P3 shift matching (where the student base is broad, its parameters' "
            "gradient along training is 7-11 degrees off the full-vocabulary one from a default cache, whose tail "
            "samples follow half the teacher and half the Delta-KD target, 4-6 from one built with "
            "--top-k 12 --tail-samples 24 --tail-proposal target, 16-22 from one whose samples follow the teacher "
            "alone; docs/objectives.md)"
        },
    )
    divergence: str = field(
        default="fkl",
        metadata={
            "help": "fkl, rkl, jsd, skew_fkl, skew_rkl. rkl reads the student's own tail, which no cache holds: "
            "8-15 degrees off along training where the student base is broad, up to 21 on a peaked one, from "
            "every cache measured; it is on-policy by nature: train it online. jsd reaches 20 on a peaked one"
        },
    )
    alpha: float = field(default=1.0, metadata={"help": "Delta-KD shift scale alpha"})
    temperature: float = field(default=1.0, metadata={"help": "distillation temperature"})
    tail: str = field(default="bucket", metadata={"help": "bucket (tail mass as one outcome) or renorm"})
    jsd_beta: float = field(default=0.5, metadata={"help": "beta of the generalised JSD"})
    skew: float = field(default=0.1, metadata={"help": "lambda of skew KL"})
    floor: str = field(
        default="cache",
        metadata={
            "help": "log-prob floor f inside the teacher shift of P1 and P3, delta = max(lT,f) - max(lB,f): "
            "a number, 'none', or 'cache' (the floor the cache was built with); P2 holds no teacher shift "
            "and takes none"
        },
    )
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to lr * this"})
    batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per micro-batch (per rank)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (per rank)"})
    clip: float = field(default=1.0, metadata={"help": "gradient norm clipping (0: off)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps (default: from --epochs)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training split when --max-steps is not set"})
    eval_every: int = field(default=0, metadata={"help": "evaluate on the held-out split every N steps (0: end only)"})
    eval_percent: float = field(default=5.0, metadata={"help": "percent of examples held out for evaluation"})
    eval_batches: int = field(default=20, metadata={"help": "held-out micro-batches per evaluation"})
    log_every: int = field(default=10, metadata={"help": "steps between log lines"})
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints (and one at the end)"})
    seed: int = field(default=0, metadata={"help": "seed of data order and dropout"})
    chunk_rows: int = field(default=1024, metadata={"help": "supervised rows per loss chunk (memory peak)"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute transformer activations in backward"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for the student forward (accelerators)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda (cuda:LOCAL_RANK under torchrun) or cuda:N"})
    parallel: str = field(
        default="ddp",
        metadata={
            "help": "under torchrun: ddp (a full replica per rank) or fsdp (FSDP2, parameters, gradients and "
            "optimizer state sharded; --bf16 then means bf16 compute with fp32 gradient reduction)",
            "choices": parallel.PARALLEL,
        },
    )
    student_base_online: str | None = field(
        default=None, metadata={"help": "compute lS0 from this frozen checkpoint instead of the cache"}
    )
    lora_r: int = field(
        default=0,
        metadata={"help": "LoRA rank: train low-rank adapters through peft (extra [lora]); 0: the full student"},
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator (the update is alpha/r * B A)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_targets: str = field(
        default="all-linear",
        metadata={
            "help": "modules to adapt, comma-separated (q_proj,v_proj,...), or all-linear (every linear layer "
            "but the output head)"
        },
    )
    merge: bool = field(
        default=False, metadata={"help": "with --lora-r: also export final/merged/, the merged student"}
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": "experiment trackers beside metrics.jsonl, comma-separated: none, tensorboard, wandb, trackio, "
            "mlflow (each an extra: pip install 'deltakd[tensorboard]'); rank 0 reports"
        },
    )
    run_name: str | None = field(
        default=None, metadata={"help": "the run's name in the trackers (default: --out's name)"}
    )
    project: str | None = field(
        default=None,
        metadata={"help": "W&B / Trackio project, MLflow experiment (default: their environment, deltakd)"},
    )
    dry_run: bool = field(default=False, metadata={"help": "check cache vs student, run one step, report memory, exit"})
    strict: bool = field(
        default=False, metadata={"help": "make warnings errors (e.g. a student that is not the cache's student base)"}
    )

    def __post_init__(self):
        check_fields(self, TRAIN_RULES)
        if self.loss is not None and self.loss not in LOSS_PRESETS:
            raise ValueError(f"--loss {self.loss!r}: choose one of {', '.join(LOSS_PRESETS)}")
        if self.parallel not in parallel.PARALLEL:
            raise ValueError(f"--parallel {self.parallel!r}: choose one of {', '.join(parallel.PARALLEL)}")
        if self.batch_tokens < 1 or self.grad_accum < 1:
            raise ValueError("--batch-tokens and --grad-accum must be positive")
        self.loss_spec()  # validates the loss settings
        tracking.parse_report_to(self.report_to)
        if self.lora_r:
            lora.targets_of(self.lora_targets)
        elif self.merge:
            raise ValueError("--merge merges a LoRA adapter into the student: give --lora-r too")
        if self.floor != "cache":
            from deltakd.cache.format.schema import parse_floor

            parse_floor(self.floor)

    def weights(self) -> dict:
        """The loss mix, from exactly one of: a preset (--loss, default p1), explicit --w-* weights
        (the named terms and nothing else), or the recipe lam*SFT + (1-lam)*D with D = the preset."""
        explicit = {t: getattr(self, f"w_{t}") for t in TERMS if getattr(self, f"w_{t}") is not None}
        preset = LOSS_PRESETS[self.loss or "p1"]
        if explicit and self.lam is not None:
            raise ValueError(
                f"--lam sets every weight itself ({describe_mix(explicit)} was also given): "
                "use --lam with --loss, or --w-* alone"
            )
        if explicit and self.loss is not None:
            # Keeping the preset in the mix at its own weight is rarely what a user who names
            # weights means; say what it would be and refuse.
            raise ValueError(
                f"--loss {self.loss} with --w-* weights: that would train "
                f"{describe_mix(_nonzero({**preset, **explicit}))}. Named weights are the whole mix: "
                f"drop --loss to train {describe_mix(_nonzero(explicit)) or 'nothing'}, or name every "
                "term you want as --w-*"
            )
        if explicit:
            return _nonzero(explicit)
        if self.lam is None:
            return dict(preset)
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"--lam {self.lam}: must lie in [0, 1] (lam*SFT + (1-lam)*D)")
        if "sft" in preset:
            raise ValueError(
                f"--lam mixes SFT with a distillation term: --loss must be one of "
                f"{', '.join(p for p in LOSS_PRESETS if 'sft' not in LOSS_PRESETS[p])}, not {self.loss}"
            )
        return _nonzero({"sft": self.lam, **{t: (1.0 - self.lam) * w for t, w in preset.items()}})

    def objective(self) -> str:
        """The resolved mix in one line, with the settings that change its terms."""
        w = self.weights()
        extra = []
        if set(w) & {"kd", "p1", "p2"}:
            extra.append(f"divergence {self.divergence}")
        if set(w) & {"p1", "p3"}:
            extra.append(f"alpha {self.alpha:g}")
        if set(w) & {"p1", "p2", "p3"} and self.floor != "cache":
            extra.append(f"floor {self.floor}")
        if set(w) - {"sft"}:
            extra += [f"tail {self.tail}"] + ([f"temperature {self.temperature:g}"] if self.temperature != 1.0 else [])
        return describe_mix(w) + (f" ({', '.join(extra)})" if extra else "")

    def loss_spec(self) -> LossSpec:
        return LossSpec(
            weights=self.weights(),
            divergence=self.divergence,
            alpha=self.alpha,
            temperature=self.temperature,
            tail=self.tail,
            jsd_beta=self.jsd_beta,
            skew=self.skew,
            chunk_rows=self.chunk_rows,
        )


class NonFiniteLoss(FloatingPointError):
    pass


def fit_spec_to_cache(spec: LossSpec, floor: str, reader: CacheReader) -> LossSpec:
    """The loss settings the cache can serve faithfully, or a refusal that says why and what to do.

    - The Delta-KD target's floor is part of its definition; where the cache stores
      exact target tails (`tail_star`), they were computed with the cache's floor and
      its alpha grid, so training must use that floor and one of those alphas.
    - Temperature τ ≠ 1 with the tail bucket is exact only on the whole vocabulary.
    """
    from deltakd.cache.format import schema
    from deltakd.cache.format.schema import parse_floor

    cache_floor = reader.floor
    f = cache_floor if floor == "cache" else parse_floor(floor)
    uses_target = any(t in ("p1", "p3") for t in spec.active)
    star_col = None
    if uses_target and reader.alphas and spec.tail == "bucket":
        grid = reader.alphas
        star_col = _alpha_column(grid, spec.alpha)
        if star_col is None:
            raise CacheFormatError(
                f"--alpha {spec.alpha}: {reader.root} holds the exact Delta-KD target tails for alphas "
                f"{', '.join(f'{a:g}' for a in grid)} only; train with one of them, or rebuild the cache with "
                f"--alphas including {spec.alpha:g}"
            )
        if f != cache_floor:
            raise CacheFormatError(
                f"--floor {floor}: the target tails in {reader.root} were computed with floor {cache_floor}; "
                "train with --floor cache, or rebuild the cache with the floor you want"
            )
    if spec.temperature != 1.0 and spec.tail == "bucket" and not reader.covers_vocabulary:
        raise CacheFormatError(
            f"--temperature {spec.temperature} with --tail bucket: {reader.root} stores log-probs at temperature 1 on "
            "a support smaller than the vocabulary, and the tail bucket (a sum of many probabilities) cannot be "
            "re-tempered; train at temperature 1, use --tail renorm, or build with --top-k >= the vocabulary size"
        )
    proposal = None
    if reader.tail_proposal != "teacher":
        col = _alpha_column(reader.alphas, schema.PROPOSAL_ALPHA)
        if col is None:
            raise CacheFormatError(
                f"{reader.root}: its tail samples were drawn with pi* at alpha {schema.PROPOSAL_ALPHA:g} "
                f"(tail_proposal {reader.tail_proposal}), but it holds no exact target tail for that alpha "
                f"(alphas {list(reader.alphas)}): the samples' weights cannot be formed; rebuild the cache"
            )
        proposal = TailProposal(reader.tail_proposal, schema.PROPOSAL_ALPHA, cache_floor, col)
    return dataclasses.replace(spec, floor=f, star_col=star_col, proposal=proposal)


def _alpha_column(grid: tuple[float, ...], alpha: float) -> int | None:
    """The column of `alpha` in a cache's grid of exact target tails, or None."""
    return next((i for i, a in enumerate(grid) if abs(a - alpha) < 1e-9), None)


# Median mass of the student base outside the cached ids above which the notice below is printed. The
# peaked SmolLM2 stand-in keeps 0.002 outside (every objective within 4 degrees), the broad one 0.25.
BROAD_OUTSIDE = 0.1


def broad_base_notice(spec: LossSpec, reader: CacheReader) -> str | None:
    """A line for the objectives a cache serves far from their full-vocabulary gradient when the student base
    is broad (docs/objectives.md, "What no cache serves faithfully on broad bases"), or None. The breadth is
    measured on the cache's first shard."""
    # Draws in which π* has a part ("target", "mixture") carry P3's tail: only ids drawn from πT's tail alone
    # leave it to the bucket.
    reads_tail = ["P3"] if "p3" in spec.active and reader.tail_proposal == "teacher" else []
    if spec.divergence in ("rkl", "skew_rkl") and any(t in spec.active for t in ("kd", "p1", "p2")):
        reads_tail.append(f"{spec.divergence} divergence")
    if not reads_tail or not reader.has_student:
        return None
    outside = float(np.median(reader.mass_outside("s0")))
    if outside < BROAD_OUTSIDE:
        return None
    return (
        f"note: the student base keeps a median {outside:.0%} of its mass outside the ids {reader.root} holds. "
        f"On so broad a base, {' and '.join(reads_tail)} from a cache is far from its full-vocabulary gradient "
        "(measured on SmolLM2 stand-ins along training: the parameters' gradient of P3 16-22 degrees off, of "
        "reverse KL 8-14, of forward-KL KD and P1 within 4; docs/objectives.md). Options: train them online, "
        "prefer P1 or KD, or, for P3, build the cache with a student base and the default --tail-proposal auto "
        "(there 7-11 degrees) or with --top-k 12 --tail-samples 24 --tail-proposal target (4-6)"
    )


def check_student(reader: CacheReader, student_dir: str, needs_s0: bool, online: str | None):
    """Refuse a student that does not fit the cache, with what to do about it."""
    from transformers import AutoConfig, AutoTokenizer

    from deltakd.cache.format.records import tokenizer_identity

    tok = AutoTokenizer.from_pretrained(student_dir)
    tid = tokenizer_identity(tok)
    if tid["sha256"] != reader.manifest["tokenizer"]["sha256"]:
        raise CacheFormatError(
            f"{reader.root} was built with another tokenizer than the student's ({student_dir}): "
            f"vocabulary {reader.manifest['tokenizer']['vocab_size']} vs {tid['vocab_size']}, or special tokens "
            "differ; build the cache with checkpoints that share the student's tokenizer"
        )
    rows = AutoConfig.from_pretrained(student_dir).vocab_size
    if rows < reader.vocab_size:
        raise CacheFormatError(f"{student_dir}: {rows} output rows, the cache's vocabulary has {reader.vocab_size}")
    if needs_s0 and not reader.has_student and not online:
        raise CacheFormatError(
            f"{reader.root} holds no student-base arrays, which the Delta-KD terms need: run "
            f"`deltakd cache add-student --cache {reader.root} --student-base {student_dir}`, "
            "or pass --student-base-online DIR to compute them during training"
        )
    return tok


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup to lr, then cosine to lr * min_lr_ratio at `total`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    def __init__(self, cfg: TrainConfig):
        from transformers import AutoModelForCausalLM

        self.cfg, self.spec = cfg, cfg.loss_spec()
        tracking.require(tracking.parse_report_to(cfg.report_to))  # every rank refuses before any work
        if cfg.lora_r:
            lora.require()
        self.trackers = tracking.NoTrackers()
        self.rank, self.world = dist.init(cfg.device)
        self.device = dist.resolve_device(cfg.device)
        self.reader = CacheReader(cfg.cache)
        self.spec = fit_spec_to_cache(self.spec, cfg.floor, self.reader)
        self.tok = check_student(self.reader, cfg.student, self.spec.needs_student_base, cfg.student_base_online)
        self.vocab = self.reader.vocab_size
        torch.manual_seed(cfg.seed)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32).to(self.device)
        if cfg.grad_checkpointing:
            # transformers 5 renamed the switch; 4.x only has the old name.
            enable = (
                getattr(self.model, "activation_checkpointing_enable", None) or self.model.gradient_checkpointing_enable
            )
            enable()
        # LoRA: adapters injected into self.model in place; self.peft_model saves them (student/lora.py).
        self.peft_model, self.lora_summary = None, None
        if cfg.lora_r:
            base = str(Path(cfg.student).resolve()) if Path(cfg.student).is_dir() else cfg.student
            self.peft_model, self.lora_summary = lora.apply(self.model, cfg, base)
            if cfg.grad_checkpointing:  # the frozen embedding's output must carry grad into checkpointed layers
                self.model.enable_input_require_grads()
        self.model.train()
        self.s0_model = None
        # lS0 is read where a term needs it, and where the cache drew its tail samples from π* (their
        # importance weights are formed from lS0 + Δ, whatever the term).
        needs_s0 = self.spec.needs_student_base or self.spec.proposal is not None
        self.cache_s0 = needs_s0 and not cfg.student_base_online
        if cfg.student_base_online and needs_s0:
            self.s0_model = AutoModelForCausalLM.from_pretrained(cfg.student_base_online).to(self.device).eval()
            self.s0_model.requires_grad_(False)
        # self.model stays the Hugging Face model (export, tests); self.module is what the
        # step calls: decoder + loss in one forward, under DDP or FSDP2 when there are ranks.
        fsdp = cfg.parallel == "fsdp"
        self.module = parallel.wrap(
            parallel.StudentLoss(self.model, self.spec, self.vocab, cfg.bf16 and not fsdp),
            cfg.parallel,
            self.device,
            bf16=cfg.bf16 and fsdp,
        )
        # Created after wrapping: FSDP2 replaces the parameters with sharded DTensors.
        self.params = [p for p in self.module.parameters() if p.requires_grad]  # LoRA: the adapter's only
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        loader_kw = dict(
            batch_tokens=cfg.batch_tokens,
            seed=cfg.seed,
            eval_percent=cfg.eval_percent,
            with_student=self.cache_s0,
            pad_id=self.tok.pad_token_id or 0,
            pin_memory=self.device.type == "cuda",
            half_targets=self.device.type == "cuda",  # widened on the device (Batch.to), where it costs nothing
        )
        # The plan depends on world × grad_accum (data.py): every rank decodes only its ~1/world of a shard.
        self.train_loader_kw = dict(
            loader_kw, rank=self.rank, world=self.world, shuffle=True, split="train", accum=cfg.grad_accum
        )
        self.eval_loader_kw = dict(loader_kw, rank=self.rank, world=self.world, shuffle=False, split="eval", epochs=1)
        per_epoch = StreamingLoader(self.reader, **self.train_loader_kw).batches_per_epoch()
        if per_epoch == 0:
            raise CacheFormatError(
                f"{cfg.cache}: no training sequences (all held out? --eval-percent {cfg.eval_percent})"
            )
        self.total_steps = cfg.max_steps or max(1, int(cfg.epochs * per_epoch) // (self.world * cfg.grad_accum))
        self.out = Path(cfg.out)
        self.step, self.loader_state = 0, None
        # Run totals for the model card; saved with every checkpoint so that a resume keeps counting.
        self.counters = {"tokens": 0, "supervised": 0}
        self.final_metrics: dict = {}

    # -------------------------------------------------------------- the step
    def batch_targets(self, batch) -> dict:
        """The loss targets of a batch's supervised rows: the cached ones (lS0 computed on the fly if asked).
        benchmarks/online_ref.py overrides this to score the online full-vocabulary reference on the same batches."""
        targets = dict(batch.targets)
        if self.s0_model is not None:
            targets["logp_s0"], targets["tail_s0"] = student_base_targets(
                self.s0_model,
                batch.input_ids,
                batch.attention_mask,
                batch.loss_mask,
                targets["support_ids"],
                targets["valid"],
                self.vocab,
                self.spec.chunk_rows,
            )
        return targets

    def forward_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted sum of the loss terms, per-term sums (n_terms,)) over the batch's supervised tokens."""
        return self.module(batch.input_ids, batch.attention_mask, batch.loss_mask, self.batch_targets(batch))

    def train_step(self, micro: list) -> dict:
        """One optimizer step over this rank's micro-batches; the loss is normalised once."""
        # Counts are taken on the host (no device sync); every collective tensor is
        # created on self.device, the device the process group reduces on.
        n_local = sum(b.n_supervised for b in micro)
        n_total = int(dist.all_sum(torch.tensor([n_local], dtype=torch.float64, device=self.device)).item())
        n_tokens = float(sum(b.n_tokens for b in micro))
        term_sums = torch.zeros(len(self.spec.active), device=self.device)
        losses = []
        self.opt.zero_grad(set_to_none=False)
        for i, b in enumerate(micro):
            with parallel.set_sync(self.module, i == len(micro) - 1):
                weighted, sums = self.forward_loss(b.to(self.device, non_blocking=True))
                loss = weighted / max(n_total, 1)
                loss.backward()
            losses.append(loss.detach())
            term_sums += sums.detach()
        # One sync per step, shared by all ranks, so that every rank stops together
        # (a lone rank raising would leave the others waiting in the all-reduce).
        finite = torch.isfinite(torch.stack(losses))
        if dist.all_sum((~finite).sum().float().reshape(1)).item() > 0:
            bad = [micro[i].example_ids[:8] for i in range(len(micro)) if not finite[i]]
            raise NonFiniteLoss(
                f"non-finite loss at step {self.step + 1} (examples {bad or 'on another rank'}); the optimizer "
                f"step was not taken; the last checkpoint in {self.out / 'checkpoints'} is intact"
            )
        gnorm = parallel.full_value(
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip if self.cfg.clip > 0 else float("inf"))
        )
        lr = lr_at(self.step, self.cfg, self.total_steps)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.step += 1
        return {
            "term_sums": dist.all_sum(term_sums),
            "n": n_total,
            "grad_norm": gnorm,
            "lr": lr,
            "tokens": dist.all_sum(torch.tensor([n_tokens], device=self.device)),
        }

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        sums = torch.zeros(len(self.spec.active), device=self.device)
        n = 0
        loader = StreamingLoader(self.reader, **self.eval_loader_kw)
        batches = [b for _, b in zip(range(self.cfg.eval_batches), loader)]
        loader.close()
        if parallel.is_fsdp(self.module):
            # Every FSDP forward is a collective: all ranks run the same number of them.
            k = -int(dist.all_max(torch.tensor([-len(batches)], device=self.device)).item())
            batches = batches[:k]
        for b in batches:
            sums += self.forward_loss(b.to(self.device, non_blocking=True))[1]
            n += b.n_supervised
        self.model.train()
        sums = dist.all_sum(sums)
        n = int(dist.all_sum(torch.tensor([float(n)], device=self.device)).item())
        return {f"eval_{t}": float(s) / max(n, 1) for t, s in zip(self.spec.active, sums)} | {"eval_tokens": n}

    # -------------------------------------------------------------- the loop
    def log(self, rec: dict):
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            self.trackers.log(rec)

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.trackers.close()

    def _run(self) -> dict:
        cfg = self.cfg
        resume = None if cfg.dry_run else find_resume(self.out, cfg, self.world)
        if resume is not None:
            self.step, self.loader_state = load_training_state(resume, self)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            resolved = dataclasses.asdict(cfg) | {
                "resolved_weights": self.spec.weights,
                "objective": cfg.objective(),
                "total_steps": self.total_steps,
                "world_size": self.world,
            }
            (self.out / "train_config.json").write_text(json.dumps(resolved, indent=1))
            if not cfg.dry_run:
                self.trackers = tracking.Trackers(
                    tracking.parse_report_to(cfg.report_to),
                    self.out,
                    cfg.run_name or self.out.resolve().name,
                    cfg.project,
                    resolved,
                    self.step if resume is not None else None,
                )
            if resume is None and not cfg.dry_run:
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
                # The first line says what is being optimised (a resume keeps it: step 0 survives truncation).
                self.log({"step": 0, "objective": cfg.objective(), "weights": self.spec.weights})
            elif resume is not None:
                _truncate_metrics(self.out / "metrics.jsonl", self.step)
            print(f"objective: {cfg.objective()}" + (f"  (resuming at step {self.step})" if resume else ""), flush=True)
            notice = broad_base_notice(self.spec, self.reader)
            if notice:
                print(notice, flush=True)
        loader = StreamingLoader(self.reader, state=self.loader_state, **self.train_loader_kw)
        it = iter(loader)
        from tqdm import tqdm

        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            disable=self.rank != 0 or cfg.dry_run,
            dynamic_ncols=True,
        )
        t_log, tok_log, since = time.perf_counter(), 0.0, torch.zeros(len(self.spec.active))
        n_since, last = 0, {}
        try:
            while self.step < self.total_steps:
                micro = [next(it) for _ in range(cfg.grad_accum)]
                res = self.train_step(micro)
                self.loader_state = micro[-1].state
                since += res["term_sums"].cpu()
                n_since += res["n"]
                tok_log += float(res["tokens"])
                self.counters["tokens"] += int(res["tokens"])
                self.counters["supervised"] += int(res["n"])
                bar.update(1)
                if cfg.dry_run:
                    last = self._dry_report(res)
                    break
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    dt = time.perf_counter() - t_log
                    steps_left = self.total_steps - self.step
                    rec = {
                        "step": self.step,
                        "lr": res["lr"],
                        "grad_norm": float(res["grad_norm"]),
                        "loss": float((since * torch.tensor([self.spec.weights[t] for t in self.spec.active])).sum())
                        / max(n_since, 1),
                        **{t: float(s) / max(n_since, 1) for t, s in zip(self.spec.active, since)},
                        "tokens_per_s": tok_log / max(dt, 1e-9),
                        "peak_mem_mb": peak_memory_mb(self.device),
                        "eta_s": dt / cfg.log_every * steps_left if self.step >= cfg.log_every else None,
                    }
                    self.log(rec)
                    bar.write(
                        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())
                    ) if self.rank == 0 else None
                    last = rec
                    t_log, tok_log, since, n_since = time.perf_counter(), 0.0, torch.zeros_like(since), 0
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    self.log({"step": self.step, **self.evaluate()})
                if self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    save_training_state(self)
                sig = stop_requested(self.world, self.device)  # SIGTERM / Ctrl-C: stop at this step boundary
                if sig and self.step < self.total_steps:
                    save_training_state(self)
                    raise Stopped(
                        f"train stopped by {signal_name(sig)} after step {self.step}: checkpoint saved in "
                        f"{self.out / 'checkpoints'}; run the same command to resume",
                        sig,
                    )
        finally:
            loader.close()
            bar.close()
        if cfg.dry_run:
            return last
        ev = self.evaluate()
        self.log({"step": self.step, **ev})
        self.final_metrics = last | ev
        save_training_state(self)
        save_final(self)  # collective under FSDP (the weights are gathered); rank 0 writes
        return last | ev

    def _dry_report(self, res) -> dict:
        rec = {
            "dry_run": True,
            "objective": self.cfg.objective(),
            "loss_terms": {t: float(s) / max(res["n"], 1) for t, s in zip(self.spec.active, res["term_sums"])},
            "grad_norm": float(res["grad_norm"]),
            "peak_mem_mb": peak_memory_mb(self.device),
            "cache_sequences": len(self.reader),
            "k": self.reader.k,
            "vocab": self.vocab,
            "student_base_arrays": "cache" if self.cache_s0 else ("online" if self.s0_model else "not needed"),
            "trainable_parameters": sum(p.numel() for p in self.params),
            "total_steps": self.total_steps,
        }
        return rec


def _truncate_metrics(path: Path, step: int):
    """Drop metric lines logged after the checkpoint being resumed (they will be logged again)."""
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
    path.write_text("".join(l + "\n" for l in keep))


@guarded
def train(cfg: TrainConfig) -> dict:
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    return Trainer(cfg).run()
