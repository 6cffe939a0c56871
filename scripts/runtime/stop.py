"""Graceful stops on SIGTERM (what schedulers send before preemption) and Ctrl-C.

    with graceful_stop("train", at="boundary"):   # the loop polls stop_requested() between steps
    with graceful_stop("cache build", at="once"): # the signal raises Stopped where the build is

`boundary`: the first signal only records the request; the training loop checks it at
each step boundary, saves a checkpoint and raises `Stopped`. A second Ctrl-C aborts at
once (KeyboardInterrupt), for a user who cannot wait for the step to end.
`once`: the signal raises `Stopped` in the main thread, except inside a zarr group
write (`deferred()`), which is finished first. A build's writes are atomic (write
aside, rename), so the shard in progress is abandoned as cleanly as by `kill -9` and its
leftovers are removed; committed shards are kept and a re-run resumes.
Shared by the builder and the trainer; runs no model.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_requested: list[int] = []
_deferring: list[int] = [0]  # depth of deferred() blocks
_pending: list[tuple[str, int]] = []  # a `once` signal that arrived inside one


class Stopped(Exception):
    """A stop was asked for by a signal and carried out; the message says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def signal_name(signum: int) -> str:
    return {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}.get(signum, f"signal {signum}")


def stop_requested(world: int = 1, device=None) -> int | None:
    """The signal number asked for, else None; under torchrun, any rank's request stops all ranks.

    `device`: the rank's compute device (NCCL reduces only tensors on the rank's GPU).
    """
    sig = _requested[0] if _requested else 0
    if world > 1:
        import torch

        from deltakd.runtime import dist

        t = dist.all_sum(torch.tensor([float(sig)], device=device), world)  # one tiny all-reduce per step
        sig = int(t.item()) and (sig or signal.SIGTERM)
    return sig or None


@contextmanager
def graceful_stop(what: str, at: str = "boundary"):
    """Install SIGTERM/SIGINT handlers for the body (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if at == "once":
            if _deferring[0]:
                _pending.append((what, signum))
                return
            raise Stopped(f"{what} stopped by {signal_name(signum)}", signum)
        if _requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not _requested:
            _requested.append(signum)
            import sys

            print(
                f"\ndeltakd: {signal_name(signum)} received: {what} stops at the next step boundary "
                "after saving a checkpoint" + (" (Ctrl-C again aborts now)" if signum == signal.SIGINT else ""),
                file=sys.stderr,
                flush=True,
            )

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    _requested.clear()
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _requested.clear()


@contextmanager
def deferred():
    """A `once` stop that arrives inside takes effect at its end: a zarr group write runs to
    completion (its IO thread would otherwise keep writing into a folder being removed)."""
    _deferring[0] += 1
    try:
        yield
    finally:
        _deferring[0] -= 1
    if not _deferring[0] and _pending:
        what, signum = _pending.pop()
        _pending.clear()
        raise Stopped(f"{what} stopped by {signal_name(signum)}", signum)
