"""One mail transaction on an authenticated aiosmtplib connection, cheap per message.

aiosmtplib's ``sendmail`` waits for a round trip after MAIL, each RCPT and DATA, and copies the
message twice in memory (line-ending normalization, then dot-stuffing). Here:

* with PIPELINING (Exchange Online offers it), MAIL, every RCPT and DATA go out in one write
  and the replies are read in order (RFC 2920: DATA is the last command of the group);
  without it, one command at a time, as before;
* the message is dot-stuffed with one ``bytes.replace`` per piece: spooled mail already has
  CRLF line ends (the listener stores it so; anything else is normalized first);
* a large message is sent in pieces read from its spool file, waiting for the connection to
  take each piece (``drain``), so memory stays at a few pieces whatever the message's size.

Replies raise what ``sendmail`` raises for them (SMTPSenderRefused, SMTPRecipientsRefused,
SMTPDataError, SMTPServerDisconnected, timeouts), so relay/upstream/smtp.py maps them as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import Iterator, Sequence

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import SMTPProtocol

from relay.message import (
    READ_CHUNK,
    Body,
    BodyCheck,
    Chunk,
    Content,
    Message,
    content_parts,
    content_size,
)

__all__ = ["DotStuffer", "send_mail"]

PIECE = READ_CHUNK  # what is read, stuffed and written at a time
_ACCEPTED = frozenset({250, 251})
_CLOSING = 421  # the server closes the connection after saying it
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # CR/LF in an address would inject commands
_LINE_END = re.compile(rb"\r\n|\n|\r")


class DotStuffer:
    """Dot-stuffing (RFC 5321 4.5.2) of a message given in pieces, in order.

    One ``replace`` per piece; only a piece boundary inside CR LF "." needs more, and knowing
    how the previous piece ended is enough for that."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b"\r\n"  # the message starts at the beginning of a line

    def feed(self, piece: bytes) -> bytes:
        out = piece.replace(b"\r\n.", b"\r\n..")
        tail = self._tail
        if tail == b"\r\n" and piece[:1] == b".":
            out = b"." + out
        elif tail[-1:] == b"\r" and piece[:2] == b"\n.":
            out = out[:2] + b"." + out[2:]
        if piece:
            self._tail = (tail + piece[-2:])[-2:]
        return out

    def end(self) -> bytes:
        """The end-of-data mark, after a line break if the message did not end with one."""
        return b".\r\n" if self._tail == b"\r\n" else b"\r\n.\r\n"


async def send_mail(smtp: aiosmtplib.SMTP, sender: str, recipients: Sequence[str],
                    body: Body, *, timeout: float) -> tuple[dict[str, aiosmtplib.SMTPResponse],
                                                            str]:
    """Like ``smtp.sendmail``: returns the refused recipients (the rest were accepted) and the
    final reply's text. After a refusal the envelope is reset (RSET), as sendmail does."""
    try:
        return await _transaction(smtp, sender, recipients, body, timeout)
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
        if smtp.is_connected:
            with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
                await smtp.rset(timeout=timeout)
        raise


async def _transaction(smtp: aiosmtplib.SMTP, sender: str, recipients: Sequence[str],
                       body: Body, timeout: float
                       ) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    if isinstance(body, Message):
        size, eightbit, clean = body.size, body.eightbit, body.clean  # learned when verified
    elif content_size(body) <= PIECE:
        size, eightbit, clean = _shape(body)
    else:  # a large message in memory (passthrough): a scan of it is too long for the loop
        size, eightbit, clean = await asyncio.to_thread(_shape, body)
    if not clean:
        body = await asyncio.to_thread(_normalized, body)
        size = len(body)
    options = b""
    if smtp.supports_extension("size"):
        options += b" SIZE=%d" % size
    if eightbit and smtp.supports_extension("8bitmime"):
        options += b" BODY=8BITMIME"
    # Non-ASCII addresses (the listener offers SMTPUTF8, RFC 6531) go out as UTF-8 with the
    # SMTPUTF8 parameter; to a server without it they cannot go at all, which is permanent.
    utf8 = not (sender.isascii() and all(rcpt.isascii() for rcpt in recipients))
    if utf8:
        if not smtp.supports_extension("smtputf8"):
            raise aiosmtplib.SMTPSenderRefused(
                553, "5.6.7 the envelope has non-ASCII addresses and the server does not "
                     "offer SMTPUTF8 (RFC 6531)", sender)
        options += b" SMTPUTF8"
    commands = [_command(b"MAIL FROM:", sender, utf8) + options,
                *(_command(b"RCPT TO:", rcpt, utf8) for rcpt in recipients), b"DATA"]
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    if smtp.supports_extension("pipelining"):
        replies = await _pipelined(smtp, protocol, commands, timeout)
    else:
        replies = await _one_by_one(smtp, commands, timeout)
    try:
        refused = _verdict(sender, recipients, replies)
    except BaseException:
        if len(replies) == len(commands) and replies[-1].code == 354:
            # A server that said 354 with no one to deliver to would take whatever comes
            # next as the message: hang up rather than send an empty one.
            smtp.close()
        raise
    final = await _data(smtp, protocol, body, timeout)
    if final.code == _CLOSING:
        smtp.close()
    if final.code != 250:
        raise aiosmtplib.SMTPDataError(final.code, final.message)
    return refused, final.message


