"""The memory-lean student side: losses, cache streaming, the training loop, evaluation.

Imports from outside this package: `deltakd.runtime` (ranks, locks, signals, config
checks, checkpoint identity) and the reading half of `deltakd.cache.format` (schema,
store, records, support, reader, integrity). No teacher is ever loaded here;
tests/test_boundary.py holds the allow-list.
"""
