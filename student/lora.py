"""LoRA students through peft: only low-rank adapters train, the student's own weights stay frozen.

    deltakd train ... --lora-r 16 [--lora-alpha 32 --lora-dropout 0.05 --lora-targets all-linear] [--merge]

The adapters are injected into the Hugging Face model in place (peft's `get_peft_model`),
so the trainer's decoder + fused head loss (student/parallel.py, StudentLoss) and every
objective run unchanged; DDP and FSDP2 wrap it as they wrap a full student, and only
the adapter's parameters reach the optimizer. The output layer is never adapted: the
fused loss reads its weight directly, so an adapter there would be bypassed
(`--lora-targets` naming it is refused).

Checkpoints hold the adapter's weights and the optimizer, not the frozen base (the
base is `--student`, checked by the resume's settings); FSDP checkpoints stay sharded
as for a full student. The export, `RUN/final/`, is the adapter as `peft` writes it
(adapter_config.json + adapter_model.safetensors, loadable with
`AutoModelForCausalLM.from_pretrained(final)` when peft is installed); with `--merge`,
`RUN/final/merged/` also holds the student with the adapter merged in, a plain
Hugging Face model.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TRAINABLE_FILE = "adapter.safetensors"  # in a training checkpoint
INSTALL = "pip install 'deltakd[lora]'"


def require() -> None:
    if importlib.util.find_spec("peft") is None:
        raise ValueError(f"--lora-r needs the peft package: {INSTALL}")


def targets_of(value: str):
    """'all-linear' (peft: every linear layer but the output head) or a comma-separated list of module names."""
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise ValueError("--lora-targets: name modules (q_proj,v_proj,...) or all-linear")
    return "all-linear" if names == ["all-linear"] else names


def apply(model, cfg, base_path: str):
    """Inject adapters into `model` in place; returns (peft model, summary for the model card)."""
    require()
    from peft import LoraConfig, get_peft_model

    targets = targets_of(cfg.lora_targets)
    head = model.get_output_embeddings()
    head_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head}
    if targets != "all-linear" and head_names & set(targets):
        raise ValueError(
            f"--lora-targets {cfg.lora_targets}: {', '.join(sorted(head_names & set(targets)))} is the output layer, "
            "whose weight the fused loss reads directly; adapt the decoder's layers (all-linear leaves the head out)"
        )
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_path,
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # peft's "Target modules ... not found in the base model"
        raise ValueError(f"--lora-targets {cfg.lora_targets}: {e}") from e
    peft_model.peft_config["default"].base_model_name_or_path = base_path
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    adapted = sorted({n.rsplit(".", 1)[-1] for n in peft_model.peft_config["default"].target_modules})
    summary = {
        "r": cfg.lora_r,
        "alpha": cfg.lora_alpha,
        "dropout": cfg.lora_dropout,
        "targets": adapted,
        "trainable": trainable,
        "total": total,
    }
    return peft_model, summary


def is_lora(model) -> bool:
    if "peft" not in sys.modules:  # nothing can hold an adapter without peft loaded
        return False
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def save_trainable(model, path: Path) -> None:
    """The adapter's weights (every parameter that trains), for a training checkpoint."""
    from safetensors.torch import save_file

    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, str(path))


def load_trainable(model, path: Path, device) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path), device=str(device))
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != want:
        raise ValueError(
            f"{path} holds the adapter weights {sorted(set(state) ^ want)[:4]}... that this run's adapter does not "
            "have (or lacks): resume with the --lora-* settings the run started with"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not (want & set(missing)), (unexpected, want & set(missing))


def plain_like(peft_model, plain):
    """A peft model over `plain` (an unsharded copy of the base) with the same adapter configuration."""
    from peft import get_peft_model

    return get_peft_model(plain, peft_model.peft_config["default"])


def export(peft_model, folder: Path, merge: bool) -> None:
    """The adapter into `folder`; with `merge`, the merged student into `folder/merged` (the adapter is folded into
    the base weights in place: this is the end of the run)."""
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    if merge:
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(str(folder / "merged"), safe_serialization=True)
