"""Rows of the cluster queue and back: envelopes and states as columns, a message's bytes as
ordered chunks verified against the size and checksum recorded at commit, and the driver's
failures turned into the store's errors with what to do."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import asyncpg

from relay.config.pgdsn import PgDsn
from relay.message import (
    READ_CHUNK,
    BodyCheck,
    DeliveryState,
    Envelope,
    Message,
    QueueEntry,
)
from relay.spool.base import SpoolError, SpoolUnavailableError

__all__ = [
    "CHUNK",
    "DOWN",
    "chunks_of",
    "entry_from",
    "envelope_json",
    "no_reset",
    "state_from",
    "unavailable",
    "verified",
]

# A message's bytes are stored and read back in pieces of this size, so neither a commit nor a
# delivery holds a 35 MB scan in memory more than once (the piece it is at).
CHUNK = READ_CHUNK
# Chunks per INSERT: 2 MB per statement, one statement for ordinary mail. A batch costs about
# four times its size while the driver encodes it (8 MB at this size, measured by
# tests/test_pgstore.py), whatever the message's size: 16 chunks cost 16 MB.
CHUNKS_PER_INSERT = 8


def chunks_of(content: Sequence[bytes | bytearray | memoryview]) -> Iterator[bytes]:
    """The content's bytes in CHUNK pieces; at most one piece is copied at a time."""
    pending = bytearray()
    for part in content:
        view = memoryview(part).cast("B")
        pos = 0
        if pending:
            take = CHUNK - len(pending)
            pending += view[:take]
            pos = take
            if len(pending) < CHUNK:
                continue
            yield bytes(pending)
            pending.clear()
        while len(view) - pos >= CHUNK:
            yield bytes(view[pos:pos + CHUNK])
            pos += CHUNK
        pending += view[pos:]
    if pending:
        yield bytes(pending)


def envelope_json(envelope: Envelope) -> str:
    return json.dumps({
        "mail_from": envelope.mail_from, "rcpt_tos": list(envelope.rcpt_tos),
        "account": envelope.account, "app": envelope.app, "mailbox": envelope.mailbox,
        "bounce_to": envelope.bounce_to, "client": envelope.client,
        "received_at": envelope.received_at, "original_from": envelope.original_from,
        "is_dsn": envelope.is_dsn,
    }, ensure_ascii=True)


def _envelope(raw: Any) -> Envelope:
    meta = json.loads(raw) if isinstance(raw, str) else raw
    return Envelope(
        mail_from=meta["mail_from"], rcpt_tos=tuple(meta["rcpt_tos"]), account=meta["account"],
        app=meta["app"], mailbox=meta["mailbox"], bounce_to=meta["bounce_to"],
        client=meta["client"], received_at=float(meta["received_at"]),
        original_from=meta.get("original_from", ""), is_dsn=bool(meta.get("is_dsn", False)))


def state_from(row: Any) -> DeliveryState:
    pending = row["pending_rcpts"]
    if isinstance(pending, str):
        pending = json.loads(pending)
    return DeliveryState(
        attempts=row["attempts"], next_attempt_at=row["next_attempt_at"],
        pending_rcpts=None if pending is None else tuple(pending),
        last_error=row["last_error"], bounce_reason=row["bounce_reason"])


def state_args(state: DeliveryState) -> tuple[Any, ...]:
    pending = None if state.pending_rcpts is None else json.dumps(list(state.pending_rcpts))
    return (state.attempts, state.next_attempt_at, pending, state.last_error,
            state.bounce_reason)


def entry_from(row: Any) -> QueueEntry:
    return QueueEntry(id=row["id"], envelope=_envelope(row["envelope"]), state=state_from(row),
                      size=row["size"])


Fetch = Callable[[int, int], list[bytes]]  # (first seq, last seq) -> the chunks, in order


class BadContent(Exception):
    """The chunks do not add up to what was committed."""


