"""The README cannot rot: its use commands run, its links resolve, its options exist, its file tree is the repository's.

The README's use section is one fenced block marked `<!-- tested: ... -->`. Its commands run
here, in this process through `deltakd.cli.main` (a subprocess per command would spend most
of the test importing torch), on the tiny checkpoints and data of conftest.py, with the
placeholders ($TEACHER_FT, $CACHE, ...) set to them. Only sizes are appended to a command
(argparse keeps the last value of a repeated option), so that the block runs in seconds;
nothing the README writes is removed or replaced.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import write_data

from deltakd.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Markdown whose links and `deltakd` options are checked.
DOCS = [README, ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md", ROOT / "cache" / "format" / "FORMAT.md"]
DOCS += sorted((ROOT / "docs").glob("*.md"))

STEPS = 3  # optimizer steps per README training command
# What the test appends to each verb: sizes only.
SPEED = {
    ("cache", "build"): ["--max-length", "64"],
    ("train",): ["--max-steps", str(STEPS), "--batch-tokens", "256", "--log-every", "1", "--eval-batches", "2"],
    ("eval",): ["--max-examples", "3", "--max-new-tokens", "8"],
}
VERBS = [("cache", "build"), ("cache", "add-student"), ("cache", "inspect"), ("cache", "validate")]
VERBS += [("train",), ("eval",), ("demo",)]


def fenced_block_after(text: str, marker: str) -> str:
    """The body of the first fenced block after the line that starts with `marker`."""
    at = text.index(marker)
    m = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M).search(text, at)
    assert m, f"no fenced block after {marker!r}"
    return m.group(1)


def shell_commands(block: str) -> list[list[str]]:
    """Commands of a bash block: continuation lines joined, comments dropped."""
    argvs = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            argvs.append(argv)
    return argvs


def verb_of(argv: list[str]) -> tuple[str, ...]:
    assert argv[0] == "deltakd", f"the tested block runs deltakd commands only: {shlex.join(argv)}"
    return tuple(argv[1:3]) if argv[1] == "cache" else (argv[1],)


def option_after(argv: list[str], name: str) -> str:
    """The value of the last `name` in argv (argparse's rule)."""
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]


@pytest.mark.integration
def test_use_section_runs_on_tiny_checkpoints(tiny, tmp_path, capsys):
    env = {
        "TEACHER_FT": tiny["teacher_ft"],
        "TEACHER_BASE": tiny["teacher_base"],
        "STUDENT_BASE": tiny["student_base"],
        "DATA": tiny["data"],
        "TEST_DATA": write_data(tmp_path / "test.jsonl", n=6, seed=5),
        "CACHE": str(tmp_path / "cache"),
        "OUT": str(tmp_path / "out"),
    }
    block = fenced_block_after(README.read_text(), "<!-- tested:")
    ran = []
    for argv in shell_commands(block):
        # An unknown placeholder is a KeyError naming it: the README uses a variable this test does not set.
        argv = [re.sub(r"\$(\w+)", lambda m: env[m.group(1)], a) for a in argv]
        verb = verb_of(argv)
        rc = main(argv[1:] + SPEED.get(verb, []))
        out = capsys.readouterr().out
        assert rc == 0, f"{shlex.join(argv)} exited {rc}"
        ran.append(verb)
        if verb == ("cache", "build"):
            manifest = json.loads((Path(env["CACHE"]) / "manifest.json").read_text())
            assert manifest["student"] is not None and manifest["totals"]["n_supervised"] > 0
        elif verb == ("cache", "inspect"):
            assert "sequences" in out and "supervised" in out
        elif verb == ("cache", "validate"):
            assert "valid" in out
        elif verb == ("train",):
            run = Path(option_after(argv, "--out"))
            assert (run / "final" / "model.safetensors").stat().st_size > 0
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert rows[0]["step"] == 0 and rows[0]["weights"], rows[0]  # the resolved mix comes first
            assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
            if "--lam" in argv:  # the recipe lam*SFT + (1-lam)*D
                lam = float(option_after(argv, "--lam"))
                assert rows[0]["weights"]["sft"] == pytest.approx(lam)
        elif verb == ("eval",):
            models = [argv[i + 1] for i, a in enumerate(argv) if a == "--model"]
            summary = json.loads((Path(option_after(argv, "--out")) / "summary.json").read_text())
            assert [r["model"] for r in summary["results"]] == models
            assert "ROUGE-L" in out
            for r in summary["results"]:
                assert 0 <= r["rougeL"] <= 100 and r["name"] in out
    # The README's use section covers every step of the workflow.
    assert {("cache", "build"), ("cache", "inspect"), ("cache", "validate"), ("train",), ("eval",)} <= set(ran)


