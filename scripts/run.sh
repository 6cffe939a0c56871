#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating it on first use.
#   bash scripts/run.sh deltakd demo        # the end-to-end demo
#   bash scripts/run.sh python -m pytest -q # the tests
# torch is pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${DELTAKD_VENV:-$root/.venv}"
stamp="$venv/.deltakd-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "torch==${DELTAKD_TORCH:-2.13.0}"
    "$venv/bin/python" -m pip install -q -e "$root[dev]"
    touch "$stamp"
fi
cd "$root"
export PATH="$venv/bin:$PATH"
exec "$@"
