"""Benchmark scripts: each prints a table and ends with one JSON line; run from the repository root.

    python -m benchmarks.cache_build     # build time / bare forwards
    python -m benchmarks.train_step      # step time, memory, loader throughput
    python -m benchmarks.quality         # ROUGE-L of students over seeds

Measured tables, with command, date, commit and machine, are in benchmarks/README.md.
Shared tasks: `synth_vocab` (V = 32000, random weights) and `bpe_task` (V = 8192, trained).
"""

from pathlib import Path

# Self-Instruct's user-oriented instructions in ../shared/data: the prompts the SmolLM2 benchmarks score.
SELF_INSTRUCT = Path(__file__).resolve().parents[2] / "shared/data/eval/self_inst_user_oriented_instructions.jsonl"