@functools.cache
def options_of(verb: tuple[str, ...]) -> frozenset[str]:
    """The options `deltakd VERB --help` lists."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main([*verb, "--help"])
    return frozenset(re.findall(r"--[a-z][a-z0-9-]*", buf.getvalue()))


def code_snippets(text: str) -> list[str]:
    """Lines of fenced blocks (continuations joined) and inline code spans."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)
    lines = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return lines + re.findall(r"`([^`\n]+)`", prose)


def known(option: str, opts: frozenset[str]) -> bool:
    # `--w-*` names a family of options.
    return option in opts or (option.endswith("-") and any(o.startswith(option) for o in opts))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_deltakd_option_named_in_the_docs_exists(doc):
    if not doc.exists():
        pytest.skip(f"{doc.name} not written yet")
    every = frozenset().union(*(options_of(v) for v in VERBS))
    bad = []
    for snippet in code_snippets(doc.read_text()):
        for part in re.split(r";|&&|\|", snippet):
            part = part.split(" #")[0]
            m = re.search(r"(?:^|\s)(?:deltakd|-m deltakd\.cli)\s+(cache\s+[a-z-]+|train|eval|demo)\b(.*)", part)
            if m:
                verb = tuple(m.group(1).split())
                opts = options_of(verb)
                named = re.findall(r"--[a-z][a-z0-9-]*", m.group(2))
                bad += [f"deltakd {' '.join(verb)} {o}" for o in named if not known(o, opts)]
            elif part.lstrip().startswith("--") and doc.parent.name != "benchmarks" and doc.name != "CONTRIBUTING.md":
                # A bare option in a guide names a deltakd option (benchmark options appear with their command).
                bad += [o for o in re.findall(r"--[a-z][a-z0-9-]*", part) if not known(o, every)]
    assert not bad, f"{doc.name} names options that do not exist: {bad}"


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of the headings (lowercase, punctuation dropped, spaces to hyphens)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    heads = re.findall(r"^#{1,6} +(.+?) *$", prose, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    if not doc.exists():
        pytest.skip(f"{doc.name} not written yet")
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest.read_text()):
            bad.append(f"{target}: no such heading")
    assert not bad, f"{doc.relative_to(ROOT)}: {bad}"


def tree_paths() -> tuple[list[str], list[str]]:
    """Files and folders the README's annotated tree names, as repository paths."""
    block = fenced_block_after(README.read_text(), "<!-- file tree:")
    stack: list[str] = []
    files, folders = [], []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        name = line.split()[0]
        assert indent % 2 == 0 and indent // 2 <= len(stack), f"tree line out of place: {line!r}"
        del stack[indent // 2 :]
        path = "/".join(stack + [name.rstrip("/")])
        if name.endswith("/"):
            folders.append(path)
            stack.append(name.rstrip("/"))
        else:
            files.append(path)
    return files, folders


def test_file_tree_names_every_source_file():
    files, folders = tree_paths()
    missing = [p for p in files + folders if not (ROOT / p).exists()]
    assert not missing, f"the README's file tree names paths that do not exist: {missing}"
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    # A folder named without children (assets/, data/cache_v1/) stands for everything in it.
    leaves = [f + "/" for f in folders if not any(p.startswith(f + "/") for p in files + folders)]
    unnamed = [
        p
        for p in tracked.stdout.splitlines()
        if re.search(r"\.(py|md|sh)$|^\.ci/", p)
        and p not in files
        and p != "README.md"
        and not p.endswith("__init__.py")  # each package's __init__.py is its folder's line
        and not any(p.startswith(leaf) for leaf in leaves)
    ]
    assert not unnamed, f"add a line for each to the README's file tree: {unnamed}"
