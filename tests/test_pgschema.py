"""The cluster schema on a real PostgreSQL: created, versioned, idempotent, safe from two nodes
at once, and a newer database refused."""

from __future__ import annotations

import asyncio

import pytest
from pgserver import PgServer

from relay.spool import pgschema

asyncpg = pytest.importorskip("asyncpg")


async def test_two_nodes_upgrading_at_once_apply_each_step_once(pg_dsn: str) -> None:
    conns = [await asyncpg.connect(pg_dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(pgschema.upgrade(c, node=f"n{i}")
                                         for i, c in enumerate(conns)))
        assert sorted(v for r in results for v in r) == sorted(pgschema.STEPS)
        assert (await pgschema.status(conns[0])).current
        assert await pgschema.upgrade(conns[0]) == []  # idempotent
        rows = await conns[0].fetchval("SELECT count(*) FROM m365relay.schema_version")
        assert rows == len(pgschema.STEPS)
    finally:
        for c in conns:
            await c.close()


async def test_a_database_newer_than_the_relay_is_refused(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert (await pgschema.status(conn)).version == 0
        await pgschema.upgrade(conn)
        await conn.execute("INSERT INTO m365relay.schema_version (version) VALUES ($1)",
                           pgschema.LATEST + 1)
        with pytest.raises(RuntimeError, match="newer than this relay"):
            await pgschema.upgrade(conn)
        assert (await pgschema.status(conn)).newer
    finally:
        await conn.close()


async def test_a_version_1_database_is_upgraded_in_place(pg_dsn: str) -> None:
    """A cluster created by version 1 (window only) gets the cluster-wide spacing of
    version 2 without losing what it counted."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("CREATE SCHEMA m365relay")
        await conn.execute(pgschema._VERSION_TABLE)
        await conn.execute(pgschema.STEPS[1])
        await conn.execute("INSERT INTO m365relay.schema_version (version) VALUES (1)")
        await conn.execute("INSERT INTO m365relay.mailbox_sends (mailbox, node) "
                           "VALUES ('a@contoso.example', 'n1')")
        assert await pgschema.upgrade(conn) == [v for v in sorted(pgschema.STEPS) if v > 1]
        assert await conn.fetchval("SELECT count(*) FROM m365relay.mailbox_sends") == 1
        # The spacing holds: a second admission right after the first must wait.
        first = await conn.fetchrow("SELECT * FROM m365relay.admit_send('b', 60, 60, 'n1')")
        second = await conn.fetchrow("SELECT * FROM m365relay.admit_send('b', 60, 60, 'n2')")
        assert first["wait"] == 0 and first["send_id"] is not None
        assert 0 < second["wait"] <= 1.0 and second["send_id"] is None
    finally:
        await conn.close()


async def _upgraded(dsn: str) -> str:
    """Create the schema as the owner; the database's name."""
    conn = await asyncpg.connect(dsn)
    try:
        await pgschema.upgrade(conn)
    finally:
        await conn.close()
    return dsn.rsplit("/", 1)[1]


async def test_a_role_that_may_only_use_the_schema_starts_on_a_current_one(
        pg_server: PgServer, pg_dsn: str) -> None:
    """A DBA migrated the schema; the relay's role has no CREATE on the database. Starting
    (which runs upgrade) must not need it."""
    db = await _upgraded(pg_dsn)
    role = f"user_{db}"
    pg_server.psql(f'CREATE ROLE "{role}" LOGIN; REVOKE CREATE ON DATABASE "{db}" FROM PUBLIC; '
                   f'GRANT USAGE ON SCHEMA m365relay TO "{role}"; '
                   f'GRANT SELECT ON ALL TABLES IN SCHEMA m365relay TO "{role}"', db)
    limited = await asyncpg.connect(pg_server.dsn(db, user=role))
    try:
        assert await pgschema.upgrade(limited) == []
    finally:
        await limited.close()


async def test_rights_on_only_the_queue_tables_are_a_problem_naming_the_others(
        pg_server: PgServer, pg_dsn: str) -> None:
    """Every node writes the limits, sign-ins and node leases too: doctor and `db status` must
    not pass a role a DBA granted only messages and chunks."""
    from relay.config.pgdsn import parse_dsn
    from relay.spool import pgcheck

    db = await _upgraded(pg_dsn)
    role = f"half_{db}"
    pg_server.psql(f'CREATE ROLE "{role}" LOGIN; GRANT USAGE ON SCHEMA m365relay TO "{role}"; '
                   "GRANT SELECT, INSERT, UPDATE, DELETE ON m365relay.messages, "
                   f'm365relay.chunks TO "{role}"', db)
    dsn = parse_dsn(pg_server.dsn(db, user=role))
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as denied:  # not schema_version
        await pgcheck.inspect(dsn)
    what, fix = pgcheck.explain(denied.value, dsn)
    assert "may not use the m365relay schema" in what and "GRANT USAGE ON SCHEMA" in fix
    pg_server.psql(f'GRANT SELECT ON m365relay.schema_version TO "{role}"', db)
    report = await pgcheck.inspect(dsn)
    assert not report.can_write and "mailbox_slots" in report.lacking, report.lacking
    (what, fix), = [p for p in pgcheck.problems(report, dsn) if "may not" in p[0]]
    assert "mailbox_slots" in what and "more" in what, what
    assert "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES" in fix
    pg_server.psql("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA m365relay "
                   f'TO "{role}"; GRANT USAGE ON ALL SEQUENCES IN SCHEMA m365relay TO "{role}"',
                   db)
    assert (await pgcheck.inspect(dsn)).can_write
