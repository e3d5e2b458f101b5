"""The queue database's link, looked at as an admin would: can we connect, over TLS, to a
primary, with the schema this relay needs and the rights it uses. ``m365relay db status`` and
``doctor`` print this; every failure says what to change (a key in ``spool.postgres``, a GRANT,
a command)."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

from relay.config.pgdsn import PgDsn
from relay.spool.pgschema import SCHEMA, status

__all__ = ["DbReport", "explain", "inspect"]


@dataclass
class DbReport:
    server: str = ""
    primary: bool = True
    tls: str = ""  # "" = not encrypted, else "TLSv1.3 TLS_AES_256_GCM_SHA384"
    user: str = ""
    database: str = ""
    version: int = 0
    latest: int = 0
    can_write: bool = False  # SELECT/INSERT/UPDATE/DELETE on the queue's tables
    can_create: bool = False  # CREATE on the database: `db upgrade` may make the schema
    lacking: list[str] = field(default_factory=list)  # tables/sequences without the rights
    nodes: list[tuple[str, bool]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


_LACKING = """
SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname <> 'schema_version' AND (
    (c.relkind = 'r' AND NOT has_table_privilege(c.oid, 'SELECT,INSERT,UPDATE,DELETE'))
    OR (c.relkind = 'S' AND NOT has_sequence_privilege(c.oid, 'USAGE')))