def verified(size: int, sha256: str, first: list[bytes] | None, fetch: Fetch,
             inline_limit: int) -> Message:
    """The message, once its chunks match the size and checksum recorded at commit (blocking:
    ``fetch`` goes to the database). ``first``: the chunks already read with the claim, for a
    small message (all of them). A large one is checked in one pass a chunk at a time, then
    read again while it is sent, a chunk at a time."""
    digest = hashlib.sha256()
    check = BodyCheck()
    count = -(-size // CHUNK)
    if size <= inline_limit:
        pieces = first if first is not None else (fetch(0, count - 1) if count else [])
        data = b"".join(pieces)
        digest.update(data)
        check.update(data)
        if len(data) != size or digest.hexdigest() != sha256:
            raise BadContent("content does not match the size and checksum recorded when it "
                             "was queued")
        return Message(size, check, data)
    seen = 0
    for seq in range(count):
        (piece,) = fetch(seq, seq)
        digest.update(piece)
        check.update(piece)
        seen += len(piece)
    if seen != size or digest.hexdigest() != sha256:
        raise BadContent("content does not match the size and checksum recorded when it was "
                         "queued")
    return Message(size, check, None, reader=_reader(size, fetch))


def _reader(size: int, fetch: Fetch) -> Callable[[int, int], bytes]:
    cached: dict[int, bytes] = {}  # the last chunk read: senders read in smaller pieces

    def read(start: int, length: int) -> bytes:
        out = bytearray()
        pos = start
        end = min(size, start + length)
        while pos < end:
            seq = pos // CHUNK
            if seq not in cached:
                cached.clear()
                (cached[seq],) = fetch(seq, seq)
            piece = cached[seq]
            offset = pos - seq * CHUNK
            take = piece[offset:offset + end - pos]
            if not take:
                raise SpoolError("a queued message's content shrank while being sent")
            out += take
            pos += len(take)
        return bytes(out)

    return read


def threadsafe_fetch(loop: asyncio.AbstractEventLoop,
                     coro: Callable[[int, int], Any], timeout: float) -> Fetch:
    """``coro`` run on the store's loop from a sender's thread."""
    def fetch(first: int, last: int) -> list[bytes]:
        result: list[bytes] = asyncio.run_coroutine_threadsafe(coro(first, last), loop).result(
            timeout)
        return result
    return fetch


def unavailable(dsn: PgDsn, exc: BaseException, doing: str) -> SpoolError:
    """What the client's 451 and the log say when the database cannot do ``doing``. A store
    error (an OSError too) raised below is passed on as it is."""
    if isinstance(exc, SpoolError):
        return exc
    name = type(exc).__name__
    text = str(exc).strip() or name
    if name == "ReadOnlySQLTransactionError":
        hint = ("the database is read-only (a standby, or a failover in progress); point "
                "spool.postgres at the primary, e.g. with target_session_attrs=read-write")
    elif isinstance(exc, TimeoutError):
        hint = ("the database did not answer in time; check its load and the network to it")
    else:
        hint = ("check that PostgreSQL is running and reachable, and the credentials in "
                "spool.postgres (`m365relay doctor` tests the link)")
    return SpoolUnavailableError(f"cannot {doing}: the queue database ({dsn.shown}) is "
                                 f"unavailable ({text}); {hint}. Clients get 451 and retry")


# Failures that mean "the database cannot be used now", as opposed to a bug in a statement.
DOWN: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError, asyncpg.ReadOnlySQLTransactionError,
    asyncpg.AdminShutdownError, asyncpg.CrashShutdownError, asyncpg.QueryCanceledError,
    asyncpg.InsufficientResourcesError, asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidPasswordError,
)


async def no_reset(conn: Any) -> None:
    """What a pooled connection needs when it goes back: nothing. asyncpg's default reset is
    one more round trip per statement (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL), half of
    all the round trips per message (bench/README.md: 0.49x the file store with it, 0.95x
    without). asyncpg still rolls back a transaction left open. Safe because pooled connections
    keep no session state: locks are transaction-scoped (pg_advisory_xact_lock), nothing is
    SET, no cursor stays open, and LISTEN has its own connection (pgnodes.Heartbeat). Whoever
    adds session state on the pool must put the reset back."""
    del conn
