"""deltakd: offline Delta Knowledge Distillation. Command-line entry points live here,
one module per verb; the library is in `deltakd.cache` and `deltakd.student`."""

__version__ = "0.1.0"
