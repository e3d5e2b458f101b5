"""The storage seam: what every other stage needs from a queue store, and nothing more.

Delivery, passthrough, ingress, the queue commands, the service and the status page talk to a
:class:`Store`; none of them knows whether it is the file store (:mod:`relay.spool.filestore`,
the default: one machine, Postfix's layout) or a database shared by several relays. Plain data
goes in and out (the types of :mod:`relay.message`): no paths, no file objects. A sender reads a
message only through the :class:`~relay.message.Message` that :meth:`Store.load` returns, so a
store may serve the bytes from a file or from chunks in a database.

Every method is a coroutine, because a database driver is; the file store runs its blocking
code in a thread inside, one thread hop per call, and :meth:`Store.checkout` and
:meth:`Store.checkin` bundle what delivery does per message (claim + load; remove + release)
so a message costs two hops, as before the seam existed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from relay.message import Content, DeliveryState, Envelope, Message, QueueEntry

__all__ = [
    "Change",
    "CheckOut",
    "Claim",
    "ClusterView",
    "NodeInfo",
    "SharedLimits",
    "SpoolBusyError",
    "SpoolCorruptError",
    "SpoolError",
    "SpoolFullError",
    "SpoolMissingError",
    "SpoolUnavailableError",
    "SpoolWriteError",
    "Store",
]


class SpoolError(OSError):
    """Base class for store failures.

    An OSError, like the failures it wraps, so callers that guard disk I/O with
    ``except OSError`` also catch these (the aiosmtplib habit of inheriting the builtin kind).
    """


class SpoolFullError(SpoolError):
    """The store is out of space or quota; the client should retry later (452)."""


class SpoolWriteError(SpoolError):
    """Any other failure to store a message durably; the client should retry later (451)."""


class SpoolUnavailableError(SpoolWriteError):
    """The store cannot be reached now (a database down, read-only after a failover): 451
    4.3.0, and the relay keeps serving so that it takes mail again once the store is back."""


class SpoolMissingError(SpoolError):
    """The message is no longer queued (delivered, failed or moved aside): stop scheduling it."""


class SpoolCorruptError(SpoolMissingError):
    """A queued message no longer matches what was committed; it has been moved aside."""


class SpoolBusyError(SpoolError):
    """Another process (a delivery attempt) held the message's claim for longer than we waited."""


class Claim(Protocol):
    """One holder's exclusive right to act on one message (a file lock, a database lease).
    ``state`` was read under the claim, so it includes any operator's change."""

    @property
    def id(self) -> str: ...
    @property
    def state(self) -> DeliveryState: ...


@dataclass
class CheckOut:
    """A message taken out for one delivery attempt: its claim (None when claiming failed with
    ``lock_error``, e.g. a filesystem without locks), and the verified message or why it could
    not be read (:class:`SpoolMissingError`: gone or moved aside; stop scheduling it)."""

    queue_id: str
    claim: Claim | None = None
    message: Message | None = None
    error: OSError | None = None
    lock_error: OSError | None = None
    missing: bool = False  # the message was no longer queued when we came to claim it
    # Another holder has it now (a shared store: an operator's command, or a lease that has not
    # yet expired after a node died): not gone, so schedule it again after this many seconds.
    busy_for: float | None = None


@dataclass(frozen=True)
class NodeInfo:
    """One relay sharing a store (cluster mode), for the status page, /metrics and the queue
    view. ``alive``: its lease (renewed every few seconds) has not run out."""

    name: str
    alive: bool
    started_at: float  # unix time
    seen_at: float
    owned: int  # queued messages it schedules
    claimed: int  # messages it holds a lease on now (attempts in flight)
    slots: int = 0  # upstream connection slots it holds (Exchange's 3 per mailbox, shared)


@dataclass(frozen=True)
class Change:
    """A message that changed outside this relay's schedule: ``verb`` is what happened
    (retry, release, bounce: try it now; hold, delete: forget it; commit: a new message),
    ``queue_id`` which one, ``"*"`` for the whole queue. Only a hint: delivery re-reads the
    message and re-checks it under its claim, so a lost change delays mail but never
    delivers a held or deleted message."""

    verb: str
    queue_id: str


