"""torch.distributed set-up shared by the cache builder, add-student, the trainer and eval (runs no model).

One place decides which device a process computes on (`resolve_device`) and makes it
the current CUDA device before any model or process group touches a GPU: under
torchrun, `--device cuda` means `cuda:LOCAL_RANK`; a single process may name any
`cuda:N`. Every collective of this package goes through the helpers below.

Backends: on CPU the group is gloo. On GPU it is created as "cpu:gloo,cuda:nccl":
our own collectives (token counts, loss sums, gradients) run on tensors of the
rank's GPU and go through NCCL; the CPU backend is there for what other libraries
send from host memory (torch.distributed.checkpoint's object collectives, a
barrier before any CUDA tensor exists), so neither kind can hit the wrong backend.
"""

from __future__ import annotations

import os

import torch


def under_torchrun() -> bool:
    """True when this process was started by torchrun (even with one process)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(requested: str) -> torch.device:
    """The device this process computes on; for CUDA it also becomes the current device.

    "cpu" -> cpu. "cuda" -> cuda:LOCAL_RANK (0 without torchrun). "cuda:N" -> cuda:N for a
    single process; under torchrun with several local ranks it must equal LOCAL_RANK (else
    two ranks would share a GPU and NCCL would see the wrong one).
    """
    dev = torch.device(requested)
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"--device {requested!r}: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {requested}: no CUDA GPU is visible to this process "
            "(torch.cuda.is_available() is False); use --device cpu or a CUDA build of torch"
        )
    n_local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if dev.index is None:
        dev = torch.device("cuda", local_rank())
    elif under_torchrun() and n_local > 1 and dev.index != local_rank():
        raise ValueError(
            f"--device {requested} under torchrun with {n_local} processes per node: pass --device cuda "
            f"(rank {local_rank()} then uses cuda:{local_rank()})"
        )
    if dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"--device {requested}: only {torch.cuda.device_count()} GPU(s) visible "
            f"(local rank {local_rank()}); check --nproc_per_node and CUDA_VISIBLE_DEVICES"
        )
    # Before any allocation or process group: NCCL communicators, barriers and
    # `torch.cuda` calls without an index all follow the current device.
    torch.cuda.set_device(dev)
    return dev


def init(device: str = "cpu") -> tuple[int, int]:
    """(rank, world); resolves the device first, then joins torchrun's process group once.

    Under torchrun the group exists even with one process, so a one-GPU run takes the
    same NCCL path as eight. DELTAKD_BACKEND=gloo forces gloo (the CPU tests).
    """
    dev = resolve_device(device)
    if under_torchrun() and not torch.distributed.is_initialized():
        forced = os.environ.get("DELTAKD_BACKEND")
        if forced:
            torch.distributed.init_process_group(forced)
        elif dev.type == "cuda":
            torch.distributed.init_process_group("cpu:gloo,cuda:nccl", device_id=dev)
        else:
            torch.distributed.init_process_group("gloo")
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier(world: int | None = None) -> None:
    if active():
        torch.distributed.barrier()


def all_sum(x: torch.Tensor, world: int | None = None) -> torch.Tensor:
    """Sum over ranks in place (identity without a process group).

    `x` must live on the rank's compute device (a CUDA tensor under NCCL): the callers
    create it there, so no hidden host<->device copy happens here.
    """
    if active():
        torch.distributed.all_reduce(x)
    return x


def all_max(x: torch.Tensor) -> torch.Tensor:
    if active():
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
    return x
