"""What real devices send that aiosmtpd 1.4.6 refuses, accepted as Postfix accepts it.

Each case is one a printer, scanner or old application was seen to send; the strict answer
loses its mail (the device shows "send failed" or gives up for good). The table of device
behaviours in the README lists them with the Postfix setting each follows; every one has a raw
transcript in ``tests/test_devices.py``.

* No HELO/EHLO at all before MAIL or AUTH, and none again after STARTTLS: Postfix's default
  ``smtpd_helo_required = no`` (aiosmtpd: ``503 Error: send HELO first``). AUTH after HELO or
  with no greeting (aiosmtpd: ``500 Error: command 'AUTH' not recognized``).
* ``auth login``: the mechanism in lower case (SASL names are case-insensitive, RFC 4422 3.1).
* ``AUTH PLAIN =`` / ``AUTH LOGIN =``: a zero-length initial response (RFC 4954 4) is asked
  for again, as if none was given, instead of ``501 Can't decode base64``.
* ``MAIL FROM:<x> AUTH=<>``: the AUTH parameter (RFC 4954 5) is accepted and ignored
  (aiosmtpd: ``555 MAIL FROM parameters not recognized``).
* A client that hangs up (or half-closes) right after the final dot, or pipelines QUIT after
  it and closes: aiosmtpd cancelled the session at EOF and dropped what was still buffered, a
  complete message included. Now the session reads its input to the end first, as Postfix
  does: a message whose final dot arrived is taken and delivered; one cut short is not.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiosmtpd.smtp import syntax

from relay.ingress.smtpbase import DataReader, FastSMTP

# The AUTH parameter of MAIL, after the address (the address itself has no white space).
_MAIL_AUTH_PARAM = re.compile(r"(?i)[ \t]+AUTH=\S*")


class EndOfInput(asyncio.CancelledError):
    """The client has closed its side and everything it sent has been read: the session ends
    as aiosmtpd ends one whose connection was lost (a CancelledError, not an error reply)."""


class DrainingReader(DataReader):
    """Hands out what is buffered after EOF, then ends the session (not a ``500`` loop:
    aiosmtpd's command loop would answer IncompleteReadError with an error reply forever)."""

    async def readuntil(self, separator: Any = b"\n") -> bytes:
        try:
            return await super().readuntil(separator)
        except asyncio.IncompleteReadError as exc:
            raise EndOfInput from exc


class CompatSMTP(FastSMTP):
    """aiosmtpd's session with the device quirks above accepted."""

    reader_class = DrainingReader
    _gone = False  # the connection is lost; its buffered input is still being read

    async def push(self, status: Any) -> None:
        try:
            await super().push(status)
        except ConnectionResetError:
            if not self._gone:  # (a reply under way when the connection was lost)
                raise

    def reading_message(self) -> bool:
        """True from DATA's 354 until the reply to the message (RelaySMTP knows)."""
        return False

    async def check_helo_needed(self, helo: str = "HELO") -> bool:
        return False  # smtpd_helo_required = no

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        session = self.session
        if session is not None and not session.extended_smtp:
            # HELO only, or no greeting (also: none again after STARTTLS): Postfix offers AUTH
            # whatever the greeting; aiosmtpd would answer 500.
            session.extended_smtp = True
        if arg:
            mechanism, space, rest = arg.partition(" ")
            rest = rest.strip()
            if rest == "=":  # a zero-length initial response: ask, as with none
                space, rest = "", ""
            arg = mechanism.upper() + (space + rest if rest else "")
        await super().smtp_AUTH(arg)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if arg:
            arg = _MAIL_AUTH_PARAM.sub("", arg)
        await super().smtp_MAIL(arg)

    # -- end of input --------------------------------------------------------------------

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session here, dropping the input still buffered. Instead the
        # reader gets its EOF and the session ends once it has read everything (DrainingReader).
        self._lines_reader.feed_eof()
        transport = self.transport
        # A TLS transport cannot stay half-open (returning True only warns): connection_lost
        # follows, and keeps a message being read (below).
        return transport is None or transport.get_extra_info("ssl_object") is None

    def connection_lost(self, error: Exception | None) -> None:
        if not (self.reading_message() or self._lines_reader.buffered()):
            super().connection_lost(error)
            return
        # Gone mid-message, or with commands still buffered (a client that wrote MAIL ... DATA,
        # the message and QUIT at once and closed): what it sent is read to the end, as Postfix
        # reads its input buffer before it notices the close, so a message whose final dot
        # arrived is taken. Replies go nowhere (push() sees the closed transport); the session
        # ends at the end of its input instead of being cancelled now.
        task, transport = self._handler_coroutine, self.transport
        self._gone = True
        self._handler_coroutine = _NotCancelled(task)  # type: ignore[assignment]
        try:
            super().connection_lost(None)  # None: an EOF for the reader, not a reset error
        finally:
            self._handler_coroutine, self.transport = task, transport
        self._lines_reader.feed_eof()


class _NotCancelled:
    """Stands in for the session task while aiosmtpd's connection_lost runs, so that its
    ``cancel()`` does not interrupt a message still being read from the buffer."""

    def __init__(self, task: Any) -> None:
        self.task = task

    def cancel(self, msg: Any = None) -> bool:
        return False
