"""Real external programs the tests drive (promtool, prometheus, chromium, curl).

Where one is missing the test is skipped with the reason printed, except in CI (CI=true),
where scripts/setup must have installed it, so its absence fails."""

from __future__ import annotations

import os
import shutil

import pytest


def need(program: str, package: str) -> str:
    path = shutil.which(program)
    if path is None:
        reason = f"{program} not found: install Debian's {package} (scripts/setup does)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path