class Store(Protocol):
    """The durable queue. Methods raise :class:`SpoolError` subclasses; none returns before
    its change is durable."""

    @property
    def location(self) -> str:
        """Where the queue lives, for log lines and the status page."""
        ...

    # --- lifecycle
    async def open(self) -> list[QueueEntry]:
        """Prepare the store (the file store: create the layout, discard what was never
        acknowledged, start listening for changes) and return what is queued."""
        ...

    async def close(self) -> None: ...

    # --- accepting mail
    async def commit(self, envelope: Envelope, content: Content) -> str:
        """Store a message durably and return its queue id: only then may the client get 250.
        Raises :class:`SpoolFullError` (452), :class:`SpoolWriteError` or
        :class:`SpoolUnavailableError` (451)."""
        ...

    # --- delivery
    async def checkout(self, queue_id: str) -> CheckOut:
        """Claim a queued message and load it, for one delivery attempt."""
        ...

    async def checkin(self, out: CheckOut, *, remove: bool = False) -> None:
        """End an attempt: with ``remove`` (delivered), forget the message first, as soon as
        it can (until then a crash means one more copy); then let go of its claim and close
        its content. Calling it again is harmless."""
        ...

    async def save_state(self, queue_id: str, state: DeliveryState, *, urgent: bool = False
                         ) -> None:
        """``urgent``: the state records recipients Exchange already took (a crash before it
        is saved sends to them again), so the store writes it ahead of other work."""
        ...
    async def fail(self, queue_id: str, reason: str) -> str:
        """Keep a permanently failed message aside with its reason; returns where, for logs."""
        ...

    # --- the queue commands
    async def claim(self, queue_id: str, *, held: bool = False, wait: float | None = None
                    ) -> Claim | None:
        """Exclusive for one holder; None when the message is not (or no longer) there or
        another node holds it. With ``wait``, :class:`SpoolBusyError` after that many seconds
        of another local holder."""
        ...

    async def unclaim(self, claim: Claim) -> None: ...
    async def load(self, queue_id: str, *, claim: Claim | None = None, held: bool = False
                   ) -> Message: ...
    async def read(self, queue_id: str, *, held: bool = False) -> bytes: ...
    async def remove(self, queue_id: str) -> None: ...
    async def hold(self, queue_id: str) -> None:
        """Queued → held (never delivered until released). Call it holding the claim."""
        ...

    async def release(self, queue_id: str) -> None:
        """Held → queued, due now. Call it holding the claim."""
        ...

    async def delete(self, queue_id: str, *, held: bool = False) -> None: ...

    # --- looking
    async def entries(self, *, quarantine: bool = True, mine: bool = False
                      ) -> list[QueueEntry]:
        """Queued messages, oldest first; ``quarantine=False`` for a look that must not move
        damaged entries aside; ``mine``: only those this relay schedules (a shared store's
        node; the file store has no others)."""
        ...

    async def held_entries(self) -> list[QueueEntry]: ...
    async def entry(self, queue_id: str, *, held: bool = False) -> QueueEntry | None: ...
    async def locate(self, queue_id: str) -> str | None:
        """"queue", "hold", "failed", "corrupt", or None."""
        ...

    async def is_claimed(self, queue_id: str, *, held: bool = False) -> bool: ...
    async def kept_aside(self) -> dict[str, int]:
        """How many messages are kept out of delivery: {"failed": n, "corrupt": n}."""
        ...

    async def free_space(self) -> int | None:
        """Bytes the store can still take (a filesystem's free space), None if unknown."""
        ...

    async def probe(self) -> str | None:
        """Whether a message could be accepted now (for /readyz): None, or the problem."""
        ...

    # --- change notification
    def changes(self) -> AsyncIterator[Change]:
        """Changes made outside this relay (the queue commands; for a shared store, the other
        nodes), in order, from :meth:`open` on."""
        ...

    async def announce(self, changes: Sequence[Change]) -> bool:
        """Tell the running relay(s) about changes made here; False if none listened."""
        ...

    async def relay_running(self) -> bool:
        """Whether a relay follows this store's changes now."""
        ...


class ClusterView(Protocol):
    """What a store shared by several relays adds (the PostgreSQL store): who shares it."""

    @property
    def node(self) -> str:
        """This relay's name (``spool.node``)."""
        ...

    async def nodes(self) -> list[NodeInfo]:
        """Every node that has used the store recently, this one included."""
        ...


class SharedLimits(Protocol):
    """Exchange's per-mailbox limits kept for every relay sharing a store
    (:mod:`relay.spool.pglimits`); a store that has them offers them as ``limits``."""

    async def acquire_slot(self, mailbox: str, limit: int) -> int | None: ...
    async def release_slot(self, mailbox: str, slot: int) -> None: ...
    async def wanted(self) -> dict[str, int]: ...
    async def admit(self, mailbox: str, per_minute: int, window: float = 60.0
                    ) -> tuple[float, int | None]: ...
    async def sent(self, send_id: int | None) -> None: ...
    async def recipients(self, mailbox: str, count: int) -> int | None: ...
    async def throttled(self, mailbox: str, reason: str) -> None: ...
