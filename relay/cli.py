"""The ``m365relay`` command. The only place that turns errors into exit codes.

Exit codes: 0 ok; 1 runtime failure; 2 usage error; 69 cannot start (port in use, spool not
writable); 78 invalid configuration (EX_CONFIG, as in sysexits.h).
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from relay import __version__, logsafe
from relay.config import permissions, progname
from relay.config import records as config_mod
from relay.service.logs import setup_logging

EX_CONFIG = 78
EX_UNAVAILABLE = 69
log = logging.getLogger("m365relay")

# Commands whose parsers live beside their code. Their modules are imported only to run them or
# to list every command: `login` alone imports msal, requests and cryptography (~20 MB, ~0.3 s)
# that `serve` would carry for its whole life and wait for before listening.
_MORE_COMMANDS = {"doctor": "relay.doctor.command", "queue": "relay.queue.cli",
                  "db": "relay.queue.db",
                  "login": "relay.login", "init": "relay.setup.command"}


def _load(path: Path) -> config_mod.Config | None:
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.config_option or args.config  # `--config FILE` too, as every other command
    config = _load(path)
    if config is None:
        return EX_CONFIG
    from relay.ingress.tls import legacy_warning
    from relay.setup.configfile import PLACEHOLDER_CLIENT_ID

    weak = [legacy_warning(listener) for listener in config.listeners]
    unset = [f"apps.{name}.client_id is still the placeholder `m365relay init` wrote: every "
             "token request fails until it is the app registration's Application (client) ID "
             f"(setup-m365.ps1 prints it; then `{progname.command()} init --config {path} "
             f"--app {name} --client-id ID`)"
             for name, app in config.apps.items() if app.client_id == PLACEHOLDER_CLIENT_ID]
    for warning in [*permissions.warnings(config, path), *filter(None, weak), *unset]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: OK ({len(config.listeners)} listener(s), {len(config.apps)} app(s), "
          f"{len(config.accounts)} account(s))")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.service.lifecycle import StartupError, run

    setup_logging(args.log_level, args.log_format)
    loaded = _load_source(args)
    if loaded is None:
        return EX_CONFIG
    config, config_path = loaded
    for warning in permissions.warnings(config, config_path) if config_path else []:
        log.warning("%s", warning)
    try:
        import asyncio

        asyncio.run(run(config, config_path=config_path, shutdown_timeout=args.shutdown_timeout))
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return EX_UNAVAILABLE
    return 0


def _load_source(args: argparse.Namespace) -> tuple[config_mod.Config, Path | None] | None:
    """--config FILE, --config-from-env, or both (the file if it exists: the container image)."""
    from relay.config.env import load_source

    try:
        return load_source(args.config, from_env_vars=args.config_from_env)
    except config_mod.ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def cmd_healthcheck(args: argparse.Namespace) -> int:
    from relay.service import healthcheck

    # Docker reads 0 as healthy and 1 as unhealthy (2 is reserved): nothing else is returned.
    if args.address:
        try:
            found = [healthcheck.parse_address(a) for a in args.address]
        except ValueError as exc:
            print(f"--address: {exc}", file=sys.stderr)
            return 1
    else:
        loaded = _load_source(args)
        if loaded is None:
            return 1
        found = healthcheck.targets(loaded[0])
    healthy, lines = healthcheck.check(found, args.timeout)
    print("\n".join(lines), file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


def cmd_hash_password(args: argparse.Namespace) -> int:
    from relay.policy.passwords import hash_password

    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif not _have_terminal():
        # getpass would fall back to reading standard input, and end in EOFError there.
        print("m365relay hash-password: no terminal to ask for the password on. Give it on "
              "standard input instead: printf '%s\\n' 'PASSWORD' | "
              f"{progname.command()} hash-password --stdin", file=sys.stderr)
        return 2
    else:
        try:
            password = getpass.getpass("Password for the device: ")
            again = getpass.getpass("Again: ")
        except (EOFError, KeyboardInterrupt):
            print("\nNo password given; nothing was written.", file=sys.stderr)
            return 1
        if password != again:
            print("The passwords differ; nothing was written.", file=sys.stderr)
            return 1
    if not password:
        print("An empty password is not allowed.", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def _have_terminal() -> bool:
    """Whether getpass can prompt without echo: it opens /dev/tty, as ssh-keygen does."""
    try:
        with Path("/dev/tty").open("rb"):
            return True
    except OSError:
        return False


def cmd_sandbox(args: argparse.Namespace) -> int:
    import asyncio

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
    import asyncio

    from relay.login import run_login
    from relay.sandbox.demo import run_demo
    from relay.service.lifecycle import StartupError

    setup_logging(args.log_level)
    try:
        return asyncio.run(run_demo(args.config, login=run_login))
    except (OSError, StartupError) as exc:
        # Most often the ports of a sandbox or relay still running from an earlier try.
        log.error("cannot start the demo: %s. Is a sandbox or relay from an earlier try still "
                  "running? Stop it (Ctrl+C in its terminal), or change the ports in %s",
                  exc, args.config)
        return EX_UNAVAILABLE


def _command(argv: Sequence[str]) -> str | None:
    """The command word of ``argv`` (the main parser has no options that take a value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _add_config(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("config", nargs="?" if default else None, type=Path, default=default,
                   metavar="CONFIG", help=f"YAML config file (default {default})")


def _add_log(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"],
                   help="least severe log lines shown, on stderr (default info)")


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path,
                   help=f"YAML config file (default {config_mod.DEFAULT_PATH}, unless "
                        "--config-from-env is given alone)")
    p.add_argument("--config-from-env", action="store_true",
                   help="build the config from M365RELAY_* variables (one app and mailbox); "
                        "with --config too, only when that file does not exist")


def _add_daemon_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``serve`` and its ``healthcheck``."""
    p = sub.add_parser("serve", help="run the relay")
    _add_source(p)
    _add_log(p)
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="json: one object per line, for log collectors (default text)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="seconds to let sessions and deliveries finish on SIGTERM (default 30; "
                        "keep it below systemd's TimeoutStopSec / docker's --stop-timeout)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("healthcheck", help="exit 0 if every listener answers with an SMTP "
                                           "greeting, else 1 (Docker HEALTHCHECK, monitoring)")
    _add_source(p)
    p.add_argument("--address", action="append", metavar="HOST:PORT",
                   help="check this address instead of the config's listeners (repeatable)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="per listener (default 5)")
    p.set_defaults(func=cmd_healthcheck)


def _add_config_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``check-config`` and ``hash-password``: writing a config."""
    p = sub.add_parser("check-config", help="validate a config file and list every problem")
    _add_config(p, default=str(config_mod.DEFAULT_PATH))
    p.add_argument("--config", "-c", type=Path, dest="config_option", metavar="CONFIG",
                   help="the same, spelled as the other commands spell it")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("hash-password", help="hash a device password for accounts[].password_hash",
                       description="Print the argon2id hash of a device's password, for "
                                   "accounts[].password_hash. Asks twice on the terminal, or "
                                   "reads one line with --stdin.")
    p.add_argument("--stdin", action="store_true",
                   help="read the password from standard input (one line), e.g. in scripts")
    p.set_defaults(func=cmd_hash_password)


def _add_sandbox_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``sandbox`` and ``demo``: trying the relay with nothing leaving the machine."""
    p = sub.add_parser("sandbox", help="run a local imitation of Exchange Online and Entra ID",
                       description="A local imitation of Exchange Online and its Entra ID token "
                                   "endpoint, with a throwaway CA; nothing leaves this machine. "
                                   "The defaults are where config/demo.yaml points.")
    p.add_argument("--dir", type=Path, default=Path(".demo/sandbox"),
                   help="where the CA, the demo secret and received mail go "
                        "(default .demo/sandbox)")
    p.add_argument("--entra-port", type=int, default=18443, metavar="PORT",
                   help="port of the token endpoint, HTTPS on localhost (default 18443)")
    p.add_argument("--smtp-port", type=int, default=12587, metavar="PORT",
                   help="port of the Exchange Online SMTP server, STARTTLS on localhost "
                        "(default 12587)")
    _add_log(p)
    p.set_defaults(func=cmd_sandbox)

    p = sub.add_parser("demo", help="start the sandbox and the relay, send one message through")
    _add_config(p, default="config/demo.yaml")
    _add_log(p)
    p.set_defaults(func=cmd_demo)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI; given the ``command`` about to run, the other modules' commands are left
    out unless it is one of them (they cost imports, and argparse only needs the one)."""
    parser = argparse.ArgumentParser(
        prog="m365relay",
        description="SMTP relay for legacy devices: plain SMTP in, Exchange Online (OAuth 2.0, "
                    "XOAUTH2) out.")
    parser.add_argument("--version", action="version", version=f"m365relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_daemon_commands(sub)
    _add_config_commands(sub)
    _add_sandbox_commands(sub)
    if command is None or command not in sub.choices:
        for module in _MORE_COMMANDS.values():
            importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    if (args.func in (cmd_serve, cmd_healthcheck) and not args.config_from_env
            and args.config is None and not getattr(args, "address", None)):
        args.config = config_mod.DEFAULT_PATH  # where the README and the systemd unit keep it
    logsafe.install()
    try:
        result: int = args.func(args)
    except Exception:
        # Through logging, not Python's default hook, so the traceback is redacted too.
        log.critical("m365relay stopped on an unexpected error (a bug: please report it with "
                     "this traceback)", exc_info=True)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
