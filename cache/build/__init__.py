"""The teacher side: runs checkpoints over the data and writes the cache.

`builder` plans shards and writes them; `forward` loads checkpoints and turns their
logits into the stored support rows; `add_student` adds another student base's pass
to a finished cache. Nothing in `deltakd.student` may import this package.
"""
