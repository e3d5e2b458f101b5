"""Delegated sign-ins (Outlook.com refresh tokens) kept in the queue's database, so every node
uses one copy.

A refresh token rotates on each use and the old one stops working soon after (the sandbox
retires it at once, as the strictest reading allows). Two nodes each refreshing their own copy
would invalidate each other's: here one node at a time holds an account's refresh lease, reads
the newest copy, refreshes, and writes it back with ``generation`` + 1 before letting go. A
node that finds the lease held waits for it, then reads what the holder wrote, usually with an
access token fresh enough to use as it is.

The rows hold what :mod:`relay.tokens.shared` gives them: Fernet-encrypted bytes, never the
token in clear, so a database dump or a DBA's ``SELECT`` does not hand out the mailbox.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from relay.spool.pgschema import SCHEMA

__all__ = ["PgSignins"]

_GET = f"SELECT data, generation FROM {SCHEMA}.signins WHERE account = $1"
_GENERATION = f"SELECT generation FROM {SCHEMA}.signins WHERE account = $1"
_ACCOUNTS = f"SELECT account FROM {SCHEMA}.signins"
# A new sign-in (`m365relay login`) replaces whatever is there, and wins over a refresh in
# progress: that refresh's conditional write then finds another generation and gives way.
_LOGIN = f"""
INSERT INTO {SCHEMA}.signins AS s (account, data) VALUES ($1, $2)
ON CONFLICT (account) DO UPDATE SET data = EXCLUDED.data, generation = s.generation + 1,
    updated_at = now()
RETURNING generation
"""
_REFRESHED = f"""
UPDATE {SCHEMA}.signins SET data = $2, generation = generation + 1, updated_at = now()
WHERE account = $1 AND generation = $3
RETURNING generation
"""
# Taken if free, expired, or already ours (a retry after a lost reply).
_LEASE = f"""
UPDATE {SCHEMA}.signins SET refreshing_by = $2,
    refreshing_until = now() + make_interval(secs => $3)
WHERE account = $1 AND (refreshing_until IS NULL OR refreshing_until < now()
                        OR refreshing_by = $2)
RETURNING generation
"""
_RELEASE = f"""
UPDATE {SCHEMA}.signins SET refreshing_by = NULL, refreshing_until = NULL
WHERE account = $1 AND refreshing_by = $2
"""
_FORGET = f"DELETE FROM {SCHEMA}.signins WHERE account = $1"


class PgSignins:
    """The sign-in rows for one node. Every method is one statement on the store's pool;
    errors (the database away) reach the caller, which defers the mail that needed it."""

    def __init__(self, pool: Callable[[], Awaitable[Any]], node: str) -> None:
        self._pool = pool
        self.node = node

    async def _run(self, fetch: str, sql: str, *args: Any) -> Any:
        pool = await self._pool()
        async with pool.acquire(timeout=5) as conn:
            return await getattr(conn, fetch)(sql, *args, timeout=10)

    async def get(self, account: str) -> tuple[bytes, int] | None:
        row = await self._run("fetchrow", _GET, account)
        return None if row is None else (bytes(row["data"]), int(row["generation"]))

    async def generation(self, account: str) -> int | None:
        value = await self._run("fetchval", _GENERATION, account)
        return None if value is None else int(value)

    async def accounts(self) -> set[str]:
        return {row["account"] for row in await self._run("fetch", _ACCOUNTS)}

    async def login(self, account: str, data: bytes) -> int:
        return int(await self._run("fetchval", _LOGIN, account, data))

    async def refreshed(self, account: str, data: bytes, generation: int) -> int | None:
        """Write a refresh's result over ``generation``; None if a new login replaced it."""
        value = await self._run("fetchval", _REFRESHED, account, data, generation)
        return None if value is None else int(value)

    async def lease(self, account: str, seconds: float) -> bool:
        """The account's refresh lease for this node; False while another node holds it (or
        there is no sign-in to refresh)."""
        return await self._run("fetchval", _LEASE, account, self.node, seconds) is not None

    async def release(self, account: str) -> None:
        await self._run("execute", _RELEASE, account, self.node)

    async def forget(self, account: str) -> None:
        await self._run("execute", _FORGET, account)
