"""The student side never imports the code that runs teachers (STYLE.md)."""

import subprocess
import sys

TEACHER_SIDE = ("deltakd.cache.build.builder", "deltakd.cache.build.forward", "deltakd.cache.build.add_student")


def test_student_modules_do_not_import_teacher_code():
    code = (
        "import sys, pkgutil, importlib, deltakd.student as s\n"
        "for m in pkgutil.iter_modules(s.__path__): importlib.import_module('deltakd.student.' + m.name)\n"
        f"bad = [m for m in {TEACHER_SIDE!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert len([m for m in sys.modules if m.startswith('deltakd.student.')]) >= 5\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
