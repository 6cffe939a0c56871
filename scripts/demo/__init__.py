"""The synthetic task behind `deltakd demo`, the tests and the benchmarks.

`synthetic` generates the instruction data and trains the tiny checkpoints shipped in
`assets/`; `tiny` makes tiny tokenizers and Llama models; `pipeline` runs the demo.
"""
