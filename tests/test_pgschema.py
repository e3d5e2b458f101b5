"""The cluster schema on a real PostgreSQL: created, versioned, idempotent, safe from two nodes
at once, and a newer database refused."""

from __future__ import annotations

import asyncio

import pytest

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
