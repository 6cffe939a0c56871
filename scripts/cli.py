"""The `deltakd` console command: one subcommand per verb, each in its own module.

    deltakd cache build|add-student|inspect|validate ...
    deltakd train ...      deltakd eval ...      deltakd demo ...
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from . import __version__, cache_cmd

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
    from deltakd.cache.forward import CheckpointError
    from deltakd.cache.records import DataError
    from deltakd.cache.schema import CacheFormatError

    try:
        return ns.func(ns) or 0
    except (DataError, CheckpointError, CacheFormatError, FloatingPointError) as e:
        print(f"deltakd: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"deltakd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
