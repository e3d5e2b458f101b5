"""The statements of the cluster queue (:mod:`relay.spool.postgres`), one place to read them
all. Times that decide leases are the database's ``now()``, so the nodes' clocks never have to
agree; ``next_attempt_at`` is the scheduling node's unix time, as in the file store."""

from __future__ import annotations

from typing import Any

from relay.message import QueueEntry
from relay.spool.pgrows import entry_from
from relay.spool.pgschema import SCHEMA

M = f"{SCHEMA}.messages"
_STATE = "attempts, next_attempt_at, pending_rcpts, last_error, bounce_reason"
_ENTRY = f"id, status, envelope, size, sha256, {_STATE}"

# Row and chunks in one statement (its own transaction): a data-modifying WITH runs once even
# when there are no chunks to join it with.
INSERT = f"""
WITH m AS (
    INSERT INTO {M} (id, envelope, app, mailbox, size, sha256, received_at, owner)
    VALUES ($1, $2::jsonb, $3, $4, $5, $6, $7, $8) RETURNING id)
INSERT INTO {SCHEMA}.chunks (message_id, seq, data)
SELECT m.id, s.seq - 1, s.data FROM m, unnest($9::bytea[]) WITH ORDINALITY AS s(data, seq)
"""
MORE_CHUNKS = f"""
INSERT INTO {SCHEMA}.chunks (message_id, seq, data)
SELECT $1, $2 + s.seq - 1, s.data FROM unnest($3::bytea[]) WITH ORDINALITY AS s(data, seq)
"""
# Claim and, for a small message, load in one round trip. $5: the owner it must have (a node
# delivers only its own mail), NULL for an operator's command.
CLAIM = f"""
WITH c AS (
    UPDATE {M} SET claimed_by = $2, lease_until = now() + make_interval(secs => $3)
    WHERE id = $1 AND status = $4 AND ($5::text IS NULL OR owner = $5)
      AND (claimed_by IS NULL OR lease_until < now())
    RETURNING id, size, sha256, {_STATE})
SELECT c.*, CASE WHEN c.size <= $6 THEN (
    SELECT coalesce(array_agg(data ORDER BY seq), '{{}}') FROM {SCHEMA}.chunks
    WHERE message_id = c.id) END AS data
FROM c
"""
BUSY = f"""
SELECT true FROM {M} WHERE id = $1 AND status = 'queued' AND owner = $2
    AND claimed_by IS NOT NULL AND lease_until >= now()
"""
CHUNKS = (f"SELECT data FROM {SCHEMA}.chunks WHERE message_id = $1 AND seq BETWEEN $2 AND $3 "
          "ORDER BY seq")
SET_STATUS = (f"UPDATE {M} SET status = $2, reason = $3, claimed_by = NULL, lease_until = NULL, "
              "changed_at = now() WHERE id = $1")
DELETE = f"DELETE FROM {M} WHERE id = $1"
DELETE_MANY = f"DELETE FROM {M} WHERE id = ANY($1::text[])"
DELETE_IN = f"DELETE FROM {M} WHERE id = $1 AND status = $2"
UNCLAIM = (f"UPDATE {M} SET claimed_by = NULL, lease_until = NULL "
           "WHERE id = $1 AND claimed_by = $2")
SAVE_STATE = f"""
UPDATE {M} SET attempts = $2, next_attempt_at = $3, pending_rcpts = $4::jsonb, last_error = $5,
    bounce_reason = $6, changed_at = now()
WHERE id = $1 AND status = 'queued'
"""
FAIL = (f"UPDATE {M} SET status = 'failed', reason = $2, claimed_by = NULL, lease_until = NULL, "
        "changed_at = now() WHERE id = $1 AND status = 'queued'")
MOVE = f"""
UPDATE {M} SET status = $3, changed_at = now(),
    next_attempt_at = CASE WHEN $3 = 'queued' THEN 0 ELSE next_attempt_at END
WHERE id = $1 AND status = $2
"""
IN_STATUS = f"SELECT true FROM {M} WHERE id = $1 AND status = $2"
ROW = f"SELECT {_ENTRY} FROM {M} WHERE id = $1 AND ($2::text IS NULL OR status = $2)"
ENTRIES = f"SELECT {_ENTRY} FROM {M} WHERE status = $1 ORDER BY id"
OWNED = f"SELECT {_ENTRY} FROM {M} WHERE status = 'queued' AND owner = $1 ORDER BY id"
CLAIMED = (f"SELECT claimed_by IS NOT NULL AND lease_until >= now() FROM {M} "
           "WHERE id = $1")
ASIDE = (f"SELECT status, count(*) AS n FROM {M} WHERE status IN ('failed', 'corrupt') "
         "GROUP BY status")
OWNER = f"SELECT owner FROM {M} WHERE id = $1"
# A write, so a read-only database (a standby after a failover) fails the probe as it would
# fail a commit.
PROBE = f"UPDATE {SCHEMA}.nodes SET seen_at = now() WHERE name = $1"
ANY_ALIVE = f"SELECT EXISTS (SELECT 1 FROM {SCHEMA}.nodes WHERE lease_until >= now())"
NODES = f"""
SELECT n.name, n.lease_until >= now() AS alive,
    extract(epoch FROM n.started_at)::float8 AS started,
    extract(epoch FROM n.seen_at)::float8 AS seen,
    (SELECT count(*) FROM {M} WHERE owner = n.name AND status = 'queued') AS owned,
    (SELECT count(*) FROM {M} WHERE claimed_by = n.name AND lease_until >= now()) AS claimed,
    (SELECT count(*) FROM {SCHEMA}.mailbox_slots s
     WHERE s.node = n.name AND s.lease_until >= now()) AS slots
FROM {SCHEMA}.nodes n
WHERE n.seen_at > now() - interval '1 day'
   OR EXISTS (SELECT 1 FROM {M} WHERE owner = n.name AND status = 'queued')
ORDER BY n.name
"""


async def owned(pool: Any, node: str) -> list[QueueEntry]:
    """The queued mail this node schedules, oldest first."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(OWNED, node)
    return [entry_from(row) for row in rows]
