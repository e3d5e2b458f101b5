"""Reading a config: the YAML file (or already-parsed data) checked against a record class,
with every problem collected by key path into one :class:`ConfigError`. The records it
builds are in :mod:`relay.config.records`; only the CLI turns the error into an exit code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from relay.config.check import Failed, Record, Run, validate

R = TypeVar("R", bound=Record)

# Keys that must be unique across a section's items (``accounts[*].username``); a bind of
# port 0 (any free port) may repeat.
UNIQUE = (("listeners", "name"), ("accounts", "name"), ("accounts", "username"),
          ("listeners", "bind"))


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists every one by key path."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(f"{source}: {count} problem(s) in the configuration:\n{lines}")


def _duplicates(data: Mapping[str, Any]) -> list[str]:
    """Checks across list items, run on the raw data so they are reported with the rest."""
    problems = []
    for section, key in UNIQUE:
        items = data.get(section)
        if not isinstance(items, list):
            continue
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            value = item.get(key) if isinstance(item, Mapping) else None
            if not isinstance(value, str) or value.endswith(":0"):
                continue
            if value in seen:
                problems.append(f"{section}[{i}].{key}: {value!r} is already used by "
                                f"{section}[{seen[value]}]; it must be unique")
            seen.setdefault(value, i)
    return problems


def parse_as(kind: type[R], data: Any, *, source: str = "config",
             base_dir: Path | None = None) -> R:
    """Validate already-parsed YAML data as ``kind``; raises ConfigError listing every
    problem."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, ["(top level): expected a mapping with listeners, apps, "
                                   "accounts and spool"])
    apps = data.get("apps")
    context = {
        "base_dir": str(base_dir or Path.cwd()),
        "apps": set(apps) if isinstance(apps, Mapping) else set(),
    }
    problems = _duplicates(data)
    run = Run(context)
    try:
        config = validate(kind, data, run)
    except Failed:
        raise ConfigError(source, problems + run.problems) from None
    if problems:
        raise ConfigError(source, problems)
    return config


def load_as(kind: type[R], path: Path) -> R:
    """Read a config file and validate it as ``kind``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        hint = ""
        if isinstance(exc, FileNotFoundError):
            hint = ("; name the config file on the command line (start from "
                    "config/m365relay.example.yaml of the source, or try config/demo.yaml "
                    "with the sandbox)")
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror}{hint}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), [f"{where}not valid YAML ({problem})"]) from None
    return parse_as(kind, data, source=str(path), base_dir=path.resolve().parent)
