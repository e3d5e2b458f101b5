"""``m365relay db upgrade|status``: the cluster queue's schema and link (``spool.postgres``).

``upgrade`` applies the missing schema steps under an advisory lock, so two nodes, or a
Kubernetes init container beside running pods, may run it at once; a second run does nothing
and exits 0. ``status`` shows what an admin checks first: the server, primary or standby, TLS,
the schema version, the rights of the relay's user, the nodes and the queue. The config is
chosen as ``queue`` chooses it: the file, else the ``M365RELAY_DATABASE_URL`` variables (the
container image). Exit codes as the queue commands: 0 fine, 1 a problem (each printed with its
fix), 69 database unreachable, 78 no usable ``spool.postgres`` in the config.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import yaml

from relay.config.check import Failed, Run, validate
from relay.config.env import PREFIX, spool_from_env
from relay.config.records import DEFAULT_PATH, ConfigError, SpoolSettings
from relay.spool import pgcheck

__all__ = ["add_parser"]

EX_UNAVAILABLE = 69
EX_CONFIG = 78


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = sub.add_parser("db", help="create, upgrade or check the cluster queue's database "
                                   "(spool.postgres)")
    actions = db.add_subparsers(dest="db_action", required=True, metavar="ACTION")
    for name, text in (("upgrade", "create or upgrade the schema (safe to run from several "
                                   "nodes at once; a no-op when current)"),
                       ("status", "the database link, schema version, rights, nodes, queue")):
        p = actions.add_parser(name, help=text, description=text)
        p.add_argument("--config", "-c", type=Path, default=None, metavar="FILE",
                       help=f"the relay's config file (only spool is read; default "
                            f"{DEFAULT_PATH})")
        p.add_argument("--config-from-env", action="store_true",
                       help="the database of $M365RELAY_DATABASE_URL or "
                            "$M365RELAY_DATABASE_URL_FILE when the --config file does not "
                            "exist, as `serve --config-from-env` has it; the default when no "
                            "config file is found and M365RELAY_* variables are set (the "
                            "container image)")
        p.set_defaults(func=_main)


def _chosen(args: argparse.Namespace) -> SpoolSettings:
    """The file if it exists, else the variables: as `serve` and `queue` choose, so an init
    container of the image runs `db upgrade` alone with the relay's own configuration."""
    path = args.config if args.config is not None else DEFAULT_PATH
    from_env = args.config_from_env or (
        args.config is None and any(k.startswith(PREFIX) for k in os.environ))
    if path.exists() or not from_env:
        return _settings(path)
    try:
        settings = spool_from_env()
    except ConfigError as exc:
        raise _Usage(f"{exc.source}: {'; '.join(exc.problems)}") from None
    if settings.postgres is None:
        raise _Usage("the variables give a file spool (M365RELAY_SPOOL); `db` is for cluster "
                     "mode: set M365RELAY_DATABASE_URL or M365RELAY_DATABASE_URL_FILE")
    return settings


def _settings(path: Path) -> SpoolSettings:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise _Usage(f"cannot read {path}: {exc}") from None
    section = data.get("spool") if isinstance(data, dict) else None
    run = Run({"base_dir": str(path.resolve().parent)}, "spool")
    try:
        settings = validate(SpoolSettings, section, run)
    except Failed:
        raise _Usage(f"{path}: {'; '.join(run.problems)}") from None
    if settings.postgres is None:
        raise _Usage(f"{path}: spool.directory is a file spool on this machine; `db` is for "
                     "spool.postgres (cluster mode)")
    return settings


class _Usage(Exception):
    pass


def _main(args: argparse.Namespace) -> int:
    try:
        settings = _chosen(args)
    except _Usage as exc:
        print(f"m365relay db: {exc}", file=sys.stderr)
        return EX_CONFIG
    return asyncio.run(_upgrade(settings) if args.db_action == "upgrade" else _status(settings))


async def _upgrade(settings: SpoolSettings) -> int:
    import asyncpg

    from relay.spool.pgschema import upgrade

    assert settings.postgres is not None  # noqa: S101 -- _settings checked
    try:
        conn = await asyncpg.connect(settings.postgres.uri, timeout=10)
    except Exception as exc:
        return _unreachable(settings, exc)
    try:
        applied = await upgrade(conn, node=f"db upgrade ({settings.node})")
    except RuntimeError as exc:
        print(f"m365relay db upgrade: {exc}", file=sys.stderr)
        return 1
    except asyncpg.InsufficientPrivilegeError as exc:
        print(f"m365relay db upgrade: {exc}. The user in spool.postgres needs CREATE on the "
              "database (GRANT CREATE ON DATABASE ... TO ...) or to own the m365relay schema; "
              "or run the upgrade once as the database's owner", file=sys.stderr)
        return 1
    finally:
        await conn.close()
    where = settings.postgres.shown
    if applied:
        print(f"{where}: applied schema version(s) {', '.join(map(str, applied))}")
    else:
        print(f"{where}: schema already current")
    return 0


async def _status(settings: SpoolSettings) -> int:
    dsn = settings.postgres
    assert dsn is not None  # noqa: S101 -- _settings checked
    try:
        report = await pgcheck.inspect(dsn)
    except Exception as exc:
        return _unreachable(settings, exc)
    print(f"database:  {dsn.shown} as {report.user}")
    print(f"server:    PostgreSQL {report.server}, "
          f"{'primary' if report.primary else 'STANDBY (read-only)'}")
    print(f"tls:       {report.tls or 'not encrypted'} (sslmode={dsn.sslmode})")
    print(f"schema:    version {report.version or 'none'} (this relay: {report.latest})")
    if report.nodes:
        print("nodes:     " + ", ".join(f"{n} ({'alive' if a else 'gone'})"
                                        for n, a in report.nodes))
    if report.version:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(report.counts.items())) or "empty"
        print(f"queue:     {counts}")
    found = pgcheck.problems(report, dsn)
    for what, fix in found:
        print(f"problem:   {what}\n  fix:     {fix}")
    return 1 if found else 0


def _unreachable(settings: SpoolSettings, exc: BaseException) -> int:
    assert settings.postgres is not None  # noqa: S101
    what, fix = pgcheck.explain(exc, settings.postgres)
    print(f"m365relay db: {what}\n  fix: {fix}", file=sys.stderr)
    return EX_UNAVAILABLE
