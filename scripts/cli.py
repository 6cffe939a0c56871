"""The `deltakd` console command: one subcommand per verb, each in its own module.

deltakd cache build|add-student|inspect|validate ...
deltakd train ...      deltakd eval ...      deltakd demo ...
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from deltakd import __version__, cache_cmd

    parser = argparse.ArgumentParser(prog="deltakd", description="Offline Delta Knowledge Distillation for LLMs.")
    parser.add_argument("--version", action="version", version=f"deltakd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    cache_cmd.register(sub)
    for name in ("train_cmd", "eval_cmd", "demo_cmd"):
        try:
            mod = __import__(f"deltakd.{name}", fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != f"deltakd.{name}":
                raise
            continue
        mod.register(sub)
    ns = parser.parse_args(argv)
    return run_verb(ns)


def run_verb(ns) -> int:
    """Run the verb; what users cause becomes one line on stderr, never a traceback.

    Exit codes: 2 for refusals and errors, 128 + signal number for a graceful stop
    (130 Ctrl-C, 143 SIGTERM). DELTAKD_DEBUG=1 shows the traceback instead. An object
    store that still does not answer after the retries (deltakd.runtime.remote) is one
    line naming the operation and URL, on every rank that met it.
    """
    import errno
    import os
    import warnings

    from deltakd.runtime import remote
    from deltakd.runtime.lock import LockedError
    from deltakd.runtime.stop import Stopped

    def fail(msg: str, code: int = 2) -> int:
        if os.environ.get("DELTAKD_DEBUG"):
            raise
        _close_progress_bars()
        print(f"deltakd: error: {msg}", file=sys.stderr)
        return code

    try:
        return ns.func(ns) or 0
    except Stopped as e:
        _close_progress_bars()
        print(f"deltakd: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        return fail("interrupted (Ctrl-C); a killed run resumes when started again with the same command", 130)
    except Exception as e:
        # First: a read that failed on the network must not read as a damaged cache.
        msg = remote.failure_message(e, _verb(ns), _store_url(ns), _advice(ns))
        if msg is not None:
            # zarr's concurrent writes of the failed group leave coroutines that never ran;
            # Python would name each at exit. The line above says what happened.
            warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
            return fail(msg)
        if not isinstance(e, (ValueError, LockedError, FloatingPointError, OSError)):
            raise
        if not isinstance(e, OSError):  # DataError, CheckpointError, CacheFormatError, ...
            return fail(str(e))
        if e.errno == errno.ENOSPC:
            return fail(
                f"no space left on the device while writing {e.filename or 'the output'}"
                f"{getattr(e, 'deltakd_need', '')}; free space (or choose another folder) and run the same "
                "command again: finished work is kept"
            )
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            return fail(f"cannot write {e.filename or 'the output'} ({e.strerror}): choose a folder you can write to")
        if e.errno == errno.ENOENT:
            return fail(f"{e.filename or e}: no such file or folder")
        return fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))


def _store_url(ns) -> str | None:
    """The object-store URL the verb works on (a cache given as --cache, --out or positionally)."""
    for v in (getattr(ns, "cache", None), getattr(ns, "out", None)):
        if v is not None and "://" in str(v):
            return str(v)
    return None


def _advice(ns) -> str:
    """What a verb stopped by the network keeps, and how to go on."""
    if getattr(ns, "command", None) == "train":
        return "the last checkpoint is kept: run the same command again to resume"
    if getattr(ns, "verb", None) in ("build", "add-student"):
        return "what was committed is kept: run the same command again to resume"
    return "nothing was changed: run the same command again once the store answers"


def _verb(ns) -> str:
    return " ".join(str(v) for v in (getattr(ns, "command", None), getattr(ns, "verb", None)) if v)


def _close_progress_bars() -> None:
    """An exception left a tqdm bar open mid-line: end it, so that the message starts a line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
