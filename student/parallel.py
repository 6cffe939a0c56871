"""Student data parallelism on torch's own engines (DDP, FSDP2) and their checkpoints.

    deltakd train ... --parallel ddp    # DistributedDataParallel: full replica per rank, bucketed
                                        # all-reduce overlapped with the backward
    deltakd train ... --parallel fsdp   # FSDP2 fully_shard per decoder layer + root; with --bf16,
                                        # bf16 parameters in compute and fp32 gradient reduction;
                                        # checkpoints by torch.distributed.checkpoint, loadable on
                                        # any number of ranks (one process without torchrun too)

The fused head+loss (objective.chunked_loss) reads the output layer's weight outside
the Hugging Face model's forward. Under FSDP that weight would still be sharded
(its pre-forward all-gather never fires) and under DDP the reducer would not be
prepared for the backward. So the trainer calls `StudentLoss`, a module whose forward
is decoder + loss: the engines' hooks wrap the whole use of every parameter. The
output layer and the input embedding stay in the root unit, so a tied pair is one
parameter in one unit in every mode.

Gradient scale: the loss is already normalised by the step's supervised tokens over
all ranks, so gradients must be *summed* across ranks; both engines average by
default, which is switched off below.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from deltakd.runtime import dist
from deltakd.student.objective import LossSpec, chunked_loss

PARALLEL = ("ddp", "fsdp")


class StudentLoss(torch.nn.Module):
    """forward(batch tensors) -> (Σ weight·term sums, per-term sums (n_active,)) of one micro-batch."""

    def __init__(self, model: torch.nn.Module, spec: LossSpec, vocab: int, autocast_bf16: bool = False):
        super().__init__()
        self.model, self.spec, self.vocab, self.autocast_bf16 = model, spec, vocab, autocast_bf16

    def forward(self, input_ids, attention_mask, loss_mask, targets: dict):
        dev = input_ids.device.type
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            h = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        head = self.model.get_output_embeddings()
        hidden = h[loss_mask]  # (N_sup, H)
        # fp32 weights: the loss runs in fp32. bf16 weights (FSDP mixed precision): the
        # projection runs in bf16 like autocast would, logits are upcast inside the loss.
        hidden = hidden.float() if head.weight.dtype == torch.float32 else hidden.to(head.weight.dtype)
        return chunked_loss(hidden, head, targets, self.spec, self.vocab)


def decoder_layers(model) -> list[torch.nn.Module]:
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__}: no decoder `.layers` list to shard with --parallel fsdp; use --parallel ddp"
        )
    return list(layers)


def wrap(module: StudentLoss, mode: str, device: torch.device, bf16: bool) -> torch.nn.Module:
    """The module the trainer calls: plain without a process group, else DDP or FSDP2."""
    if mode not in PARALLEL:
        raise ValueError(f"--parallel {mode!r}: choose one of {', '.join(PARALLEL)}")
    if not dist.active():
        return module
    if mode == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        # No buffer broadcast in forward: the only buffers (rotary frequencies) never change,
        # and a broadcast in every forward would also put a collective in eval. (torch 2.13
        # renamed the switch; older versions only know broadcast_buffers.)
        no_sync_buffers = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else {"broadcast_buffers": False}
        )
        ddp = DDP(module, device_ids=[device.index] if device.type == "cuda" else None, **no_sync_buffers)
        ddp.register_comm_hook(None, _sum_allreduce_hook)
        return ddp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    # cast_forward_inputs off: the root's inputs include the cached float targets, which
    # must not be rounded to bf16; hidden states are bf16 anyway once the embedding is.
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32 if bf16 else None,
        cast_forward_inputs=False,
    )
    for layer in decoder_layers(module.model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(module, mesh=mesh, mp_policy=mp)
    for m in module.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)  # sum, not mean (see the module docstring)
            # A plain SUM reduce-scatter: gloo has no PREMUL_SUM, and NCCL's zero-copy path wants SUM.
            m.set_force_sum_reduction_for_comms(True)
    return module


def _sum_allreduce_hook(state, bucket):
    return torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


def is_fsdp(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def set_sync(module, sync: bool):
    """Gradient communication only on the last micro-batch of a step (accumulation)."""
    if is_fsdp(module):
        module.set_requires_gradient_sync(sync)
        return nullcontext()
    if hasattr(module, "no_sync") and not sync:
        return module.no_sync()
    return nullcontext()


def full_value(x) -> torch.Tensor:
    """A DTensor (FSDP's grad norm) as a plain tensor; other tensors unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


# ---------------------------------------------------------------- FSDP checkpoints
def save_sharded(module, opt, path: Path) -> None:
    """Every rank writes its shards (torch.distributed.checkpoint); collective. One process (no group) writes all."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(module, opt)
    with _single_process_is_meant():
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def load_sharded(module, opt, path: Path) -> None:
    """Load shards saved on any number of ranks into this one's (DCP reshards); collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(module, opt)
    state = {"model": msd, "optim": osd}
    with _single_process_is_meant():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


@contextmanager
def _single_process_is_meant():
    """DCP warns when it runs without a process group; one process with --parallel fsdp is meant."""
    with warnings.catch_warnings():
        if not dist.active():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def gathered_model_state(module) -> dict:
    """The full Hugging Face state dict on rank 0 (CPU), empty on the others; collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in sd.items()}
