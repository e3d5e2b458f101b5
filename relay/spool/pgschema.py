"""The cluster queue's schema on PostgreSQL: versioned steps, applied in order under an advisory
lock, so two nodes starting at once (or a Kubernetes init container beside a running relay) never
apply one twice. Every step runs in one transaction with its version row: a step is in, or not.

``m365relay db upgrade`` applies what is missing; the relay does it at start unless
``spool.upgrade_schema: false``, and then only checks the version. A database newer than this
relay (a rollback after an upgrade) is refused with the fix, never written to.

Everything lives in the schema ``m365relay``, so the relay can share a database with other
applications and a DBA can grant or drop it as one object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["LOCK_KEY", "SCHEMA", "STEPS", "SchemaStatus", "status", "upgrade"]

SCHEMA = "m365relay"
# pg_advisory_xact_lock key: "m365r" as an integer, so it won't collide with another app's.
LOCK_KEY = 0x6D33363572

# --- the queue (relay/spool/postgres.py) ---------------------------------------------------
# One row per accepted message; its bytes in `chunks`, in order. `owner` is the node that
# schedules it (the one that accepted it, or the one that took it over when that node stopped
# renewing its lease in `nodes`); `claimed_by`/`lease_until` is who acts on it right now (a
# delivery attempt, an operator's `m365relay queue` command), renewed while it lasts.
QUEUE = f"""
CREATE TABLE {SCHEMA}.nodes (
    name text PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz NOT NULL DEFAULT now(),
    lease_until timestamptz NOT NULL,
    pid integer,
    version text NOT NULL DEFAULT ''
);
CREATE TABLE {SCHEMA}.messages (
    id text PRIMARY KEY,
    status text NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'held', 'failed', 'corrupt')),
    envelope jsonb NOT NULL,
    app text NOT NULL,
    mailbox text NOT NULL,
    size bigint NOT NULL,
    sha256 text NOT NULL,
    received_at double precision NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL DEFAULT 0,
    pending_rcpts jsonb,
    last_error text NOT NULL DEFAULT '',
    bounce_reason text NOT NULL DEFAULT '',
    owner text NOT NULL,
    claimed_by text,
    lease_until timestamptz,
    reason text NOT NULL DEFAULT '',
    changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_owner ON {SCHEMA}.messages (owner) WHERE status = 'queued';
