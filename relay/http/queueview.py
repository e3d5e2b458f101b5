"""The queue as an admin looks at it: counts, ages and what waits for a retry, and why.

Read from the store at each scrape or page view (for files, a directory scan in a thread), for
``/metrics``, the status page and its JSON API, so all three show the same numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from relay.message import QueueEntry
from relay.spool.base import NodeInfo, SpoolUnavailableError, Store

# Upper bounds in seconds of the age classes the status page's chart and
# m365relay_queue_messages_by_age use; the last class is everything older.
AGE_CLASSES: tuple[tuple[str, float], ...] = (
    ("1m", 60.0), ("5m", 300.0), ("15m", 900.0), ("1h", 3600.0), ("6h", 21600.0),
    ("1d", 86400.0), ("older", float("inf")))
_MAX_WAITING = 50  # deferred messages listed one by one; the page stays readable


@dataclass(frozen=True)
class MailboxQueue:
    mailbox: str
    count: int
    oldest: float  # received_at of the oldest message, unix time
    last_error: str  # of the most recently tried message; "" if none failed yet


@dataclass(frozen=True)
class Waiting:
    """A message that failed at least once and waits for its next attempt."""

    id: str
    account: str
    mailbox: str
    recipients: tuple[str, ...]
    received_at: float
    attempts: int
    next_attempt_at: float
    last_error: str  # the reply, what it means and the fix (DeliveryError.describe())


@dataclass(frozen=True)
class QueueSummary:
    count: int
    oldest: float | None
    mailboxes: tuple[MailboxQueue, ...]  # most messages first
    held: int = 0  # put on hold by an operator (`m365relay queue hold`); not delivered
    deferred: int = 0  # of ``count``: tried and failed at least once
    ages: tuple[int, ...] = (0,) * len(AGE_CLASSES)  # messages per AGE_CLASSES entry
    waiting: tuple[Waiting, ...] = ()  # most recently failed first, at most _MAX_WAITING
    free_bytes: int | None = None  # free space on the spool's filesystem
    # Cluster mode: every relay sharing the queue (the counts above are the whole cluster's),
    # and this relay's name among them.
    nodes: tuple[NodeInfo, ...] = ()
    node: str = ""
    unavailable: str = ""  # the store cannot be read now (the database is away): why


def age_class(age: float) -> int:
    return next(i for i, (_, bound) in enumerate(AGE_CLASSES) if age < bound)


def summarize(entries: list[QueueEntry], held: int = 0, *, now: float | None = None,
              free_bytes: int | None = None) -> QueueSummary:
    groups: dict[str, list[QueueEntry]] = {}
    for entry in entries:
        groups.setdefault(entry.envelope.mailbox.lower(), []).append(entry)
    mailboxes = []
    for group in groups.values():
        tried = [e for e in group if e.state.last_error]
        last = max(tried, key=lambda e: e.state.next_attempt_at) if tried else None
        mailboxes.append(MailboxQueue(
            mailbox=group[0].envelope.mailbox, count=len(group),
            oldest=min(e.envelope.received_at for e in group),
            last_error=last.state.last_error if last is not None else ""))
    mailboxes.sort(key=lambda m: (-m.count, m.mailbox))
    oldest = min((e.envelope.received_at for e in entries), default=None)
    ages = [0] * len(AGE_CLASSES)
    if now is not None:
        for entry in entries:
            ages[age_class(max(now - entry.envelope.received_at, 0.0))] += 1
    failed = sorted((e for e in entries if e.state.attempts), reverse=True,
                    key=lambda e: e.state.next_attempt_at)
    waiting = tuple(Waiting(
        id=e.id, account=e.envelope.account, mailbox=e.envelope.mailbox,
        recipients=e.state.pending_rcpts or e.envelope.rcpt_tos,
        received_at=e.envelope.received_at, attempts=e.state.attempts,
        next_attempt_at=e.state.next_attempt_at, last_error=e.state.last_error)
        for e in failed[:_MAX_WAITING])
    return QueueSummary(len(entries), oldest, tuple(mailboxes), held, len(failed), tuple(ages),
                        waiting, free_bytes)


async def read_queue(store: Store, now: float | None = None) -> QueueSummary:
    """The queue as the store has it (which includes messages waiting for a retry). Looking
    must not change it, so nothing is quarantined."""
    try:
        entries = await store.entries(quarantine=False)
        held = await store.held_entries()
        summary = summarize(entries, len(held), now=time.time() if now is None else now,
                            free_bytes=await store.free_space())
        nodes = getattr(store, "nodes", None)  # a store shared by several relays
        if nodes is not None:
            summary = replace(summary, nodes=tuple(await nodes()),
                              node=str(getattr(store, "node", "")))
    except SpoolUnavailableError as exc:
        return QueueSummary(0, None, (), unavailable=str(exc))
    return summary