@functools.lru_cache(maxsize=1024)
def _command(verb: bytes, address: str, utf8: bool = False) -> bytes:
    # quote_address validates as sendmail does (email.utils.parseaddr: tens of microseconds;
    # a relay sends as a few mailboxes to a few recurring addresses, hence the cache); ASCII
    # as sendmail without SMTPUTF8, UTF-8 with it.
    quoted = quote_address(address).encode("utf-8" if utf8 else "ascii")
    if _CONTROL.search(quoted):
        raise ValueError("Command arg contains a prohibited control character")
    return verb + quoted


async def _pipelined(smtp: aiosmtplib.SMTP, protocol: SMTPProtocol, commands: list[bytes],
                     timeout: float) -> list[aiosmtplib.SMTPResponse]:
    """The whole group in one write (RFC 2920), then the replies in order; a 421 ends them."""
    protocol.write(b"\r\n".join(commands) + b"\r\n")
    replies = []
    try:
        for _ in commands:
            reply = await _reply(protocol, timeout)
            replies.append(reply)
            if reply.code == _CLOSING:
                smtp.close()
                break
    except BaseException:
        smtp.close()  # replies may still be on their way: never pair them with later commands
        raise
    return replies


async def _reply(protocol: SMTPProtocol, timeout: float) -> aiosmtplib.SMTPResponse:
    """The next reply of a pipelined group. aiosmtplib's protocol expects one reply per
    command sent, and two of its habits lose pipelined ones, worked around here:

    * it parses one reply per read from the socket; replies that arrived together wait in its
      buffer for a read that never comes, so they are taken from the buffer first;
    * data that arrives while a parsed reply waits to be picked up is dropped. On Python 3.11
      ``read_response(timeout=...)`` (``asyncio.wait_for``) picks it up one loop turn late, in
      which the next reply can arrive; awaited with no timeout of its own, the reply is taken
      before the loop reads the socket again.
    """
    buffered = protocol._read_response_from_buffer()
    if buffered is not None:
        return buffered
    try:
        async with asyncio.timeout(timeout):
            return await protocol.read_response(timeout=None)
    except TimeoutError:
        raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from None


async def _one_by_one(smtp: aiosmtplib.SMTP, commands: list[bytes], timeout: float
                      ) -> list[aiosmtplib.SMTPResponse]:
    """Without PIPELINING: stop where sendmail would (a refused MAIL, no recipient left)."""
    replies = []
    accepted = 0
    for n, command in enumerate(commands):
        if n == len(commands) - 1 and not accepted:
            break  # no one to send DATA for
        reply = await smtp.execute_command(command, timeout=timeout)  # closes after a 421
        replies.append(reply)
        if reply.code == _CLOSING or (n == 0 and reply.code != 250):
            break
        if 0 < n < len(commands) - 1 and reply.code in _ACCEPTED:
            accepted += 1
    return replies


def _verdict(sender: str, recipients: Sequence[str], replies: list[aiosmtplib.SMTPResponse]
             ) -> dict[str, aiosmtplib.SMTPResponse]:
    """Raises as sendmail does for the replies to MAIL, RCPT... and DATA; else the refused
    recipients. ``replies`` stops early at a 421 or where commands were not sent."""
    mail = replies[0]
    if mail.code != 250:
        raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, sender)
    refused = []
    for rcpt, reply in zip(recipients, replies[1:], strict=False):
        if reply.code == _CLOSING:
            # sendmail's next command would find the connection closed.
            raise aiosmtplib.SMTPServerDisconnected(
                f"Server closed the connection after RCPT: {reply.code} {reply.message}")
        if reply.code not in _ACCEPTED:
            refused.append(aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, rcpt))
    if len(refused) == len(recipients):
        raise aiosmtplib.SMTPRecipientsRefused(refused)
    data = replies[len(recipients) + 1]
    if data.code != 354:
        raise aiosmtplib.SMTPDataError(data.code, data.message)
    return {r.recipient: aiosmtplib.SMTPResponse(r.code, r.message) for r in refused}


