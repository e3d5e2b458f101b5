"""The PostgreSQL server of a benchmark run, for the relay's cluster mode (``spool.postgres``).

One throwaway server per bench run (``initdb`` into /tmp, fsync on, as in production), started
before the first run that needs it; every run gets a database of its own (``CREATE DATABASE``),
in which the relay creates its schema at start (``upgrade_schema`` is on by default), and which
is dropped after the run so its dead rows cannot wake autovacuum during the next one.

``pg_stat_statements`` is preloaded (the server is ours), so a run can say what each message
cost the database: statements and transactions per message, and the mean time per statement.
"""

from __future__ import annotations

import contextlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procstat

ROOT = Path(__file__).resolve().parent.parent
# tests/pgserver.py is the throwaway server the cluster-mode tests run; the bench reuses it
# rather than keep a second copy. tests/ is not a package, hence the path entry (the bench is
# run from a checkout, never installed, so the tests are always beside it).
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

import pgserver  # noqa: E402

SCHEMA = "m365relay"
# What the harness itself sends to a run's database (the queue-empty check): left out of the
# per-message figures.
BACKLOG_SQL = "SELECT count(*) FROM m365relay.messages"
# What asyncpg's Connection.reset() sends when the pool takes a connection back (the exact set
# depends on the server's capabilities).
POOL_RESET = frozenset({"SELECT pg_advisory_unlock_all()", "CLOSE ALL", "UNLISTEN *",
                        "RESET ALL"})
_CONF = """
# bench/database.py: per-statement counts for the round-trips table
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = top
pg_stat_statements.max = 2000
"""


def available() -> str | None:
    """None, or why no server can run here."""
    return pgserver.available()


@dataclass
class Snapshot:
    """The counters of one database at one moment."""

    xact_commit: int = 0
    xact_rollback: int = 0
    wal_lsn: int = 0            # server-wide, but only the bench uses this server
    wal_sync: int = 0           # WAL flushes (fsync/fdatasync), server-wide
    statements: dict[int, tuple[str, int, float]] = field(default_factory=dict)


class BenchDatabase:
    """A started server; ``cpus``: where it and every backend it forks run (procstat.Layout)."""

    def __init__(self, server: pgserver.PgServer) -> None:
        self.server = server

    @classmethod
    def start(cls, cpus: frozenset[int]) -> BenchDatabase:
        """Blocking (initdb and pg_ctl): call it in a thread."""
        problem = available()
        if problem:
            raise RuntimeError(f"the PostgreSQL targets need a PostgreSQL server: {problem}")
        server = pgserver.PgServer()
        try:
            with (server.data / "postgresql.conf").open("a") as f:
                f.write(_CONF)
            server.start()
            server.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            db = cls(server)
            db.pin(cpus)
        except BaseException:
            server.destroy()
            raise
        return db

    def destroy(self) -> None:
        self.server.destroy()

    # --- processes

    def postmaster_pid(self) -> int:
        return int((self.server.data / "postmaster.pid").read_text().split()[0])

    def pids(self) -> list[int]:
        """The postmaster and its children (backends, WAL writer, checkpointer, ...)."""
        root = self.postmaster_pid()
        return [root, *procstat.children(root)]

    def pin(self, cpus: frozenset[int]) -> None:
        # Backends forked later inherit the postmaster's affinity; the running helpers need it
        # set one by one.
        for pid in self.pids():
            with contextlib.suppress(OSError):  # a backend that has just exited
                procstat.pin_process(pid, cpus)

    def cpu(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for pid in self.pids():
            try:
                out[pid] = procstat.cpu_seconds(pid)
            except OSError:
                continue  # a backend that has just exited
        return out

    # --- databases

    def new_database(self) -> tuple[str, str]:
        """Blocking: a fresh database, its name and DSN."""
        name = self.server.new_database("bench")
        return name, self.server.dsn(name)

    def drop_database(self, name: str) -> None:
        self.server.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def admin_dsn(self) -> str:
        return self.server.dsn("postgres")

    async def snapshot(self, conn: Any, dbname: str) -> Snapshot:
        """``conn``: an asyncpg connection to the ``postgres`` database (so the harness's
        own statements never count in ``dbname``'s)."""
        snap = Snapshot()
        row = await conn.fetchrow(
            "SELECT xact_commit, xact_rollback, pg_current_wal_lsn() - '0/0' AS lsn, "
            "(SELECT wal_sync FROM pg_stat_wal) AS wal_sync "
            "FROM pg_stat_database WHERE datname = $1", dbname)
        snap.xact_commit, snap.xact_rollback = row["xact_commit"], row["xact_rollback"]
        snap.wal_lsn, snap.wal_sync = int(row["lsn"]), int(row["wal_sync"])
        rows = await conn.fetch(
            "SELECT s.queryid, s.query, s.calls, s.total_exec_time FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1 AND s.toplevel", dbname)
        snap.statements = {r["queryid"]: (r["query"], r["calls"], r["total_exec_time"])
                           for r in rows}
        return snap


def shorten(query: str, width: int = 72) -> str:
    """A statement on one line, short enough for a table."""
    text = re.sub(r"\s+", " ", query).strip()
    text = text.replace(f"{SCHEMA}.", "")
    return text if len(text) <= width else text[:width - 1] + "…"


def usage(before: Snapshot, after: Snapshot, messages: int, polls: int) -> dict[str, Any]:
    """What the database did between two snapshots, per message. ``polls``: the harness's own
    queue-empty checks in the run's database, each its own transaction, taken out."""
    per = max(messages, 1)
    statements = []
    for queryid, (query, calls, total) in after.statements.items():
        _, calls0, total0 = before.statements.get(queryid, ("", 0, 0.0))
        if calls - calls0 <= 0 or query.strip() == BACKLOG_SQL:
            continue
        statements.append({"query": shorten(query), "calls": calls - calls0,
                           "per_msg": (calls - calls0) / per,
                           "mean_ms": (total - total0) / (calls - calls0)})
    statements.sort(key=lambda s: -s["calls"])
    # asyncpg's pool resets a connection when it is given back: these statements go in one
    # simple query, one round trip (RESET ALL is always among them).
    resets = sum(s["calls"] for s in statements if s["query"] == "RESET ALL")
    reset_statements = sum(s["calls"] for s in statements if s["query"] in POOL_RESET)
    total = sum(s["calls"] for s in statements)
    xacts = after.xact_commit - before.xact_commit - polls
    return {
        "db_statements": statements,
        "db_statements_per_msg": total / per,
        "db_round_trips_per_msg": (total - reset_statements + resets) / per,
        "db_pool_resets_per_msg": resets / per,
        "db_xacts_per_msg": xacts / per,
        "db_rollbacks": after.xact_rollback - before.xact_rollback,
        "db_wal_kib_per_msg": (after.wal_lsn - before.wal_lsn) / 1024 / per,
        "db_wal_syncs_per_msg": (after.wal_sync - before.wal_sync) / per,
    }
