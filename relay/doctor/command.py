"""The ``doctor`` subcommand: arguments, and turning a report into output and an exit code."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

from relay.config import commands, progname
from relay.config import records as config_mod
from relay.doctor.report import Check, Report, Status, render_json, render_text

DEFAULT_CONFIG = commands.DEFAULT_CONFIG
EX_USAGE = 2
_ADDRESS = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+\.[^@\s<>\"]+$")


class UnknownAccount(LookupError):
    """``--account`` names no account in the config."""


async def diagnose(path: Path, *, account: str | None = None, send_to: str | None = None,
                   timeout: float = 20.0, from_env: bool = False) -> Report:
    """Walk the chain for every account (or the one named) of the config at ``path`` (or of
    the M365RELAY_* variables with ``from_env``, as in the container image)."""
    from relay.config.env import SOURCE, load_source

    source = _source(path, from_env)
    try:
        config, loaded = load_source(path, from_env_vars=from_env)
    except config_mod.ConfigError as exc:
        fix = (f"Fix the problems listed above, then run "
               f"`{commands.command('check-config', str(path), program=progname.command())}` "
               "until it says OK."
               if source != SOURCE else
               "Fix the variables listed above and start the container again.")
        return Report(source, Check(
            "config", Status.FAIL, detail=f"{len(exc.problems)} problem(s)",
            summary="The configuration is not valid, so nothing else can be checked.",
            fix=fix), problems=exc.problems)
    accounts = list(config.accounts)
    if account is not None:
        accounts = [a for a in accounts if a.name == account]
        if not accounts:
            known = ", ".join(a.name for a in config.accounts)
            raise UnknownAccount(f"{source} has no account named {account!r} (accounts: {known})")
    from relay.doctor.chain import Doctor

    detail = (f"{len(config.listeners)} listener(s), {len(config.apps)} app(s), "
              f"{len(config.accounts)} account(s)")
    report = Report(source, Check("config", Status.OK, detail=detail))
    from relay.doctor.listeners import listener_checks

    report.listeners = await asyncio.to_thread(listener_checks, config)
    from relay.doctor.database import database_checks

    report.listeners += await database_checks(config)
    report.accounts = await Doctor(config, timeout=timeout, send_to=send_to,
                                   config_path=loaded).run(accounts)
    return report


def cmd_doctor(args: argparse.Namespace) -> int:
    from relay.service.logs import setup_logging

    # The report says everything; log lines would repeat it in another shape.
    setup_logging("debug" if args.verbose else "critical")
    try:
        report = asyncio.run(diagnose(args.config or DEFAULT_CONFIG, account=args.account,
                                      send_to=args.send_to, timeout=args.timeout,
                                      from_env=_from_env(args)))
    except UnknownAccount as exc:
        print(f"m365relay doctor: {exc}", file=sys.stderr)
        return EX_USAGE
    output = render_json(report) if args.json else render_text(report, sys.stdout)
    sys.stdout.write(output)
    sys.stdout.flush()
    return report.exit_code


def _source(path: Path, from_env: bool) -> str:
    """What the report's header names: with `from_env` and no file at `path`, the variables,
    not a file that does not exist."""
    from relay.config.env import SOURCE

    return str(path) if path.exists() or not from_env else SOURCE


def _from_env(args: argparse.Namespace) -> bool:
    """Plain `m365relay doctor` in the container image: the variables when no file is there."""
    from relay.config.env import PREFIX

    return bool(args.config_from_env or (
        args.config is None and any(k.startswith(PREFIX) for k in os.environ)))


def _address(value: str) -> str:
    if not _ADDRESS.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not an email address")
    return value


def add_parser(sub: Any) -> None:
    """Register ``doctor`` on the CLI's subparsers."""
    p = sub.add_parser(
        "doctor", help="check every link from config to Exchange Online and say how to fix "
                       "the first broken one",
        description="Walk config → credential → token endpoint → token (claims) → upstream → "
                    "STARTTLS → XOAUTH2 (→ test message) for each account; stop at the first "
                    "broken link and print its fix. Exit 0 all fine, 1 a link is broken, "
                    "2 usage error, 78 invalid config.")
    p.add_argument("--config", "-c", type=Path, default=None,
                   help=f"YAML config file (default {DEFAULT_CONFIG}; without --config, "
                        "M365RELAY_* variables are used when that file does not exist, as in "
                        "the container image)")
    p.add_argument("--config-from-env", action="store_true",
                   help="build the config from M365RELAY_* variables when the --config file "
                        "does not exist (what the container image does)")
    p.add_argument("--account", metavar="NAME", help="check only this account")
    p.add_argument("--send-to", metavar="ADDRESS", type=_address,
                   help="also send a test message to ADDRESS through each checked mailbox")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--timeout", type=float, default=20.0, metavar="SECONDS",
                   help="per network step (default 20)")
    p.add_argument("--verbose", "-v", action="store_true", help="also print debug logs to stderr")
    p.set_defaults(func=cmd_doctor)
