"""Commands the relay tells an admin to run, spelled so they work when pasted.

A hint that omits ``--config`` sends the admin to the command's default file, which is not the
file in use unless it is that default: ``m365relay login home-printer`` then reads another
config and fails. Every hint naming a command is built here, with the config it came from.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from relay.config.records import DEFAULT_PATH

# The config file of the packaged service (systemd/m365relay.service), and the default of the
# commands that have one (`login`, `doctor`); `queue` and `check-config` need it named.
DEFAULT_CONFIG = DEFAULT_PATH
_WITH_DEFAULT = frozenset({"login", "doctor"})


def is_default(config: Path) -> bool:
    return config.absolute() == DEFAULT_CONFIG


def command(verb: str, *args: str, config: Path | None = None, selector: str = "",
            program: str = "m365relay") -> str:
    """``m365relay VERB ARGS --config CONFIG``, --config left out only where the command would
    read the same file without it. ``selector`` replaces --config (``--spool DIR``); ``program``
    is how to spell the command (relay.config.progname, for a hint printed to a terminal)."""
    words = [program, verb, *(a if a.startswith(("<", "--")) else shlex.quote(a)
                                  for a in args)]
    if selector:
        words.append(selector)
    elif config is not None and not (verb in _WITH_DEFAULT and is_default(config)):
        words += ["--config", shlex.quote(str(config))]
    return " ".join(words)
