"""The nodes sharing the cluster queue: each renews its lease in ``nodes`` every third of
``spool.lease``, and with it the claims of the attempts it has in flight. A node whose lease ran
out is dead; whoever beats next takes over its queued mail (once the mail's own claims have run
out too, so a message the dead node was sending is sent again only after its lease, never while
it might still be in flight), a batch at a time, ``SKIP LOCKED`` so two survivors split the work
instead of waiting on each other.

Changes from other processes (``m365relay queue``, the other nodes) arrive by LISTEN/NOTIFY on
channel ``m365relay``: a payload is ``verb id owner``, and each node acts only on its own mail.
A notification sent while the listening connection was down is lost, so on reconnecting the
node resubmits its due mail: a message scheduled twice is harmless (the second attempt finds it
gone), one never scheduled would wait forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from relay.spool.base import Change
from relay.spool.pgschema import SCHEMA

__all__ = ["CHANNEL", "Heartbeat"]

log = logging.getLogger("m365relay.spool")

CHANNEL = "m365relay"
TAKEOVER_BATCH = 500

_RENEW_NODE = f"""
INSERT INTO {SCHEMA}.nodes (name, lease_until, pid, version)
VALUES ($1, now() + make_interval(secs => $2), $3, $4)
ON CONFLICT (name) DO UPDATE SET lease_until = EXCLUDED.lease_until, seen_at = now(),
    pid = EXCLUDED.pid, version = EXCLUDED.version
"""
# Only the claims of attempts in flight here: a claim whose answer was lost (the connection
# broke after the UPDATE committed), or whose release failed, would otherwise be renewed for
# ever and its message never sent. Those are let go instead.
_RENEW_CLAIMS = f"""
UPDATE {SCHEMA}.messages SET lease_until = now() + make_interval(secs => $2)
WHERE claimed_by = $1 AND id = ANY($3::text[])
"""
_DROP_STRAY = f"""
UPDATE {SCHEMA}.messages SET claimed_by = NULL, lease_until = NULL
WHERE claimed_by = $1 AND NOT (id = ANY($2::text[]))
"""
_RENEW_SLOTS = f"""
UPDATE {SCHEMA}.mailbox_slots SET lease_until = now() + make_interval(secs => $2)
WHERE node = $1
"""
_DROP_SLOTS = f"DELETE FROM {SCHEMA}.mailbox_slots WHERE node = $1"
_TAKE_OVER = f"""
UPDATE {SCHEMA}.messages m SET owner = $1, claimed_by = NULL, lease_until = NULL,
    changed_at = now()
WHERE m.id IN (
    SELECT q.id FROM {SCHEMA}.messages q LEFT JOIN {SCHEMA}.nodes n ON n.name = q.owner
    WHERE q.status = 'queued' AND q.owner <> $1
      AND (n.name IS NULL OR n.lease_until < now())
      AND (q.claimed_by IS NULL OR q.lease_until < now())
    ORDER BY q.id LIMIT {TAKEOVER_BATCH}
    FOR UPDATE OF q SKIP LOCKED)
