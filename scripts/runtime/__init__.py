"""Run utilities shared by the cache builder, the student trainer and the CLI.

`dist` (ranks and devices under torchrun), `lock` (one writer per output folder), `lease`
(one writer per cache URL in an object store, across hosts),
`remote` (object-store retries, timeouts and the one-line report of a network fault),
`stop` (graceful stops on SIGTERM / Ctrl-C), `config` (strict checks of configuration
values) and `checkpoints` (checkpoint paths and identities). Knows nothing of the
cache layout and runs no model.
"""