async def _data(smtp: aiosmtplib.SMTP, protocol: SMTPProtocol, body: Body, timeout: float
                ) -> aiosmtplib.SMTPResponse:
    """The message after the 354, then the server's final reply."""
    stuffer = DotStuffer()
    if isinstance(body, Message) and body.data is None:
        return await _streamed(smtp, protocol, body, stuffer, timeout)
    data = body.data if isinstance(body, Message) else body
    parts = content_parts(data) if data is not None else ()
    if sum(memoryview(part).nbytes for part in parts) <= PIECE:
        # The usual small message: one write, one TLS record, and the reply read right away
        # (nothing is awaited in between, so an early reply cannot be missed).
        piece = parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)
        protocol.write(stuffer.feed(piece) + stuffer.end())
        try:
            return await _reply(protocol, timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            smtp.close()
            raise
    return await _streamed(smtp, protocol, parts, stuffer, timeout)


async def _streamed(smtp: aiosmtplib.SMTP, protocol: SMTPProtocol,
                    source: Message | Sequence[Chunk], stuffer: DotStuffer, timeout: float
                    ) -> aiosmtplib.SMTPResponse:
    """Piece by piece, waiting for the connection to take each one (so the TLS buffers stay
    small); no piece may wait longer than ``timeout``. The reply is awaited from the start: a
    server that refuses early (and hangs up) is still heard."""
    loop = asyncio.get_running_loop()
    final = asyncio.ensure_future(protocol.read_response(timeout=None))
    pieces = _Pieces(source)
    try:
        async with asyncio.timeout(None) as deadline:
            async for piece in pieces:
                if final.done():
                    # Answered before the end: whatever it does with the rest, the rest must
                    # not be read as commands. Hang up; the reply stands.
                    smtp.close()
                    return _early(await final)
                protocol.write(stuffer.feed(piece))
                deadline.reschedule(loop.time() + timeout)
                await protocol._drain_helper()  # FlowControlMixin's drain
            protocol.write(stuffer.end())
            deadline.reschedule(loop.time() + timeout)
            return await final
    except TimeoutError:
        smtp.close()
        raise aiosmtplib.SMTPTimeoutError("Timed out sending the message") from None
    except (aiosmtplib.SMTPException, OSError):
        smtp.close()
        if final.done() and not final.cancelled() and final.exception() is None:
            return _early(final.result())  # refused before the end, then hung up
        raise
    finally:
        await pieces.aclose()
        if not final.done():
            final.cancel()
            with contextlib.suppress(BaseException):
                await final
        elif not final.cancelled():
            final.exception()  # retrieved, so a lost connection's error is not logged


def _early(reply: aiosmtplib.SMTPResponse) -> aiosmtplib.SMTPResponse:
    """A reply that came before the end of the message: a refusal counts; an acceptance of a
    message not yet sent whole cannot, so it is treated as a lost connection (retry)."""
    if reply.code < 400:
        raise aiosmtplib.SMTPServerDisconnected(
            f"Server answered {reply.code} {reply.message} before the end of the message")
    return reply


class _Pieces:
    """The message in pieces of at most PIECE bytes; from the spool file, the next piece is
    read in a thread while the current one is being sent."""

    def __init__(self, source: Message | Sequence[Chunk]) -> None:
        self._memory: Iterator[bytes] | None = None
        self._file: Message | None = None
        if isinstance(source, Message):
            self._file = source
        else:
            self._memory = _pieces(source)
        self._pos = 0
        self._next: asyncio.Future[bytes] | None = None

    def __aiter__(self) -> _Pieces:
        return self

    async def __anext__(self) -> bytes:
        if self._memory is not None:
            try:
                return next(self._memory)
            except StopIteration:
                raise StopAsyncIteration from None
        message = self._file
        assert message is not None  # noqa: S101 - one of the two is set
        if self._pos >= message.size:
            raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        pending = self._next or loop.run_in_executor(None, message.read_at, self._pos, PIECE)
        self._next = None
        piece = await pending
        self._pos += len(piece)
        if self._pos < message.size:
            self._next = loop.run_in_executor(None, message.read_at, self._pos, PIECE)
        return piece

    async def aclose(self) -> None:
        # A read still running in a thread must finish before the claim's file may close.
        if self._next is not None:
            with contextlib.suppress(Exception):
                await self._next


def _pieces(parts: Sequence[Chunk]) -> Iterator[bytes]:
    """In-memory parts in pieces of at most PIECE bytes; a small bytes part as it is."""
    for part in parts:
        if isinstance(part, bytes) and len(part) <= PIECE:
            if part:
                yield part
            continue
        view = memoryview(part).cast("B")
        for start in range(0, view.nbytes, PIECE):
            yield bytes(view[start:start + PIECE])


def _shape(body: Content) -> tuple[int, bool, bool]:
    """(size, has 8-bit bytes, every line ends in CRLF)."""
    check = BodyCheck()
    size = 0
    for piece in _pieces(content_parts(body)):
        check.update(piece)
        size += len(piece)
    return size, check.eightbit, check.clean


def _normalized(body: Body) -> bytes:
    """CRLF line ends only, as aiosmtplib made them; for mail that did not come through the
    listener (which stores CRLF), so rarely that one whole copy does not matter."""
    if isinstance(body, Message):
        data = body.read_all()
    else:
        parts = content_parts(body)
        data = b"".join(parts) if len(parts) != 1 else bytes(parts[0])
    data = _LINE_END.sub(b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"
