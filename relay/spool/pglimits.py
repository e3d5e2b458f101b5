"""Exchange Online's per-mailbox limits held for the whole cluster, in the queue's database:
the 3 concurrent connections (leased slots, renewed by the node heartbeat, so a dead node's
slots free themselves after ``spool.lease``), the per-minute window (every node's sends counted
in one place, in one round trip: ``m365relay.admit_send``), the rolling day's recipients, and a
throttling reply seen by one node slowing the mailbox on all of them. Two relays sending as one
mailbox then behave, towards Exchange, as one relay would.

KumoMTA shares its throttles through Redis for the same reason; here the database every node
already depends on does it, and when it is away a node opens no new connection (it keeps the
ones it holds) rather than guess.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from relay.spool.pgschema import SCHEMA

__all__ = ["SharedLimits"]

log = logging.getLogger("m365relay.pacing")

THROTTLE_FOR = 300.0  # seconds every node halves a throttled mailbox's rate

_ACQUIRE = f"""
INSERT INTO {SCHEMA}.mailbox_slots AS s (mailbox, slot, node, lease_until)
SELECT $1, n, $2, now() + make_interval(secs => $4) FROM generate_series(0, $3 - 1) AS n
WHERE NOT EXISTS (SELECT 1 FROM {SCHEMA}.mailbox_slots x
                  WHERE x.mailbox = $1 AND x.slot = n AND x.lease_until >= now())
ORDER BY n LIMIT 1
ON CONFLICT (mailbox, slot) DO UPDATE SET node = EXCLUDED.node,
    lease_until = EXCLUDED.lease_until
    WHERE s.lease_until < now()
RETURNING slot
"""
_RELEASE = f"DELETE FROM {SCHEMA}.mailbox_slots WHERE mailbox = $1 AND slot = $2 AND node = $3"
# No slot free: this node wants one (for a few seconds; renewed while it keeps asking).
_WANT = f"""
INSERT INTO {SCHEMA}.mailbox_wants (mailbox, node, until)
VALUES ($1, $2, now() + make_interval(secs => $3))
ON CONFLICT (mailbox, node) DO UPDATE SET until = EXCLUDED.until
"""
_GOT = f"DELETE FROM {SCHEMA}.mailbox_wants WHERE mailbox = $1 AND node = $2"
# The mailboxes this node holds slots of that other nodes want, and how many nodes want each.
_WANTED = f"""
SELECT w.mailbox, count(DISTINCT w.node)::int AS nodes FROM {SCHEMA}.mailbox_wants w
WHERE w.until > now() AND w.node <> $1 AND EXISTS (
    SELECT 1 FROM {SCHEMA}.mailbox_slots s
    WHERE s.mailbox = w.mailbox AND s.node = $1 AND s.lease_until >= now())
GROUP BY w.mailbox
"""
WANT_FOR = 3.0  # seconds a want lasts unless asked again (the asker retries every 0.5 s)
_ADMIT = f"SELECT wait, send_id FROM {SCHEMA}.admit_send($1, $2, $3, $4)"
_SENT = f"UPDATE {SCHEMA}.mailbox_sends SET sent_at = now() WHERE id = $1"
# The recipients Exchange took, on this node's latest send for the mailbox; returns the
# mailbox's total over the rolling day, every node's (the statement's snapshot does not see
# its own update, hence the + $3).
_RECIPIENTS = f"""
WITH u AS (
    UPDATE {SCHEMA}.mailbox_sends SET recipients = recipients + $3
    WHERE id = (SELECT max(id) FROM {SCHEMA}.mailbox_sends WHERE mailbox = $1 AND node = $2)
    RETURNING 1)
