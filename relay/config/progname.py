"""How to spell the ``m365relay`` command in a hint, so that it can be pasted as printed.

A checkout's ``scripts/demo`` runs ``.venv/bin/m365relay``, which is not on PATH: a hint that
says ``m365relay sandbox`` would fail with "command not found" in a newcomer's first minutes.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

__all__ = ["command"]


def command(argv0: str | None = None) -> str:
    """``m365relay`` when that name on PATH is this program, else the path it was run by
    (relative to the working directory when inside it), or ``python -m relay``."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    program = Path(argv0)
    if program.name == "m365relay":
        found = shutil.which("m365relay")
        if found is not None and _same(Path(found), program):
            return "m365relay"
        return _shown(program)
    # `python -m relay` (argv[0] is relay/__main__.py), or an embedding program.
    return f"{_shown(Path(sys.executable))} -m relay"


def _same(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _shown(path: Path) -> str:
    """Relative to the working directory if inside it; "./" when it is right there, or the
    shell would look the name up on PATH."""
    if "/" not in str(path):
        return str(path)
    try:
        relative = str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
    return relative if "/" in relative else f"./{relative}"
