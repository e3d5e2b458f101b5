"""Looking at the cluster queue (the status page, /metrics, ``m365relay queue list``): the
read-only half of :class:`~relay.spool.postgres.PgStore`, every node's mail and the nodes."""

from __future__ import annotations

from typing import Any

import asyncpg

from relay.config.pgdsn import PgDsn
from relay.message import QueueEntry
from relay.spool import pgqueue
from relay.spool.base import NodeInfo
from relay.spool.pgrows import DOWN, entry_from, unavailable

__all__ = ["PgLooking"]


class PgLooking:
    """Mixed into PgStore, which provides these."""

    dsn: PgDsn
    _node: str

    async def _pool(self) -> Any:
        raise NotImplementedError

    async def _row(self, queue_id: str, status_: str | None) -> Any:
        raise NotImplementedError

    # --- looking

    async def entries(self, *, quarantine: bool = True, mine: bool = False
                      ) -> list[QueueEntry]:
        """The whole cluster's queued mail, oldest first; ``mine``: this node's."""
        del quarantine  # nothing to move aside: rows are checked when they are read
        if mine:
            try:
                return await pgqueue.owned(await self._pool(), self._node)
            except DOWN as exc:
                raise unavailable(self.dsn, exc, "list the queue") from exc
        return await self._entries("queued")

    async def held_entries(self) -> list[QueueEntry]:
        return await self._entries("held")

    async def _entries(self, status_: str) -> list[QueueEntry]:
        try:
            async with (await self._pool()).acquire() as conn:
                rows = await conn.fetch(pgqueue.ENTRIES, status_)
        except DOWN as exc:
            raise unavailable(self.dsn, exc, "list the queue") from exc
        return [entry_from(row) for row in rows]

    async def entry(self, queue_id: str, *, held: bool = False) -> QueueEntry | None:
        row = await self._row(queue_id, "held" if held else "queued")
        return None if row is None else entry_from(row)

    async def locate(self, queue_id: str) -> str | None:
        row = await self._row(queue_id, None)
        if row is None:
            return None
        found: str = row["status"]
        return {"queued": "queue", "held": "hold"}.get(found, found)

    async def is_claimed(self, queue_id: str, *, held: bool = False) -> bool:
        del held
        try:
            async with (await self._pool()).acquire() as conn:
                return bool(await conn.fetchval(pgqueue.CLAIMED, queue_id))
        except DOWN as exc:
            raise unavailable(self.dsn, exc, "look at the queue") from exc

    async def kept_aside(self) -> dict[str, int]:
        try:
            async with (await self._pool()).acquire() as conn:
                rows = await conn.fetch(pgqueue.ASIDE)
        except DOWN as exc:
            raise unavailable(self.dsn, exc, "count failed mail") from exc
        found = {row["status"]: row["n"] for row in rows}
        return {"failed": found.get("failed", 0), "corrupt": found.get("corrupt", 0)}

    async def free_space(self) -> int | None:
        return None  # the database's own business (and its monitoring's)

    async def probe(self) -> str | None:
        try:
            async with (await self._pool()).acquire(timeout=5) as conn:
                await conn.execute(pgqueue.PROBE, self._node, timeout=5)
        except (*DOWN, asyncpg.PostgresError) as exc:
            return str(unavailable(self.dsn, exc, "accept mail"))
        return None

    async def nodes(self) -> list[NodeInfo]:
        try:
            async with (await self._pool()).acquire() as conn:
                rows = await conn.fetch(pgqueue.NODES)
        except DOWN as exc:
            raise unavailable(self.dsn, exc, "list the nodes") from exc
        return [NodeInfo(row["name"], row["alive"], row["started"], row["seen"], row["owned"],
                         row["claimed"], row["slots"]) for row in rows]
