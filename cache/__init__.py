"""The teacher cache, in two rooms.

`deltakd.cache.format` is the contract (schema, store, records, support, reader,
integrity, validate, summary; FORMAT.md says the same in prose). `deltakd.cache.build`
runs checkpoints and writes caches. The student side imports the reading half of
`format` and never `build` (tests/test_boundary.py holds the allow-list).
"""
