"""The cache format: the contract between the teacher side and the student side.

`schema` names every array, dtype and shape and the format version (FORMAT.md is the
same contract in prose, for third-party readers and writers); `store` opens local or
object-store folders; `records` turns JSONL records into token ids and loss masks;
`support` holds the log-prob helpers both sides compute with; `reader` streams shards;
`integrity` checks checksums and values on read; `validate` checks a whole cache;
`summary` describes what a cache holds (`deltakd cache inspect`). Runs no model.
"""
