"""The architecture, as tests: which room may import which, and no import cycles.

Rooms (package docstrings say the same):
- `deltakd.runtime`: run utilities (ranks, locks, signals, config checks, checkpoint identity); imports no other room
- `deltakd.cache.format`: the cache contract; imports `runtime` only
- `deltakd.cache.build`: the teacher side; imports `format` and `runtime`
- `deltakd.student`: the student side; imports `runtime` and the reading half of `format`, never `build`
- `deltakd.demo` and the CLI verbs (`deltakd.cli`, `deltakd.*_cmd`): may use every room
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"deltakd": ROOT / "scripts", "deltakd.cache": ROOT / "cache", "deltakd.student": ROOT / "student"}

# What importing every student module may load, and nothing else.
STUDENT_ALLOWED = {
    "deltakd",
    "deltakd.cache",
    "deltakd.cache.format",
    "deltakd.cache.format.integrity",
    "deltakd.cache.format.reader",
    "deltakd.cache.format.records",
    "deltakd.cache.format.schema",
    "deltakd.cache.format.sources",
    "deltakd.cache.format.store",
    "deltakd.cache.format.support",
    "deltakd.runtime",
    "deltakd.runtime.checkpoints",
    "deltakd.runtime.config",
    "deltakd.runtime.dist",
    "deltakd.runtime.lock",
    "deltakd.runtime.remote",
    "deltakd.runtime.stop",
}

# room -> rooms its modules may import (every import, also those inside functions)
MAY_IMPORT = {
    "runtime": {"runtime"},
    "format": {"format", "runtime"},
    "build": {"build", "format", "runtime"},
    "student": {"student", "format", "runtime"},
}


def room(module: str) -> str:
    parts = module.split(".")
    if parts[:2] == ["deltakd", "runtime"]:
        return "runtime"
    if parts[:3] == ["deltakd", "cache", "format"]:
        return "format"
    if parts[:3] == ["deltakd", "cache", "build"]:
        return "build"
    if parts[:2] == ["deltakd", "student"]:
        return "student"
    if parts[:2] == ["deltakd", "demo"]:
        return "demo"
    return "cli" if len(parts) > 1 else "package"


def modules() -> dict[str, Path]:
    out = {}
    for prefix, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            name = ".".join((prefix, *rel)) if rel else prefix
            if prefix == "deltakd" and rel and rel[0] in ("cache", "student"):
                continue
            out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> dict[str, bool]:
    """deltakd modules `name` imports -> whether at module level (what a cycle needs)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top_level = {id(n) for n in tree.body}
    out: dict[str, bool] = {}

    def add(target: str, node) -> None:
        while target not in known and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in known and target != name:
            out[target] = out.get(target, False) or id(node) in top_level

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, node)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                add(f"{base}.{a.name}", node)
    return out


def graph() -> dict[str, dict[str, bool]]:
    mods = modules()
    return {n: imports_of(n, p, set(mods)) for n, p in mods.items()}


def test_student_modules_load_only_the_allowed_cache_and_runtime_modules():
    code = (
        "import sys, pkgutil, importlib, deltakd.student as s\n"
        "for m in pkgutil.iter_modules(s.__path__): importlib.import_module('deltakd.student.' + m.name)\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith('deltakd') and not m.startswith('deltakd.student')))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    loaded = set(res.stdout.split())
    assert loaded - STUDENT_ALLOWED == set(), "the student side loads modules outside its allow-list"
    assert "deltakd.cache.format.reader" in loaded  # the check sees what the student really imports


def test_every_room_imports_only_the_rooms_below_it():
    bad = [
        f"{src} imports {dst}"
        for src, targets in graph().items()
        for dst in targets
        if room(src) in MAY_IMPORT and room(dst) not in MAY_IMPORT[room(src)] and room(dst) != "package"
    ]
    assert bad == []


def test_no_import_cycles_at_module_level():
    g = {n: {d for d, top in t.items() if top} for n, t in graph().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(n, stack):
        state[n] = 1
        for d in g.get(n, ()):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in g:
        if n not in state:
            visit(n, [n])
    assert cycles == []


def test_the_checks_can_fail():
    assert room("deltakd.cache.build.builder") not in MAY_IMPORT["student"]
    g = graph()
    assert "deltakd.cache.format.schema" in g["deltakd.cache.build.builder"]  # the graph sees real imports
    assert g["deltakd.cache.build.builder"]["deltakd.cache.format.schema"] is True
