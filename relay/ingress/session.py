"""One SMTP session with a device: aiosmtpd's protocol with the relay's limits.

On top of aiosmtpd 1.4.6 (which already ends DATA only at ``<CR><LF>.<CR><LF>`` and drops
commands pipelined after ``STARTTLS``), set up cheaply by :class:`relay.ingress.smtpbase.FastSMTP`:

* admission at connect: the listener's ``networks``, then connection slots (``421 4.7.0``);
* one watchdog timer for the idle command timeout, the DATA idle and total timeouts and the
  session cap; an expiry answers ``421 4.4.2`` and hangs up;
* DATA read by :class:`~relay.ingress.data.DataAssembler` (bare CR/LF, line and size limits),
  every complete line already received at once, and handed to the DATA hook without a copy;
* junk-command and error limits (Postfix's ``smtpd_junk_command_limit`` and
  ``smtpd_hard_error_limit``), reset whenever a message is accepted;
* AUTH PLAIN/LOGIN checked off the loop, a few at a time, with per-session, per-address and
  per-user failure limits: the base class, :class:`relay.ingress.smtpauth.AuthSMTP`.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, AnyStr, Protocol

from aiosmtpd.smtp import syntax

from relay.config.records import Account
from relay.ingress.data import DataAssembler
from relay.ingress.peers import in_networks, peer_ip
from relay.ingress.smtpauth import AuthHost, AuthSMTP

if TYPE_CHECKING:
    from relay.config.records import Listener
    from relay.ingress.limits import ConnectionSlots

log = logging.getLogger("m365relay.listener")

# Postfix counts these as junk (smtpd_junk_command_limit); a NOOP or RSET loop holds a slot.
_JUNK = ("NOOP", "RSET", "VRFY", "EXPN", "HELP", "EHLO", "HELO")
_SIZE_REFUSED = "552 Error: message size exceeds"  # aiosmtpd's reply to MAIL ... SIZE=
_BOGUS_LIMIT = "502 5.5.1 Too many unrecognized commands"  # aiosmtpd hangs up after it
# A real client answers the banner within milliseconds. At a connection limit, one silent for
# a second after it is a flood socket or a dead client, and gives its slot to a newcomer.
_SILENT_GRACE = 1.0


class SessionHost(AuthHost, Protocol):
    """What a session needs from the listener that accepted it (relay.ingress.listener's
    RelayHandler): a protocol, so that the session does not import its listener back. AUTH's
    part (config, guard, quiet, login_failed) is :class:`relay.ingress.smtpauth.AuthHost`."""

    listener: Listener
    hostname: str
    sessions: set[RelaySMTP]
    slots: ConnectionSlots

    def admit(self, session: RelaySMTP, address: Any) -> str | None: ...
    def session_changed(self) -> None:
        """A session ended or finished a transaction (a draining shutdown waits for that)."""
        ...


class RelaySMTP(AuthSMTP):
    """One SMTP session."""

    relay_handler: SessionHost

    def __init__(self, handler: SessionHost, *, implicit_tls: bool = False,
                 tls_context: ssl.SSLContext | None = None) -> None:
        listener = handler.listener
        # Read by FastSMTP.__init__ to size the stream buffer, so it must be set first: the longest
        # line, its CRLF and a dot-stuffing dot.
        self.line_length_limit = listener.max_line_length + 3
        # Before aiosmtpd's __init__, which already resets the transaction state (below).
        self.relay_handler = handler
        super().__init__(handler, **self.session_options(handler, tls_context))
        self.implicit_tls = implicit_tls
        self.account: Account | None = None       # authenticated account
        self.mail_account: Account | None = None  # account of the current transaction
        self.client = "?"
        self.address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        self._admitted = False
        self._holds_slot = False
        self._session_deadline = math.inf
        self._idle_deadline = math.inf
        self._data_deadline: float | None = None  # set while DATA content arrives
        self._last_rx = 0.0
        self.last_command = 0.0
        self.talked = False  # a valid command arrived (not just the connection)
        self._busy = False  # the DATA hook is spooling: let it answer before any timeout
        self._junk = 0
        self._errors = 0
        self._auth_failures = 0
        self._close_after_reply = False
        self._unlogged_connect = ""  # a loopback connection's listener, until its first command
        self.message: DataAssembler | None = None  # the DATA hook's message

    @staticmethod
    def session_options(handler: SessionHost, tls_context: ssl.SSLContext | None
                        ) -> dict[str, Any]:
        """The session's aiosmtpd options."""
        listener = handler.listener
        return {"hostname": handler.hostname, "data_size_limit": listener.max_message_size,
                "enable_SMTPUTF8": True, "decode_data": False, "ident": "m365relay",
                "timeout": listener.idle_timeout, "require_starttls": listener.require_tls,
                "tls_context": tls_context}

    # -- connection ----------------------------------------------------------------------

    @property
    def is_tls(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    def reading_message(self) -> bool:
        return self._data_deadline is not None or self._busy

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # the TLS transport after STARTTLS: same session
            super().connection_made(transport)
            self.account = None  # STARTTLS resets the session (RFC 3207 4.2)
            self._log_tls(transport)
            return
        handler = self.relay_handler
        self.address = address = peer_ip(transport.get_extra_info("peername"))
        self.client = str(address) if address is not None else "?"
        refusal = handler.admit(self, address)
        if refusal is not None:
            # Answered here, before aiosmtpd builds a session and a task: a flood of refused
            # connections costs one write and one close each.
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(refusal.encode() + b"\r\n")
            transport.close()
            return
        self._admitted = self._holds_slot = True
        listener = handler.listener
        self._session_deadline = self.loop.time() + listener.session_timeout
        super().connection_made(transport)
        handler.sessions.add(self)
        # AUTH in clear only where the admin listed the network; implicit TLS is TLS
        # although aiosmtpd does not know it (it would then never offer AUTH).
        self._auth_require_tls = not (
            self.implicit_tls or in_networks(address, listener.cleartext_auth_networks))
        if address is not None and address.is_loopback:
            # Docker's HEALTHCHECK connects every few seconds and only says QUIT: its line
            # waits for the first command and goes to DEBUG then (see data_received).
            self._unlogged_connect = listener.name
        else:
            log.info("connect from %s on %s", self.client, listener.name)
        if self.implicit_tls:
            self._log_tls(transport)

    def _log_tls(self, transport: asyncio.BaseTransport) -> None:
        """Which TLS each device speaks, as Postfix logs it (smtpd_tls_loglevel 1): what an
        admin reads before raising ``min_tls_version``."""
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return
        version = ssl_object.version() or "?"
        cipher = (ssl_object.cipher() or ("?",))[0]
        old = "" if version in ("TLSv1.2", "TLSv1.3") else (
            f" (older than TLS 1.2: allowed by listeners[{self.relay_handler.listener.name}]"
            ".min_tls_version)")
        log.info("%s: TLS connection established: %s with cipher %s%s", self.client, version,
                 cipher, old)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted:
            return
        if self._unlogged_connect:
            log.debug("connect from %s on %s (no command)", self.client, self._unlogged_connect)
            self._unlogged_connect = ""
        super().connection_lost(error)
        self.release_slot()
        self.relay_handler.sessions.discard(self)
        self.relay_handler.session_changed()

    def data_received(self, data: bytes) -> None:
        self._last_rx = self.loop.time()
        if self._unlogged_connect:
            probe = data[:4].upper() == b"QUIT"  # `m365relay healthcheck`, monitoring
            log.log(logging.DEBUG if probe else logging.INFO, "connect from %s on %s",
                    self.client, self._unlogged_connect)
            self._unlogged_connect = ""
        super().data_received(data)

    def release_slot(self) -> None:
        if self._holds_slot:
            self._holds_slot = False
            self.relay_handler.slots.give_back(self.client)

    def hang_up(self, reply: str) -> None:
        """Send a last ``421`` and close (from timers and other sessions, not from a command)."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(reply.encode() + b"\r\n")
            transport.close()

    def close_for_shutdown(self) -> None:
        """Tell the client we are going away (it keeps its message and retries) and hang up."""
        self.hang_up("421 4.3.2 Service shutting down, try again later")

    def reclaimable(self, now: float, idle: float) -> bool:
        if self.in_transaction or self._busy or self._data_deadline is not None:
            return False
        return now - self.last_command >= (idle if self.talked else min(idle, _SILENT_GRACE))

    # -- timeouts ------------------------------------------------------------------------

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd calls this at connect and for every valid command.
        now = self.loop.time()
        self.talked = self.last_command > 0  # the first call is for the connection itself
        self.last_command = now
        self._idle_deadline = now + (duration or self._timeout_duration)
        self._arm()

    def _deadline(self) -> tuple[float, str]:
        due = [(self._session_deadline, "session")]
        if self._data_deadline is None:
            due.append((self._idle_deadline, "idle"))
        else:
            listener = self.relay_handler.listener
            due += [(self._data_deadline, "data"),
                    (self._last_rx + listener.data_idle_timeout, "data_idle")]
        return min(due)

    def _arm(self) -> None:
        due = self._deadline()[0]
        handle = self._timeout_handle
        if handle is not None:
            if not handle.cancelled() and handle.when() <= due:
                return  # it fires no later than needed and looks again: no new timer per command
            handle.cancel()
        self._timeout_handle = self.loop.call_at(due, self._timeout_cb)

    def _timeout_cb(self) -> None:
        # One timer for every limit; it fires at the earliest and looks again, so DATA
        # progress costs a timestamp per packet, not a timer reset.
        due, why = self._deadline()
        now = self.loop.time()
        if now < due or self._busy:
            self._timeout_handle = self.loop.call_at(due if now < due else now + 0.5,
                                                     self._timeout_cb)
            return
        listener = self.relay_handler.listener
        reason = {
            "idle": f"no command for {listener.idle_timeout:g}s",
            "data_idle": f"no message data for {listener.data_idle_timeout:g}s",
            "data": f"message data took longer than {listener.data_timeout:g}s",
            "session": f"session longer than {listener.session_timeout:g}s, reconnect",
        }[why]
        log.info("%s: closing: %s (listeners[%s].%s)", self.client, reason, listener.name,
                 {"idle": "idle_timeout", "data_idle": "data_idle_timeout",
                  "data": "data_timeout", "session": "session_timeout"}[why])
        self.hang_up(f"421 4.4.2 {self.hostname} Error: timeout exceeded ({reason})")

    # -- replies and command limits ------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # after our 421, pipelined commands still in the buffer get no answer
        text = status if isinstance(status, str) else status.decode("ascii", "replace")
        replaced: str | None = None
        if text.startswith(_SIZE_REFUSED):
            replaced = text = self._too_big()
        elif text.startswith(_BOGUS_LIMIT):  # every hang-up of ours says 421
            replaced = text = "421 4.7.0 Too many unrecognized commands, closing"
        if self.counts_as_error(text):
            self._errors += 1
            listener = self.relay_handler.listener
            if self._errors > listener.max_errors:
                log.warning("%s: more than %d errors, closing (listeners[%s].max_errors)",
                            self.client, listener.max_errors, listener.name)
                replaced = text = ("421 4.7.0 Too many errors in this session, closing; "
                                   "fix the client and reconnect")
        if replaced is None:
            await super().push(status)
        else:
            await super().push(replaced)
        if (text.startswith("421") or self._close_after_reply) and self.transport is not None:
            self._close_after_reply = False
            self.transport.close()

    @classmethod
    def _command(cls, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        if name.replace("smtp_", "") not in _JUNK:
            return func

        @functools.wraps(func)
        async def counted(self: RelaySMTP, arg: str) -> None:
            self._junk += 1
            listener = self.relay_handler.listener
            if self._junk > listener.max_junk_commands:
                log.warning("%s: more than %d NOOP/RSET/VRFY/HELP/EHLO without mail, closing "
                            "(listeners[%s].max_junk_commands)", self.client,
                            listener.max_junk_commands, listener.name)
                await self.push("421 4.7.0 Too many NOOP, RSET, VRFY, HELP or EHLO commands "
                                "without sending mail, closing")
                return
            await func(self, arg)
        return counted

    def _too_big(self) -> str:
        limit = self.relay_handler.listener.max_message_size
        return (f"552 5.3.4 Message too big for this relay (limit {limit} bytes, "
                "listeners[].max_message_size)")

    # -- DATA ----------------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None  # noqa: S101 - aiosmtpd sets it at connect
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        listener = self.relay_handler.listener
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data = DataAssembler(max_size=listener.max_message_size,
                             max_line=listener.max_line_length,
                             normalize=listener.bare_line_endings == "normalize")
        self._last_rx = self.loop.time()
        self._data_deadline = self._last_rx + listener.data_timeout
        self._arm()
        reader = self._lines_reader
        try:
            while True:
                # Every complete line already received in one go; a partial line (the
                # buffer's end, or one longer than the buffer) with readuntil as it comes.
                lines = reader.take_lines()
                if lines:
                    if data.feed_lines(lines):
                        break
                elif data.feed(await self._read_segment()):
                    break
        finally:
            self._data_deadline = None
        self._reset_timeout()
        reply = self._refusal(data)
        if reply is None:
            # The hook reads the content where it was assembled (no copy; see
            # RelayHandler.handle_DATA), and nothing keeps it once the hook has answered.
            self.message = data
            self._busy = True
            try:
                reply = str(await self._call_handler_hook("DATA"))
            finally:
                self._busy = False
                self.message = None
            if reply.startswith("250"):
                self._junk = self._errors = 0
        else:
            log.info("%s: message refused: %s", self.client, reply)
        del data
        self._set_post_data_state()
        await self.push(reply)

    async def _read_segment(self) -> bytes:
        try:
            return await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            # A line longer than the buffer: take it in pieces; the assembler measures it.
            return await self._reader.read(exc.consumed)

    def _refusal(self, data: DataAssembler) -> str | None:
        listener = self.relay_handler.listener
        if data.too_big:
            return self._too_big()
        if data.too_long:
            return (f"500 5.5.2 Line too long (limit {listener.max_line_length} bytes; raise "
                    "listeners[].max_line_length)")
        if data.bare and not data.normalize:
            return ("550 5.5.2 Message refused: bare CR or LF line ending, only CRLF is "
                    "allowed (listeners[].bare_line_endings: reject)")
        return None

    def _set_rset_state(self) -> None:
        super()._set_rset_state()  # type: ignore[no-untyped-call]
        self.mail_account = None

    def _set_post_data_state(self) -> None:
        super()._set_post_data_state()  # type: ignore[no-untyped-call]
        self.mail_account = None
        # aiosmtpd calls this right before pushing the DATA reply; a draining shutdown waits
        # for it so a client mid-DATA still gets its answer.
        self.relay_handler.session_changed()
