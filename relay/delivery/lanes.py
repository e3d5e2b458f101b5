"""The bookkeeping of delivery's lanes: one per (app, mailbox), the unit Exchange limits."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from relay.message import QueueEntry

__all__ = ["Counters", "Lane"]


@dataclass
class Counters:
    delivered: int = 0  # recipients accepted upstream
    deferred: int = 0
    bounced: int = 0    # recipients failed permanently


@dataclass
class Lane:
    app: str
    mailbox: str
    ready: deque[QueueEntry] = field(default_factory=deque)
    workers: set[asyncio.Task[None]] = field(default_factory=set)
    idle: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    blocked_until: float = 0.0
    failures: int = 0  # path failures in a row; while > 0 only one worker probes the path
    pauses: int = 0  # identifies the current pause, so an older pause's timer cannot end it
    borrowed: int = 0  # connection slots lent to passthrough transactions (delivery/passthrough.py)
    waiting: int = 0  # passthrough transactions waiting for a slot; idle workers make room
    freed: asyncio.Event = field(default_factory=asyncio.Event)
    # The pause's cause is one a reload may fix (token, TLS, login, a missing app): SIGHUP
    # ends it. Not a 421 or a Retry-After: those are the server's to lift.
    reload_may_fix: bool = False
    epoch: int = 0  # bumped when a reload changed the app: workers reconnect with the new one
    # Cluster mode: every connection slot of the mailbox is held by other nodes; no worker
    # starts (each would ask the database again) until the retry timer asks once.
    slot_retry: bool = False
    # Cluster mode, while other nodes wait for the mailbox's slots: how many of them this node
    # may keep (delivery/slots.py SlotShares); None: no one waits, all of them.
    share: int | None = None
    active: int = 0  # workers in their loop, not on their way out
