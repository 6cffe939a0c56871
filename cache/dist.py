"""torch.distributed set-up shared by the cache builder and the trainer (runs no model)."""
from __future__ import annotations

import os

import torch


def init() -> tuple[int, int]:
    """(rank, world) from torchrun's environment; initialises the process group once.

    NCCL when CUDA is there, gloo otherwise or when DELTAKD_BACKEND=gloo (CPU tests).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("DELTAKD_BACKEND") != "gloo" else "gloo"
        torch.distributed.init_process_group(backend)
    return int(os.environ.get("RANK", "0")), world


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    """Sum over ranks in place (identity on one rank)."""
    if world > 1:
        torch.distributed.all_reduce(x)
    return x
