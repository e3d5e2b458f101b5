"""The message model every stage shares: the envelope, its delivery state, a queue entry, and
the content a transport sends. No I/O here: a stored message's bytes come in memory or through
the reader its store hands over (:class:`Message`), so senders do not depend on a file format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "READ_CHUNK",
    "Body",
    "BodyCheck",
    "Chunk",
    "Content",
    "DeliveryState",
    "Envelope",
    "Message",
    "QueueEntry",
    "content_parts",
    "content_size",
]

# A message as one buffer, or as its pieces in order (e.g. the rewritten header block and a view
# of the body as received), so a 30 MB message is never joined into a second copy.
Chunk: TypeAlias = bytes | bytearray | memoryview
Content: TypeAlias = bytes | Sequence[Chunk]


def content_parts(content: Content) -> Sequence[Chunk]:
    # One buffer of any kind is one part (a bytearray is also a sequence, of ints).
    return (content,) if isinstance(content, bytes | bytearray | memoryview) else content


def content_size(content: Content) -> int:
    return sum(memoryview(part).nbytes for part in content_parts(content))


# A large stored message is checked and sent in pieces of this size: memory stays at one piece.
READ_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Envelope:
    mail_from: str  # envelope sender to use upstream
    rcpt_tos: tuple[str, ...]
    account: str  # config account name
    app: str  # config app name
    mailbox: str  # mailbox to authenticate as upstream
    bounce_to: str  # where a DSN goes; "" = never send a DSN (null sender, or a DSN itself)
    client: str  # submitting client's IP, or "local"
    received_at: float  # unix time
    original_from: str = ""  # the MAIL FROM the client gave, before rewrite
    is_dsn: bool = False


@dataclass(frozen=True)
class DeliveryState:
    attempts: int = 0
    next_attempt_at: float = 0.0
    pending_rcpts: tuple[str, ...] | None = None  # None = all of envelope.rcpt_tos pending
    last_error: str = ""
    bounce_reason: str = ""  # set by `m365relay queue bounce`: bounce with this, don't send


@dataclass(frozen=True)
class QueueEntry:
    id: str
    envelope: Envelope
    state: DeliveryState
    size: int  # message bytes


class BodyCheck:
    """What sending needs to know about a message, learned in the pass that checks its hash:
    whether it has 8-bit bytes (SMTP then says BODY=8BITMIME) and whether every line ends in
    CRLF (what the listener stores; anything else is normalized before it goes out).

    Fed the message in order, in pieces of any size; a CR LF split between pieces counts."""

    __slots__ = ("_cr_end", "bare", "eightbit")

    def __init__(self) -> None:
        self.eightbit = False
        self.bare = False  # a CR or LF that is not part of a CR LF pair
        self._cr_end = False  # the last piece ended in CR; its pair may start the next

    def update(self, piece: bytes | bytearray) -> None:
        if not self.eightbit and not piece.isascii():
            self.eightbit = True
        if self.bare or not piece:
            return
        pairs = piece.count(b"\r\n")
        lone_lf = piece.count(b"\n") - pairs
        if self._cr_end:
            if piece[0] == 0x0A:
                lone_lf -= 1
            else:
                self.bare = True
        self._cr_end = piece[-1] == 0x0D
        if lone_lf or piece.count(b"\r") - pairs > self._cr_end:
            self.bare = True

    @property
    def clean(self) -> bool:
        """Every CR and LF seen so far is in a CR LF pair (call after the last piece)."""
        return not self.bare and not self._cr_end


class Message:
    """A stored message whose size and checksum matched what was committed.

    Small ones are in :attr:`data`; a large one stays where its store keeps it and is read in
    pieces with :meth:`read_at` (blocking: call it in a thread) while it is sent, through the
    reader the store gave it. Valid until :meth:`close`, or until the store's claim on it ends.
    """

    def __init__(self, size: int, check: BodyCheck, data: bytes | None, *,
                 reader: Callable[[int, int], bytes] | None = None,
                 closer: Callable[[], None] | None = None) -> None:
        if data is None and reader is None:
            raise ValueError("a message not in memory needs a reader")
        self.size = size
        self.eightbit = check.eightbit
        self.clean = check.clean  # every line ends in CRLF
        self.data = data
        self._reader = reader  # (start, length) -> exactly length bytes, or raises
        self._closer = closer

    def read_at(self, start: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``start``; fewer only at the end of the message."""
        length = max(0, min(length, self.size - start))
        if self.data is not None:
            return self.data[start:start + length]
        assert self._reader is not None  # noqa: S101 -- checked in __init__
        return self._reader(start, length)

    def read_all(self) -> bytes:
        return self.data if self.data is not None else self.read_at(0, self.size)

    def close(self) -> None:
        if self._closer is not None:
            self._closer()


# What a transport sends: in memory, or verified in the spool and read while it is sent.
Body: TypeAlias = Content | Message
