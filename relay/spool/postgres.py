"""The cluster queue: a :class:`~relay.spool.base.Store` on PostgreSQL that several relays
share (``spool.postgres``).

A message is one row in ``messages`` and its bytes in ``chunks``, written in one transaction:
the client's 250 waits for its commit (PostgreSQL's ``synchronous_commit``, on by default,
means flushed to the WAL, and to a synchronous standby where one is configured). Each node
schedules the mail it accepted (``owner``); a delivery attempt claims the row
(``claimed_by``, ``lease_until``, renewed by the node's heartbeat while it lasts,
:mod:`relay.spool.pgnodes`), and when a node dies the others take its mail over once its
leases have run out.

Round trips per message: one statement to accept it (row and chunks in one ``INSERT ... WITH``,
for anything up to 2 MB; larger ones add a 2 MB statement per 2 MB in the same transaction),
one to claim and load it, and once Exchange said 250 a share of one DELETE (those of the same
few milliseconds go together: pgbatch.py). A failure to reach the database is
:class:`SpoolUnavailableError`: 451 4.3.0 to the client, and the pool reconnects by itself
once the database is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from relay.config.records import SpoolSettings
from relay.message import Content, DeliveryState, Envelope, Message, QueueEntry, content_parts
from relay.spool import pgqueue
from relay.spool.base import (
    Change,
    CheckOut,
    SpoolCorruptError,
    SpoolError,
    SpoolMissingError,
    SpoolUnavailableError,
)
from relay.spool.fileformat import INLINE_LIMIT, _b32
from relay.spool.pgbatch import Batch
from relay.spool.pgcommands import PgClaim, PgCommands
from relay.spool.pglimits import SharedLimits
from relay.spool.pglooking import PgLooking
from relay.spool.pgnodes import CHANNEL, Heartbeat
from relay.spool.pgrows import (
    CHUNK,
    CHUNKS_PER_INSERT,
    DOWN,
    BadContent,
    chunks_of,
    envelope_json,
    no_reset,
    state_args,
    state_from,
    threadsafe_fetch,
    unavailable,
    verified,
)
from relay.spool.pgschema import newer_message, status, upgrade
from relay.spool.pgsignins import PgSignins

__all__ = ["PgClaim", "PgStore"]

log = logging.getLogger("m365relay.spool")

STATEMENT_TIMEOUT = 10.0  # seconds: a hung database gives 451, not a hung client


class PgStore(PgCommands, PgLooking):
    """The shared queue. ``listen``: follow other processes' changes (the relay does; a queue
    command only announces)."""

    def __init__(self, settings: SpoolSettings, *, listen: bool = True) -> None:
        assert settings.postgres is not None  # noqa: S101 -- open_store picks this store
        self.dsn = settings.postgres
        self.settings = settings
        self._listen = listen
        # A relay claims as its node; a queue command as itself, so it never takes a node's
        # lease for its own.
        self._node = settings.node
        self.holder = (settings.node if listen else
                       f"queue:{socket.gethostname()}:{os.getpid()}")
        self.pool: Any = None
        self.heartbeat: Heartbeat | None = None
        # Exchange's per-mailbox limits for the whole cluster, on the same pool.
        self.limits = SharedLimits(self._pool, settings.node, settings.lease)
        # Delegated sign-ins, one copy for every node (relay/tokens/shared.py).
        self.signins = PgSignins(self._pool, settings.node)
        self._changes: asyncio.Queue[Change] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Attempts in flight on this node, by id: the heartbeat renews only their claims.
        self._inflight: set[str] = set()
        # Delivered, but the DELETE that records it has not committed yet (database away).
        self._undeleted: set[str] = set()
        self._deleter: asyncio.Task[None] | None = None
        self._deletes = Batch(self._delete_many)  # deliveries recorded a few at a time

    @property
    def node(self) -> str:
        return self._node

    @property
    def location(self) -> str:
        return f"{self.dsn.shown} (node {self._node})"

    # --- lifecycle

    async def open(self) -> list[QueueEntry]:
        self._loop = asyncio.get_running_loop()
        try:
            async with (await self._pool()).acquire() as conn:
                await self._schema(conn)
        except DOWN as exc:
            await self.close()
            raise unavailable(self.dsn, exc, "open the queue") from exc
        except asyncpg.PostgresError as exc:
            await self.close()
            raise SpoolError(f"cannot open the queue database ({self.dsn.shown}): {exc}; "
                             "`m365relay db status` shows what is wrong") from exc
        if not self._listen:
            return []
        self.heartbeat = Heartbeat(self.pool, self._connect, node=self._node,
                                   lease=self.settings.lease, version=_version(),
                                   emit=self._changes.put_nowait, inflight=self._inflight)
        try:
            await self.heartbeat.register()
            await self.heartbeat.start(listen=True)
            return await pgqueue.owned(self.pool, self._node)
        except DOWN as exc:
            await self.close()
            raise unavailable(self.dsn, exc, "open the queue") from exc

    async def _pool(self) -> Any:
        """The connection pool, made at first use (a queue command never calls open())."""
        if self.pool is None:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            try:
                self.pool = await asyncpg.create_pool(
                    self.dsn.uri, min_size=1 if self._listen else 0, max_size=10, timeout=10,
                    command_timeout=STATEMENT_TIMEOUT, reset=no_reset, server_settings={
                        "application_name": f"m365relay {self.holder}"[:63]})
            except DOWN as exc:
                raise unavailable(self.dsn, exc, "reach the queue") from exc
        return self.pool

    async def _schema(self, conn: Any) -> None:
        if self.settings.upgrade_schema and self._listen:
            try:
                await upgrade(conn, node=self._node)
            except RuntimeError as exc:
                raise SpoolError(str(exc)) from None
            return
        found = await status(conn)
        if found.newer:
            raise SpoolError(newer_message(found.version))
        if not found.current:
            raise SpoolError(f"the queue database ({self.dsn.shown}) has schema version "
                             f"{found.version}, this relay needs {found.latest}; run "
                             "`m365relay db upgrade` (spool.upgrade_schema is off)")

    async def _connect(self) -> Any:
        return await asyncpg.connect(self.dsn.uri, timeout=10)

    async def close(self) -> None:
        if self._deleter is not None:
            self._deleter.cancel()
            await asyncio.gather(self._deleter, return_exceptions=True)
            self._deleter = None
        if self._undeleted:
            log.error("%d delivered message(s) could not be removed from the queue before the "
                      "stop (the database was away); another node sends them again: %s",
                      len(self._undeleted), ", ".join(sorted(self._undeleted)))
        if self.heartbeat is not None:
            await self.heartbeat.stop(clean=True)
            self.heartbeat = None
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), 5)
            except DOWN:
                self.pool.terminate()
            self.pool = None

    # --- accepting mail

    async def commit(self, envelope: Envelope, content: Content) -> str:
        parts = content_parts(content)
        digest = hashlib.sha256()
        size = 0
        for part in parts:
            digest.update(part)
            size += memoryview(part).nbytes
        row = (envelope_json(envelope), envelope.app, envelope.mailbox, size,
               digest.hexdigest(), envelope.received_at, self._node)
        for _ in range(3):
            queue_id = _new_id()
            try:
                await self._insert(queue_id, row, parts, size)
            except asyncpg.UniqueViolationError:
                continue  # the same microsecond and 20 random bits on another node: again
            except DOWN as exc:
                raise unavailable(self.dsn, exc, "store the message") from exc
            return queue_id
        raise SpoolError("could not find a free queue id")  # pragma: no cover

    async def _insert(self, queue_id: str, row: tuple[Any, ...],
                      parts: Sequence[bytes | bytearray | memoryview], size: int) -> None:
        pieces = chunks_of(parts)
        first = [p for _, p in zip(range(CHUNKS_PER_INSERT), pieces, strict=False)]
        async with (await self._pool()).acquire() as conn:
            if size <= CHUNK * CHUNKS_PER_INSERT:
                # One statement, so one round trip and its own transaction.
                await conn.execute(pgqueue.INSERT, queue_id, *row, first)
                return
            async with conn.transaction():
                await conn.execute(pgqueue.INSERT, queue_id, *row, first)
                seq = len(first)
                while batch := [p for _, p in zip(range(CHUNKS_PER_INSERT), pieces,
                                                  strict=False)]:
                    await conn.execute(pgqueue.MORE_CHUNKS, queue_id, seq, batch)
                    seq += len(batch)

    # --- delivery

    async def checkout(self, queue_id: str) -> CheckOut:
        out = CheckOut(queue_id)
        if queue_id in self._inflight:  # scheduled twice here: the other attempt has it
            out.busy_for = max(1.0, self.settings.lease / 3)
            return out
        # In flight from before the claim: if its answer is lost, the heartbeat sees a claim
        # that is neither renewed nor kept, and lets it go.
        self._inflight.add(queue_id)
        try:
            claim = await self._claim(queue_id, "queued", owned=self._listen,
                                      inline=INLINE_LIMIT)
            if claim is None:
                self._inflight.discard(queue_id)
                busy = await self._busy(queue_id)
                if busy:
                    out.busy_for = max(1.0, self.settings.lease / 3)
                else:
                    out.missing = True
                return out
            out.claim = claim
            out.message = await self._message(claim)
        except SpoolError as exc:
            out.error = exc
        except DOWN as exc:
            out.error = unavailable(self.dsn, exc, f"read message {queue_id}")
        except Exception as exc:
            # Whatever the driver raised while the database went away (each outage finds
            # another class): never out of here, or the attempt's claim stays in _inflight
            # and the heartbeat renews it for good, with nobody delivering the message.
            log.warning("%s: cannot claim or read it (%s: %s); it is tried again later",
                        queue_id, type(exc).__name__, exc)
            out.error = unavailable(self.dsn, exc, f"read message {queue_id}")
        finally:
            if out.claim is None:
                self._inflight.discard(queue_id)
        return out

    async def _claim(self, queue_id: str, status_: str, *, owned: bool, inline: int
                     ) -> PgClaim | None:
        async with (await self._pool()).acquire() as conn:
            row = await conn.fetchrow(pgqueue.CLAIM, queue_id, self.holder,
                                      self.settings.lease, status_,
                                      self._node if owned else None, inline)
        if row is None:
            return None
        return PgClaim(queue_id, state_from(row), self.holder, row["size"], row["sha256"],
                       list(row["data"]) if row["data"] is not None else None)

    async def _busy(self, queue_id: str) -> bool:
        """Whether the message is queued here but someone else holds a live claim on it."""
        async with (await self._pool()).acquire() as conn:
            return bool(await conn.fetchval(pgqueue.BUSY, queue_id, self._node))

    async def _message(self, claim: PgClaim) -> Message:
        assert self._loop is not None  # noqa: S101 -- opened
        fetch = threadsafe_fetch(self._loop, lambda a, b: self._chunks(claim.id, a, b),
                                 STATEMENT_TIMEOUT * 2)
        first = claim.first
        if first is not None or claim.size <= INLINE_LIMIT:
            if first is None:
                first = await self._chunks(claim.id, 0, -(-claim.size // CHUNK) - 1)
            try:
                return verified(claim.size, claim.sha256, first, fetch, INLINE_LIMIT)
            except BadContent as exc:
                await self._corrupt(claim.id, str(exc))
                raise SpoolCorruptError(f"message {claim.id} is damaged ({exc})") from exc
        try:
            return await asyncio.to_thread(verified, claim.size, claim.sha256, None, fetch,
                                           INLINE_LIMIT)
        except BadContent as exc:
            await self._corrupt(claim.id, str(exc))
            raise SpoolCorruptError(f"message {claim.id} is damaged ({exc})") from exc

    async def _chunks(self, queue_id: str, first: int, last: int) -> list[bytes]:
        async with (await self._pool()).acquire() as conn:
            rows = await conn.fetch(pgqueue.CHUNKS, queue_id, first, last)
        return [row["data"] for row in rows]

    async def _corrupt(self, queue_id: str, why: str) -> None:
        await self._exec(pgqueue.SET_STATUS, queue_id, "corrupt", why, what="set aside")

    async def checkin(self, out: CheckOut, *, remove: bool = False) -> None:
        if out.queue_id in self._undeleted:
            return  # delivered; the claim stays until its removal is recorded
        if out.message is not None:
            out.message.close()
        claim = out.claim
        holder = claim.holder if isinstance(claim, PgClaim) else ""
        if isinstance(claim, PgClaim):
            claim.holder = ""  # a second call is harmless
        if remove:
            try:
                await self._record_delivery(out.queue_id)
            except SpoolUnavailableError as exc:
                self._keep_deleting(out.queue_id, exc)  # in flight until it is recorded
                return
            self._inflight.discard(out.queue_id)
            return
        self._inflight.discard(out.queue_id)  # a release that fails is the heartbeat's now
        if holder:
            try:
                await self._exec(pgqueue.UNCLAIM, out.queue_id, holder, what="release")
            except SpoolUnavailableError as exc:
                # Nothing lost: the claim runs out after spool.lease and the message is tried
                # again then.
                log.warning("%s: could not release its claim: %s", out.queue_id, exc)

    async def _record_delivery(self, queue_id: str) -> None:
        """Exchange has the message: until this DELETE commits, a crash sends it again, so a
        database that is away for a moment is waited for (about a lease) before giving up."""
        deadline = time.monotonic() + self.settings.lease
        pause = 0.2
        while True:
            try:
                await self._deletes.add(queue_id)
                return
            except SpoolUnavailableError:
                if time.monotonic() + pause > deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)

    async def _delete_many(self, ids: list[str]) -> None:
        await self._exec(pgqueue.DELETE_MANY, ids, what="record the delivery")

    def _keep_deleting(self, queue_id: str, exc: SpoolUnavailableError) -> None:
        """Exchange has it but the database was away for a whole lease: keep the claim (the
        heartbeat renews what is in flight, so no node sends it again) and keep trying."""
        log.warning("%s: delivered, but its removal from the queue cannot be recorded yet "
                    "(%s); retrying, and no node sends it again meanwhile", queue_id, exc)
        self._undeleted.add(queue_id)
        if self._deleter is None or self._deleter.done():
            self._deleter = asyncio.get_running_loop().create_task(
                self._delete_later(), name="m365relay-record-deliveries")

    async def _delete_later(self) -> None:
        pause = 1.0
        while self._undeleted:
            await asyncio.sleep(pause)
            ids = sorted(self._undeleted)
            try:
                await self._delete_many(ids)
            except SpoolUnavailableError:
                pause = min(pause * 2, 10.0)
                continue
            self._undeleted.difference_update(ids)
            self._inflight.difference_update(ids)
            log.info("%s: removed (delivery recorded late)", ", ".join(ids))

    async def save_state(self, queue_id: str, state: DeliveryState, *, urgent: bool = False
                         ) -> None:
        del urgent  # every statement here is its own committed transaction
        done = await self._exec(pgqueue.SAVE_STATE, queue_id, *state_args(state),
                                what="save the retry state")
        if done == "UPDATE 0":
            raise SpoolMissingError(f"cannot save retry state: message {queue_id} is not "
                                    "queued")

    async def fail(self, queue_id: str, reason: str) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        text = f"{reason.rstrip()}\n\nqueue id: {queue_id}\nfailed at: {stamp}\n"
        done = await self._exec(pgqueue.FAIL, queue_id, text, what="mark the message failed")
        if done == "UPDATE 0":
            raise SpoolMissingError(f"cannot fail message {queue_id}: it is not queued")
        return f"{self.dsn.shown} messages.status = 'failed' (id {queue_id})"

    async def _exec(self, sql: str, *args: Any, what: str) -> str:
        try:
            async with (await self._pool()).acquire() as conn:
                return str(await conn.execute(sql, *args))
        except DOWN as exc:
            raise unavailable(self.dsn, exc, what) from exc

    # --- change notification

    async def changes(self) -> AsyncIterator[Change]:
        while True:
            yield await self._changes.get()

    async def announce(self, changes: Sequence[Change]) -> bool:
        try:
            async with (await self._pool()).acquire() as conn:
                for change in changes:
                    owner = "*" if change.queue_id == "*" else (
                        await conn.fetchval(pgqueue.OWNER, change.queue_id) or "*")
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL,
                                       f"{change.verb} {change.queue_id} {owner}")
        except DOWN as exc:
            raise unavailable(self.dsn, exc, "tell the relays") from exc
        return await self.relay_running()

    async def relay_running(self) -> bool:
        try:
            async with (await self._pool()).acquire() as conn:
                return bool(await conn.fetchval(pgqueue.ANY_ALIVE))
        except DOWN:
            return False


def _new_id() -> str:
    # The file store's form (time first, so ids sort by arrival), unique across nodes by the
    # primary key: a collision is retried.
    return _b32(time.time_ns() // 1000, 11) + _b32(secrets.randbits(20), 4)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return str(version("m365relay"))
    except PackageNotFoundError:  # pragma: no cover -- a source checkout
        return f"source (Python {sys.version_info.major}.{sys.version_info.minor})"
