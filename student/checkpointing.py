"""Training checkpoints (exact resume) and the final Hugging Face export.

    RUN/checkpoints/step-000100/   model.safetensors, optimizer.pt, rng.pt, state.json
                                   (--parallel fsdp: sharded/, torch.distributed.checkpoint, every rank)
    RUN/final/                     save_pretrained (safetensors) + tokenizer + train_config.json + README.md
                                   (the model card, student/model_card.py)

A run resumes on another number of ranks when M = ranks × grad_accum stays (e.g. 8 × 1 as
4 × 2): the batch order depends on M only, the loader restarts at the saved step's end,
DDP checkpoints hold full tensors and FSDP ones are resharded by torch.distributed.checkpoint.

A checkpoint is written aside and renamed into place, so a kill during a save
leaves the previous checkpoint as the newest complete one. Under FSDP every rank
writes its shards into the same folder; rank 0 renames it after a barrier.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from deltakd.runtime import dist
from deltakd.student import lora, parallel
from deltakd.student.model_card import card_info, write_card

# Fields that may change between a run and its resume without changing the result.
RESUME_FREE = {"out", "device", "log_every", "save_every", "eval_every", "eval_batches", "dry_run", "strict"}
RESUME_FREE |= {"report_to", "run_name", "project"}  # where the metrics are reported, not what is trained
KEEP = 2


def _ckpt_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def resume_differences(saved: dict, saved_world: int | None, cfg, world: int) -> list[str]:
    """What keeps a run saved with `saved` (config dict) on `saved_world` ranks from continuing exactly as `cfg`
    on `world` ranks. The batch order and each step's gradient depend on M = ranks × grad_accum only
    (student/data.py; the loss is normalised over the whole step), so grad_accum may change with the
    number of ranks as long as M stays."""
    now = dataclasses.asdict(cfg)
    free = RESUME_FREE | {"grad_accum"}
    diff = sorted(k for k in set(saved) | set(now) if k not in free and saved.get(k) != now.get(k))
    w0 = world if saved_world is None else int(saved_world)  # checkpoints of early versions record no world
    a0 = int(saved.get("grad_accum", 1))
    m0, m = w0 * a0, world * cfg.grad_accum
    if m0 != m:
        fix = (
            f"pass --grad-accum {m0 // world} to continue it exactly on {world} rank(s)"
            if m0 % world == 0
            else f"no --grad-accum keeps M = {m0} on {world} ranks: use a number of ranks that divides {m0}"
        )
        diff.append(
            f"micro-batches per step M = ranks x grad_accum: {w0} x {a0} = {m0} -> {world} x {cfg.grad_accum} = "
            f"{m}, which changes the batch order; {fix}"
        )
    return diff


def find_resume(out, cfg, world: int = 1) -> Path | None:
    d = _ckpt_dir(out)
    if not d.is_dir():
        return None
    done = sorted(p for p in d.glob("step-*") if p.is_dir() and not p.name.endswith(".partial"))
    if not done:
        return None
    state = json.loads((done[-1] / "state.json").read_text())
    diff = resume_differences(state["config"], state.get("world_size"), cfg, world)
    if diff:
        raise ValueError(
            f"{out} holds a run with other settings ({'; '.join(diff)}); "
            "use another --out folder to start a new run, or the same settings to resume"
        )
    return done[-1]


def step_boundary(state: dict, saved_world: int) -> dict:
    """The loader position at the end of the saved step, for any split of M into ranks × accumulation.

    The trainer saves rank 0's last micro-batch of a step, global index t·M + M − world: on `saved_world`
    ranks the step ends at the next multiple of it. Shard-local `batch` moves with `index` (a position past a
    shard's last batch is where the next shard starts, see StreamingLoader._produce)."""
    if "index" not in state:
        return state
    end = -(-int(state["index"]) // saved_world) * saved_world
    return {**state, "index": end, "batch": int(state["batch"]) + end - int(state["index"])}


def save_training_state(tr) -> None:
    from safetensors.torch import save_model

    # --parallel fsdp saves torch.distributed.checkpoint shards on any number of ranks, one process
    # included, so that its checkpoints load on any other number (DCP reshards on load).
    sharded = tr.cfg.parallel == "fsdp"
    if tr.rank != 0 and not sharded:
        return
    d = _ckpt_dir(tr.out)
    final = d / f"step-{tr.step:06d}"
    part = final.with_name(final.name + ".partial")
    if tr.rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        if not final.exists():
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir()
    if sharded:
        dist.barrier()  # the folder exists (or the step is saved already) for every rank
        if final.exists():
            return
        parallel.save_sharded(tr.module, tr.opt, part / "sharded")
        dist.barrier()  # every rank's shards are written before rank 0 commits
        if tr.rank != 0:
            return
    elif final.exists():
        return
    else:
        if lora.is_lora(tr.model):  # the adapter only: the frozen base is --student
            lora.save_trainable(tr.model, part / lora.TRAINABLE_FILE)
        else:
            save_model(tr.model, str(part / "model.safetensors"))  # handles a tied embedding (one tensor, two names)
        torch.save(tr.opt.state_dict(), part / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, part / "rng.pt")
    (part / "state.json").write_text(
        json.dumps(
            {
                "step": tr.step,
                "loader": tr.loader_state,
                "config": dataclasses.asdict(tr.cfg),
                "world_size": tr.world,
                "counters": getattr(tr, "counters", None),
            },
            indent=1,
        )
    )
    os.replace(part, final)
    for old in sorted(p for p in d.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def load_training_state(path: Path, tr) -> tuple[int, dict]:
    from safetensors.torch import load_model

    sharded = (path / "sharded").is_dir()
    if sharded and tr.cfg.parallel == "fsdp":
        parallel.load_sharded(tr.module, tr.opt, path / "sharded")  # any number of ranks (DCP reshards)
    elif sharded:
        raise ValueError(f"{path} holds a sharded (FSDP) checkpoint; resume it with --parallel fsdp")
    elif parallel.is_fsdp(tr.module):
        raise ValueError(f"{path} holds an unsharded checkpoint; resume it with --parallel ddp")
    elif lora.is_lora(tr.model) and (path / lora.TRAINABLE_FILE).exists():
        lora.load_trainable(tr.model, path / lora.TRAINABLE_FILE, tr.device)
        tr.opt.load_state_dict(torch.load(path / "optimizer.pt", map_location=tr.device, weights_only=False))
    else:
        load_model(tr.model, str(path / "model.safetensors"), device=str(tr.device))
        tr.opt.load_state_dict(torch.load(path / "optimizer.pt", map_location=tr.device, weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    st = json.loads((path / "state.json").read_text())
    if st.get("counters"):
        tr.counters = st["counters"]
    return int(st["step"]), step_boundary(st["loader"], int(st.get("world_size", tr.world)))


def save_final(tr) -> Path | None:
    """The Hugging Face export, written by rank 0; under FSDP all ranks gather the weights first."""
    out = tr.out / "final"
    part = tr.out / "final.partial"
    if parallel.is_fsdp(tr.module):
        state = parallel.gathered_model_state(tr.module)  # collective: full tensors on rank 0 only
        if tr.rank != 0:
            return None
        model = _plain_copy(tr.model, state, tr.peft_model)
    elif tr.rank != 0:
        return None
    else:
        model = tr.peft_model or tr.model
    shutil.rmtree(part, ignore_errors=True)
    adapter = tr.peft_model is not None
    if adapter:  # the adapter; with --merge also part/merged, the merged student
        lora.export(model, part, tr.cfg.merge)
    else:
        model.save_pretrained(str(part), safe_serialization=True)
    for folder in [part] + ([part / "merged"] if adapter and tr.cfg.merge else []):
        tr.tok.save_pretrained(str(folder))
        shutil.copy(tr.out / "train_config.json", folder / "train_config.json")
        write_card(folder, card_info(tr, adapter=adapter and folder == part))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(part, out)
    return out


def _plain_copy(model, state: dict, peft_model=None):
    """An unsharded CPU model of the same class holding `state` (built on the meta device: no extra copy);
    with `peft_model`, a peft model with the same adapter."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        # The adapter is injected into `plain` in place: the gathered state's names are plain's own.
        wrapped = lora.plain_like(peft_model, plain) if peft_model is not None else None
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    if unexpected or missing:
        raise RuntimeError(
            f"the gathered FSDP state does not fit {type(plain).__name__}: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    if getattr(model.config, "tie_word_embeddings", False):
        # The gathered state names the tied tensor twice; make it one again so the
        # export is tied like the student it came from.
        plain.tie_weights()
        assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    return wrapped or plain