RETURNING m.id
"""
_DUE = f"""
SELECT id FROM {SCHEMA}.messages
WHERE status = 'queued' AND owner = $1 AND (claimed_by IS NULL OR lease_until < now())
ORDER BY id
"""

Emit = Callable[[Change], None]


class Heartbeat:
    """One node's lease, claim renewal, takeover and LISTEN connection."""

    def __init__(self, pool: Any, connect: Callable[[], Awaitable[Any]], *, node: str,
                 lease: float, version: str, emit: Emit, inflight: set[str]) -> None:
        self.pool = pool
        self._connect = connect
        self.node = node
        self.lease = lease
        self.version = version
        self._emit = emit
        self._inflight = inflight  # the store's: ids this node has an attempt on now
        self._listener: Any = None
        self._task: asyncio.Task[None] | None = None
        self._down = False  # the last beat failed: say so once, and when it works again
        self.taken_over = 0

    async def register(self) -> None:
        """Start as this node: renew its lease, and let go of claims an earlier run under this
        name left (it was killed; nothing of it is in flight any more)."""
        async with self.pool.acquire() as conn:
            await conn.execute(_RENEW_NODE, self.node, self.lease, os.getpid(), self.version)
            await conn.execute(f"UPDATE {SCHEMA}.messages SET claimed_by = NULL, "
                               "lease_until = NULL WHERE claimed_by = $1", self.node)
            await conn.execute(_DROP_SLOTS, self.node)

    async def start(self, *, listen: bool) -> None:
        if listen:
            await self._listen()
        self._task = asyncio.create_task(self._run(listen), name="m365relay-heartbeat")

    async def stop(self, *, clean: bool) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._listener is not None:
            await _close(self._listener)
            self._listener = None
        if clean:
            # A clean stop hands this node's queued mail to the others now rather than after
            # its lease: a drain that ends with mail still queued must not delay it.
            try:
                async with self.pool.acquire(timeout=5) as conn:
                    await conn.execute(f"UPDATE {SCHEMA}.messages SET claimed_by = NULL, "
                                       "lease_until = NULL WHERE claimed_by = $1", self.node)
                    await conn.execute(_DROP_SLOTS, self.node)
                    await conn.execute(f"UPDATE {SCHEMA}.nodes SET lease_until = now() "
                                       "WHERE name = $1", self.node)
            except Exception as exc:
                log.warning("could not hand this node's mail to the others at stop (%s); "
                            "they take it over within spool.lease", exc)

    async def _run(self, listen: bool) -> None:
        interval = self.lease / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.beat()
                if listen and (self._listener is None or self._listener.is_closed()):
                    await self._listen()
                    await self.resubmit_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._down:
                    log.warning("cluster heartbeat failed (%s): this node's lease is not "
                                "renewed; if the database stays away longer than spool.lease "
                                "another node may send this node's in-flight mail again",
                                exc)
                self._down = True

    async def beat(self) -> list[str]:
        """Renew this node's lease and claims, and take over a dead node's mail."""
        async with self.pool.acquire(timeout=self.lease / 3) as conn:
            await conn.execute(_RENEW_NODE, self.node, self.lease, os.getpid(), self.version)
            inflight = list(self._inflight)
            await conn.execute(_RENEW_CLAIMS, self.node, self.lease, inflight)
            await conn.execute(_DROP_STRAY, self.node, inflight)
            await conn.execute(_RENEW_SLOTS, self.node, self.lease)
            rows = await conn.fetch(_TAKE_OVER, self.node)
        if self._down:
            log.info("cluster heartbeat works again")
            self._down = False
        taken = [row["id"] for row in rows]
        if taken:
            self.taken_over += len(taken)
            log.warning("took over %d queued message(s) from node(s) that stopped renewing "
                        "their lease; delivering them from %s", len(taken), self.node)
            for queue_id in taken:
                self._emit(Change("commit", queue_id))
        return taken

    async def resubmit_due(self) -> None:
        async with self.pool.acquire(timeout=self.lease / 3) as conn:
            rows = await conn.fetch(_DUE, self.node)
        for row in rows:
            self._emit(Change("commit", row["id"]))

    async def _listen(self) -> None:
        if self._listener is not None:
            await _close(self._listener)
            self._listener = None
        conn = await self._connect()
        await conn.add_listener(CHANNEL, self._notified)
        self._listener = conn

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        del conn, pid, channel
        verb, _, rest = payload.partition(" ")
        queue_id, _, owner = rest.partition(" ")
        if owner not in (self.node, "*"):
            return  # another node's mail: its node acts on it
        self._emit(Change(verb, queue_id))


async def _close(conn: Any) -> None:
    try:
        await asyncio.wait_for(conn.close(), 2)
    except Exception:
        conn.terminate()