CREATE INDEX messages_status ON {SCHEMA}.messages (status, received_at);
CREATE TABLE {SCHEMA}.chunks (
    message_id text NOT NULL REFERENCES {SCHEMA}.messages (id) ON DELETE CASCADE,
    seq integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (message_id, seq)
);
"""

# --- Exchange's per-mailbox limits, shared by every node (relay/spool/pglimits.py) --------------
LIMITS = f"""
CREATE TABLE {SCHEMA}.mailbox_slots (
    mailbox text NOT NULL,
    slot integer NOT NULL,
    node text NOT NULL,
    lease_until timestamptz NOT NULL,
    PRIMARY KEY (mailbox, slot)
);
CREATE TABLE {SCHEMA}.mailbox_sends (
    id bigserial PRIMARY KEY,
    mailbox text NOT NULL,
    sent_at timestamptz NOT NULL DEFAULT now(),
    recipients integer NOT NULL DEFAULT 0,
    node text NOT NULL
);
CREATE INDEX mailbox_sends_time ON {SCHEMA}.mailbox_sends (mailbox, sent_at);
CREATE TABLE {SCHEMA}.mailbox_throttle (
    mailbox text PRIMARY KEY,
    slow_until timestamptz NOT NULL,
    reason text NOT NULL DEFAULT ''
);
-- One round trip per admission: under a per-mailbox transaction lock, count the mailbox's
-- sends in the window (every node's) and either record this one or say how long to wait.
-- While Exchange throttles the mailbox (any node saw it), half the rate.
CREATE FUNCTION {SCHEMA}.admit_send(p_mailbox text, p_limit integer, p_window float8,
                                    p_node text, OUT wait float8, OUT send_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
    oldest timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('m365relay.sends:' || p_mailbox));
    IF EXISTS (SELECT 1 FROM {SCHEMA}.mailbox_throttle
               WHERE mailbox = p_mailbox AND slow_until > now()) THEN
        p_limit := greatest(1, p_limit / 2);
    END IF;
    SELECT count(*), min(s.sent_at) INTO n, oldest FROM (
        SELECT sent_at FROM {SCHEMA}.mailbox_sends
        WHERE mailbox = p_mailbox AND sent_at > now() - make_interval(secs => p_window)
        ORDER BY sent_at DESC LIMIT p_limit) s;
    IF n >= p_limit THEN
        wait := greatest(0.02, extract(epoch FROM oldest - now()) + p_window);
        send_id := NULL;
        RETURN;
    END IF;
    INSERT INTO {SCHEMA}.mailbox_sends (mailbox, node) VALUES (p_mailbox, p_node)
    RETURNING id INTO send_id;
    wait := 0;
END $$;
"""

# --- delegated sign-ins (relay/tokens/shared.py) ----------------------------------------------
SIGNINS = f"""
CREATE TABLE {SCHEMA}.signins (
    account text PRIMARY KEY,
    data bytea NOT NULL,
    generation bigint NOT NULL DEFAULT 1,
    refreshing_by text,
    refreshing_until timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""

# Version → the SQL that takes the schema from version-1 to it. Append only, once released.
# --- version 2: admissions spaced across the cluster -------------------------------------------
# Version 1 counted the window only, so two nodes could each start a message at once, and a
# burst went out in the first seconds of the minute. One relay spaces a mailbox's messages
# 60 / messages_per_minute seconds apart; now the cluster does, whichever node sends.
SPACING = f"""
ALTER TABLE {SCHEMA}.mailbox_sends ADD COLUMN started_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX mailbox_sends_latest ON {SCHEMA}.mailbox_sends (mailbox, id);
CREATE OR REPLACE FUNCTION {SCHEMA}.admit_send(p_mailbox text, p_limit integer,
                                               p_window float8, p_node text,
                                               OUT wait float8, OUT send_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
    oldest timestamptz;
    latest timestamptz;
    gap float8;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('m365relay.sends:' || p_mailbox));
    IF EXISTS (SELECT 1 FROM {SCHEMA}.mailbox_throttle
               WHERE mailbox = p_mailbox AND slow_until > now()) THEN
        p_limit := greatest(1, p_limit / 2);
    END IF;
    send_id := NULL;
    -- clock_timestamp(): the lock may have been waited for; now() is when the wait began.
    gap := p_window / p_limit;
    SELECT s.started_at INTO latest FROM {SCHEMA}.mailbox_sends s
    WHERE s.mailbox = p_mailbox ORDER BY s.id DESC LIMIT 1;
    IF latest IS NOT NULL AND latest + make_interval(secs => gap) > clock_timestamp() THEN
        wait := greatest(0.01, extract(epoch FROM latest - clock_timestamp()) + gap);
        RETURN;
    END IF;
    SELECT count(*), min(s.sent_at) INTO n, oldest FROM (
        SELECT sent_at FROM {SCHEMA}.mailbox_sends
        WHERE mailbox = p_mailbox AND sent_at > clock_timestamp() - make_interval(secs => p_window)
        ORDER BY sent_at DESC LIMIT p_limit) s;
    IF n >= p_limit THEN
        wait := greatest(0.02, extract(epoch FROM oldest - clock_timestamp()) + p_window);
        RETURN;
    END IF;
    INSERT INTO {SCHEMA}.mailbox_sends (mailbox, node, sent_at, started_at)
    VALUES (p_mailbox, p_node, clock_timestamp(), clock_timestamp())
    RETURNING id INTO send_id;
    wait := 0;
END $$;
"""

# --- version 3: a fair share of a mailbox's connection slots between nodes --------------------
# A node that finds every slot of a mailbox held by others says so here; the holders give
# slots back until each wanting node can have its share (relay/delivery/slots.py), instead of
# keeping them for as long as their own queue lasts (or their idle_timeout).
WANTS = f"""
CREATE TABLE {SCHEMA}.mailbox_wants (
    mailbox text NOT NULL,
    node text NOT NULL,
    until timestamptz NOT NULL,
    PRIMARY KEY (mailbox, node)
);
"""

STEPS: dict[int, str] = {1: QUEUE + LIMITS + SIGNINS, 2: SPACING, 3: WANTS}
LATEST = max(STEPS)

_VERSION_TABLE = f"""
CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now(),
    applied_by text NOT NULL DEFAULT ''
);
"""


@dataclass(frozen=True)
class SchemaStatus:
    version: int  # 0: no schema yet
    latest: int = LATEST

    @property
    def current(self) -> bool:
        return self.version == self.latest

    @property
    def newer(self) -> bool:
        return self.version > self.latest


async def status(conn: Any) -> SchemaStatus:
    """The schema's version (0 when there is none). ``conn``: an asyncpg connection."""
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL",
                                 f"{SCHEMA}.schema_version")
    if not exists:
        return SchemaStatus(0)
    version = await conn.fetchval(
        f"SELECT coalesce(max(version), 0) FROM {SCHEMA}.schema_version")
    return SchemaStatus(int(version))


async def upgrade(conn: Any, *, node: str = "") -> list[int]:
    """Apply the missing steps; returns the versions applied (none: already current). Raises
    RuntimeError when the database is newer than this relay."""
    applied: list[int] = []
    # A current schema needs no DDL, nor the right to create in the database: a relay whose
    # role may only use the schema (a DBA migrated it) starts without an error.
    if (await status(conn)).current:
        return applied
    async with conn.transaction():
        # Serialises upgraders across nodes; held to the end of this transaction.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        if await conn.fetchval("SELECT to_regnamespace($1) IS NULL", SCHEMA):
            await conn.execute(f"CREATE SCHEMA {SCHEMA}")
        await conn.execute(_VERSION_TABLE)
        current = (await status(conn)).version
        if current > LATEST:
            raise RuntimeError(newer_message(current))
        for version in sorted(v for v in STEPS if v > current):
            await conn.execute(STEPS[version])
            await conn.execute(
                f"INSERT INTO {SCHEMA}.schema_version (version, applied_by) "
                "VALUES ($1, $2)",
                version, node)
            applied.append(version)
    return applied


def newer_message(version: int) -> str:
    return (f"the database's m365relay schema is version {version}, newer than this relay "
            f"knows ({LATEST}); a newer relay upgraded it. Run that version of m365relay on "
            "every node (rolling back needs a database backup from before the upgrade)")
