"""Run a `deltakd` command with every torch.distributed collective checked (a launcher for the 2-rank tests).

    torchrun --nproc_per_node 2 tests/collective_guard.py LOG_DIR train --device cpu ...

NCCL reduces only tensors on the rank's own GPU. On the CPU test machine the group is
gloo, which would accept a tensor anywhere, so this wrapper asserts what NCCL needs:
each tensor handed to a collective lives on the device the rank computes on
(`cuda:LOCAL_RANK` for `--device cuda`, else cpu). Each rank writes the calls it saw.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import sys

import torch
import torch.distributed as td

OPS = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "reduce",
    "all_to_all_single",
    "gather",
    "scatter",
)
calls: collections.Counter = collections.Counter()


def expected_device(argv: list[str]) -> torch.device:
    dev = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
    return (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if dev.startswith("cuda") else torch.device("cpu")
    )


def tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from tensors(y)


def guard(op: str, fn, want: torch.device):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        for t in tensors(list(args) + list(kwargs.values())):
            local = t.to_local() if hasattr(t, "to_local") else t
            if local.device != want:
                raise AssertionError(f"torch.distributed.{op} got a tensor on {local.device}; NCCL needs {want}")
        calls[op] += 1
        return fn(*args, **kwargs)

    return wrapped


def install(want: torch.device) -> None:
    for op in OPS:
        if hasattr(td, op):
            setattr(td, op, guard(op, getattr(td, op), want))


def main() -> int:
    log_dir, argv = sys.argv[1], sys.argv[2:]
    install(expected_device(argv))
    from deltakd.cli import main as cli

    try:
        return cli(argv)
    finally:
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump(dict(calls), f)


if __name__ == "__main__":
    sys.exit(main())
