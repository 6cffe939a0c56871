"""The memory-lean student side: losses, cache streaming, the training loop, evaluation.

Imports from the cache side are limited to `deltakd.cache.format.schema`, `.reader`,
`.records` and `.dist`; no teacher is ever loaded here (tests/test_boundary.py guards this).
"""