ORDER BY c.relname
"""


async def inspect(dsn: PgDsn) -> DbReport:
    """Raises what connecting raised (see :func:`explain`)."""
    import asyncpg

    conn = await asyncpg.connect(dsn.uri, timeout=10)
    try:
        return await _look(conn)
    finally:
        await conn.close()


async def _look(conn: Any) -> DbReport:
    report = DbReport()
    row = await conn.fetchrow(
        "SELECT current_setting('server_version') AS v, pg_is_in_recovery() AS standby, "
        "current_user AS u, current_database() AS d, "
        "has_database_privilege(current_database(), 'CREATE') AS c")
    report.server, report.primary = row["v"], not row["standby"]
    report.user, report.database, report.can_create = row["u"], row["d"], row["c"]
    ssl_row = await conn.fetchrow("SELECT ssl, version, cipher FROM pg_stat_ssl "
                                  "WHERE pid = pg_backend_pid()")
    if ssl_row is not None and ssl_row["ssl"]:
        report.tls = f"{ssl_row['version']} {ssl_row['cipher']}"
    found = await status(conn)
    report.version, report.latest = found.version, found.latest
    if found.version:
        # Every table and sequence of the schema: the limits, sign-ins and node leases are
        # written by every node too, not only the queue's two tables.
        report.lacking = [r["name"] for r in await conn.fetch(_LACKING, SCHEMA)]
        report.can_write = not report.lacking
        if report.can_write:
            report.nodes = [(r["name"], r["alive"]) for r in await conn.fetch(
                f"SELECT name, lease_until >= now() AS alive FROM {SCHEMA}.nodes "
                "ORDER BY name")]
            report.counts = {r["status"]: r["n"] for r in await conn.fetch(
                f"SELECT status, count(*) AS n FROM {SCHEMA}.messages GROUP BY status")}
    return report


def problems(report: DbReport, dsn: PgDsn) -> list[tuple[str, str]]:
    """(what is wrong, what to do) for a database we could reach."""
    found: list[tuple[str, str]] = []
    if not report.primary:
        found.append(("the server is a standby (read-only): mail would get 451",
                      "point spool.postgres at the primary, e.g. add "
                      "target_session_attrs=read-write with every host listed"))
    if report.version == 0:
        fix = ("run `m365relay db upgrade` (the relay also does it at start unless "
               "spool.upgrade_schema is false)")
        if not report.can_create:
            fix += (f"; user {report.user} may not create a schema in {report.database}: "
                    f"GRANT CREATE ON DATABASE {report.database} TO {report.user}, or run the "
                    "upgrade as the database's owner")
        found.append(("the m365relay schema does not exist yet", fix))
    elif report.version > report.latest:
        found.append((f"the schema is version {report.version}, newer than this relay's "
                      f"{report.latest}", "run the newer m365relay release on this node too"))
    elif report.version < report.latest:
        found.append((f"the schema is version {report.version}, this relay needs "
                      f"{report.latest}", "run `m365relay db upgrade`"))
    elif not report.can_write:
        more = len(report.lacking) - 6
        found.append((f"user {report.user} may not read and write the queue's tables "
                      f"({', '.join(report.lacking[:6])}{f' and {more} more' if more > 0 else ''})",
                      f"GRANT USAGE ON SCHEMA {SCHEMA} TO {report.user}; GRANT SELECT, "
                      f"INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {SCHEMA} TO "
                      f"{report.user}; GRANT USAGE ON ALL SEQUENCES IN SCHEMA {SCHEMA} TO "
                      f"{report.user}"))
    host = dsn.params.get("host", "")
    local = host in ("", "localhost", "127.0.0.1", "::1") or host.startswith("/")
    if not report.tls and not local:
        found.append((f"the connection to {host} is not encrypted",
                      "add sslmode=verify-full and sslrootcert=PATH (the server's CA) to "
                      "spool.postgres, and enable ssl on the server"))
    elif not local and dsn.sslmode not in ("verify-ca", "verify-full"):
        found.append((f"sslmode={dsn.sslmode} encrypts but does not check who answers",
                      "use sslmode=verify-full with sslrootcert=PATH in spool.postgres"))
    return found


def explain(exc: BaseException, dsn: PgDsn) -> tuple[str, str]:
    """(what happened, what to do) for a failure to connect."""
    name = type(exc).__name__
    user = dsn.params.get("user", "(your login name, or PGUSER)")
    db = dsn.params.get("dbname", "(the user's name)")
    where = dsn.shown
    if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY" in str(exc):
        return (f"the database's TLS certificate does not verify ({exc})",
                "set sslrootcert= in spool.postgres to the CA that signed the server's "
                "certificate; with verify-full the host name must match it too")
    if isinstance(exc, socket.gaierror):
        return (f"the database host does not resolve ({exc})",
                "check host= in spool.postgres and the node's DNS")
    if name == "InvalidPasswordError":
        return (f"password authentication failed for user {user}",
                "fix the password in spool.postgres (or PGPASSWORD, ~/.pgpass); a new "
                "role also needs an entry in the server's pg_hba.conf")
    if name == "InvalidAuthorizationSpecificationError":
        return (f"the server refused user {user}: {exc}",
                "create the role (CREATE ROLE ... LOGIN) or allow this host in pg_hba.conf")
    if name == "InsufficientPrivilegeError":
        return (f"user {user} may not use the m365relay schema ({exc})",
                f"GRANT USAGE ON SCHEMA {SCHEMA} TO {user}; GRANT SELECT, INSERT, UPDATE, "
                f"DELETE ON ALL TABLES IN SCHEMA {SCHEMA} TO {user}; GRANT USAGE ON ALL "
                f"SEQUENCES IN SCHEMA {SCHEMA} TO {user} (as the schema's owner)")
    if name == "InvalidCatalogNameError":
        return (f"database {db} does not exist",
                f"create it: createdb -O {user} {db} (or CREATE DATABASE)")
    if "rejected SSL" in str(exc) or "SSL" in name:
        return (f"TLS to the database failed ({exc})",
                "the server does not offer TLS: enable ssl on it, or (on a trusted local "
                "link only) lower sslmode in spool.postgres")
    if isinstance(exc, OSError) and ("refused" in str(exc).lower()
                                     or "Connect call failed" in str(exc)):
        return (f"nothing accepts connections at {where} ({exc})",
                "start PostgreSQL, or fix host= and port= in spool.postgres")
    if isinstance(exc, TimeoutError):
        return (f"the database did not answer within 10 s at {where}",
                "check the network path (firewall, security group) and the server's load")
    return (f"cannot connect to {where}: {name}: {exc}",
            "check spool.postgres; `psql` with the same settings shows the server's view")
