"""The ``m365relay`` command. The only place that turns errors into exit codes.

Exit codes: 0 ok; 1 runtime failure; 2 usage error; 69 cannot start (port in use, spool not
writable); 78 invalid configuration (EX_CONFIG, as in sysexits.h).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from relay import __version__
from relay import config as config_mod

EX_CONFIG = 78
EX_UNAVAILABLE = 69
log = logging.getLogger("m365relay")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        # journald stamps each line itself.
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter at DEBUG can include protocol lines (AUTH blobs); keep it quiet. aiosmtpd
    # ("mail.log") also warns about its own deprecated login_data on every AUTH.
    for name in ("aiosmtplib", "msal", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.ERROR)


def _load(path: Path) -> config_mod.Config | None:
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EX_CONFIG
    print(f"{args.config}: OK ({len(config.listeners)} listener(s), {len(config.apps)} app(s), "
          f"{len(config.accounts)} account(s))")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.service import StartupError, run

    setup_logging(args.log_level, args.log_format)
    config = _load(args.config)
    if config is None:
        return EX_CONFIG
    try:
        asyncio.run(run(config, config_path=args.config, shutdown_timeout=args.shutdown_timeout))
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return EX_UNAVAILABLE
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    from relay.auth import hash_password

    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password for the device: ")
        if password != getpass.getpass("Again: "):
            print("The passwords differ; nothing was written.", file=sys.stderr)
            return 1
    if not password:
        print("An empty password is not allowed.", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from relay.sandbox import run_sandbox

    setup_logging(args.log_level)
    try:
        asyncio.run(run_sandbox(args.dir, entra_port=args.entra_port, smtp_port=args.smtp_port))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        log.error("cannot start the sandbox: %s", exc)
        return EX_UNAVAILABLE
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from relay.demo import run_demo

    setup_logging(args.log_level)
    return asyncio.run(run_demo(args.config))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m365relay",
        description="SMTP relay for legacy devices: plain SMTP in, Exchange Online (OAuth 2.0, "
                    "XOAUTH2) out.")
    parser.add_argument("--version", action="version", version=f"m365relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_config(p: argparse.ArgumentParser, default: str | None = None) -> None:
        p.add_argument("config", nargs="?" if default else None, type=Path, default=default,
                       metavar="CONFIG", help="YAML config file")

    def add_log(p: argparse.ArgumentParser) -> None:
        p.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])

    p = sub.add_parser("serve", help="run the relay")
    p.add_argument("--config", "-c", type=Path, required=True, help="YAML config file")
    add_log(p)
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds to let sessions and deliveries finish on SIGTERM (default 30)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file and list every problem")
    add_config(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("hash-password", help="hash a device password for accounts[].password_hash")
    p.add_argument("--stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(func=cmd_hash_password)

    p = sub.add_parser("sandbox", help="run a local imitation of Exchange Online and Entra ID")
    p.add_argument("--dir", type=Path, default=Path(".sandbox"),
                   help="where the CA, the demo secret and received mail go (default .sandbox)")
    p.add_argument("--entra-port", type=int, default=18443)
    p.add_argument("--smtp-port", type=int, default=12587)
    add_log(p)
    p.set_defaults(func=cmd_sandbox)

    p = sub.add_parser("demo", help="start the sandbox and the relay, send one message through")
    add_config(p, default="config/demo.yaml")
    add_log(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
