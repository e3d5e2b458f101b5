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
* More ``RCPT`` than ``max_recipients``: each extra one is answered ``452 4.5.3`` and sent
  again by the client in another transaction (RFC 5321 4.5.3.1.10); as with Postfix's
  ``smtpd_recipient_overshoot_limit``, they do not count toward ``max_errors``, or a
  600-recipient list mail would be cut off with 421 after 20 of its extra recipients.
* A failed STARTTLS handshake (a printer offering only TLS 1.0 to a TLS 1.2 listener) is one
  warning line naming the cause, as Postfix logs it, instead of aiosmtpd's traceback labelled
  "SMTP session exception"; any other unexpected error answers ``451 4.3.0`` (the device keeps
  its message and tries again) instead of aiosmtpd's ``500 Error: (Exception) ...``, which
  devices take as final.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from typing import Any

from aiosmtpd.smtp import TLSSetupException, syntax

from relay.ingress.smtpbase import DataReader, FastSMTP
from relay.ingress.tls import version_hint

# The AUTH parameter of MAIL, after the address (the address itself has no white space).
_MAIL_AUTH_PARAM = re.compile(r"(?i)[ \t]+AUTH=\S*")
# OpenSSL's reasons when the two sides share no protocol version.
_VERSION_REASONS = frozenset({"UNSUPPORTED_PROTOCOL", "WRONG_VERSION_NUMBER", "VERSION_TOO_LOW",
                              "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE"})
UNEXPECTED_REPLY = "451 4.3.0 Error: local error in processing, try again later"
_OVER_RECIPIENTS = "452 4.5.3 Too many recipients"
_RECIPIENT_OVERSHOOT = 1000  # Postfix's smtpd_recipient_overshoot_limit default

log = logging.getLogger("m365relay.listener")


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
    _overshoot = 0  # recipients answered 452 for max_recipients in this session

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

    def counts_as_error(self, reply: str) -> bool:
        """Whether this reply counts toward the session's error limit."""
        if reply.startswith(_OVER_RECIPIENTS) and self._overshoot < _RECIPIENT_OVERSHOOT:
            self._overshoot += 1
            return False
        return reply[:1] in ("4", "5") and not reply.startswith("421")

    async def handle_exception(self, error: Exception) -> str:
        peer = self.session.peer if self.session is not None else None
        client = peer[0] if isinstance(peer, tuple) and peer else "?"
        if isinstance(error, TLSSetupException):
            cause = error.__cause__
            reason = getattr(cause, "reason", None) or str(cause or error) or "handshake failed"
            host = getattr(self, "relay_handler", None)  # RelaySMTP's: names the listener
            hint = (version_hint(host.listener) if host is not None
                    and reason in _VERSION_REASONS else "")
            log.warning("%s: STARTTLS handshake failed: %s%s", client, reason, hint)
            return "454 4.7.0 TLS not available"  # not sent: aiosmtpd hangs up after it
        if isinstance(error, ssl.SSLError | ConnectionError):
            log.info("%s: connection failed: %s", client, error)
        else:
            log.error("%s: unexpected error in the SMTP session (a bug: please report it); "
                      "answered %s", client, UNEXPECTED_REPLY[:9], exc_info=error)
        return UNEXPECTED_REPLY

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
        if transport is None:
            return True
        if transport.is_closing():
            # Closed by us already (QUIT answered) when the peer's EOF arrives: a closed TLS
            # transport cannot even be asked whether it is one (AttributeError in asyncio).
            return False
        # A TLS transport cannot stay half-open (returning True only warns): connection_lost
        # follows, and keeps a message being read (below).
        return transport.get_extra_info("ssl_object") is None

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
