"""The teacher cache: format (schema), record formatting, builder, reader, inspection.

`deltakd.student` may import `schema`, `reader`, `records` and `dist` only; the modules that
run checkpoints (`builder`, `forward`) belong to the cache-building side.
"""