SELECT coalesce(sum(recipients), 0)::bigint + $3 FROM {SCHEMA}.mailbox_sends
WHERE mailbox = $1 AND sent_at > now() - interval '1 day'
"""
_THROTTLED = f"""
INSERT INTO {SCHEMA}.mailbox_throttle (mailbox, slow_until, reason)
VALUES ($1, now() + make_interval(secs => $2), $3)
ON CONFLICT (mailbox) DO UPDATE SET slow_until = EXCLUDED.slow_until, reason = EXCLUDED.reason
"""
_DAY = f"""
SELECT mailbox, sum(recipients)::bigint AS n FROM {SCHEMA}.mailbox_sends
WHERE sent_at > now() - interval '1 day' GROUP BY mailbox
"""
_PRUNE = (f"DELETE FROM {SCHEMA}.mailbox_sends WHERE id IN (SELECT id FROM "
          f"{SCHEMA}.mailbox_sends WHERE sent_at < now() - interval '1 day' LIMIT 5000)")


class SharedLimits:
    """Per-mailbox limits for one node; mailboxes are compared case-blind."""

    def __init__(self, pool: Callable[[], Awaitable[Any]], node: str, lease: float) -> None:
        self._pool = pool
        self.node = node
        self.lease = lease
        self._down = False
        self._wanting: set[str] = set()  # mailboxes this node registered a want for

    async def _run(self, fetch: str, sql: str, *args: Any) -> Any:
        pool = await self._pool()
        async with pool.acquire(timeout=5) as conn:
            result = await getattr(conn, fetch)(sql, *args, timeout=5)
        if self._down:
            log.info("shared mailbox limits reachable again")
            self._down = False
        return result

    def _failed(self, what: str, exc: BaseException) -> None:
        if not self._down:
            log.warning("cannot %s in the queue database (%s): no new upstream connection "
                        "opens until it answers, so the cluster stays within Exchange's "
                        "limits; check spool.postgres", what, exc)
        self._down = True

    async def acquire_slot(self, mailbox: str, limit: int) -> int | None:
        """One of the mailbox's ``limit`` connection slots for this node, or None (all taken
        by live nodes, or the database is away)."""
        try:
            box = mailbox.lower()
            slot = await self._run("fetchval", _ACQUIRE, box, self.node, limit, self.lease)
            if slot is None:  # every slot held by others: ask for a share
                await self._run("execute", _WANT, box, self.node, WANT_FOR)
                self._wanting.add(box)
            elif box in self._wanting:
                self._wanting.discard(box)
                await self._run("execute", _GOT, box, self.node)
        except Exception as exc:  # fail closed: no slot
            self._failed("lease a connection slot", exc)
            return None
        return None if slot is None else int(slot)

    async def wanted(self) -> dict[str, int]:
        """Mailboxes whose slots this node holds while other nodes wait for one: how many
        nodes wait, by mailbox (lower case). Empty when the database is away."""
        try:
            rows = await self._run("fetch", _WANTED, self.node)
        except Exception as exc:
            self._failed("see who waits for a connection slot", exc)
            return {}
        return {row["mailbox"]: int(row["nodes"]) for row in rows}

    async def release_slot(self, mailbox: str, slot: int) -> None:
        try:
            await self._run("execute", _RELEASE, mailbox.lower(), slot, self.node)
        except Exception as exc:  # its lease runs out by itself
            self._failed("release a connection slot", exc)

    async def admit(self, mailbox: str, per_minute: int, window: float = 60.0
                    ) -> tuple[float, int | None]:
        """(0, send id) when the mailbox may send one more message now, cluster-wide;
        (seconds to wait, None) otherwise."""
        try:
            row = await self._run("fetchrow", _ADMIT, mailbox.lower(), per_minute, window,
                                  self.node)
        except Exception as exc:  # fail closed: wait, ask again
            self._failed("count the mailbox's sends", exc)
            return 1.0, None
        return float(row["wait"]), row["send_id"]

    async def sent(self, send_id: int | None) -> None:
        """The attempt admitted as ``send_id`` is over: its window counts from now, as the
        local pacer counts (Exchange counts it somewhere in between)."""
        if send_id is None:
            return
        try:
            await self._run("execute", _SENT, send_id)
        except Exception as exc:  # counts from the start then
            self._failed("record a send", exc)

    async def recipients(self, mailbox: str, count: int) -> int | None:
        """Add the recipients Exchange took; the mailbox's total over the rolling day."""
        try:
            return int(await self._run("fetchval", _RECIPIENTS, mailbox.lower(), self.node,
                                       count))
        except Exception as exc:
            self._failed("count recipients", exc)
            return None

    async def throttled(self, mailbox: str, reason: str) -> None:
        try:
            await self._run("execute", _THROTTLED, mailbox.lower(), THROTTLE_FOR,
                            reason[:500])
        except Exception as exc:  # this node slows down anyway
            self._failed("share a throttling reply", exc)

    async def recipients_24h(self) -> dict[str, int]:
        try:
            rows = await self._run("fetch", _DAY)
        except Exception as exc:
            self._failed("count the day's recipients", exc)
            return {}
        return {row["mailbox"]: int(row["n"]) for row in rows}

    async def prune(self) -> None:
        try:
            await self._run("execute", _PRUNE)
        except Exception as exc:
            self._failed("prune old sends", exc)
