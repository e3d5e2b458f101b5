"""The SMTP dialogue of the fake smtp.office365.com, on aiosmtpd: EHLO as Exchange offers it,
STARTTLS before AUTH, AUTH XOAUTH2 checked against FakeEntra's signed tokens, the per-mailbox
connection limit, SendAs at the end of DATA and Exchange's reply texts. Each session asks
:class:`relay.sandbox.exchangestate.ExchangeState` for injected faults and records there."""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import email.utils
import logging
import re
import ssl
import time
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from relay.sandbox.exchangestate import ExchangeState, Grant
from relay.sandbox.rules import (
    ADVERTISED_SIZE,
    TOO_BIG,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_RECIPIENTS,
)
from relay.sandbox.tokens import TokenError

log = logging.getLogger("m365relay.sandbox.exchange")

HOSTNAME = "SANDBOX.outlook.example"
SIZE_LIMIT = ADVERTISED_SIZE  # what smtp.office365.com advertises
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.3 Authentication unsuccessful [SANDBOX]"
BASIC_AUTH_DISABLED = ("535 5.7.139 Authentication unsuccessful, basic authentication is "
                       "disabled. [SANDBOX]")
NOT_AUTHENTICATED = "530 5.7.57 Client not authenticated to send mail."


def _header_from(data: bytes) -> str:
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    match = re.search(r"^From:(.*(?:\r\n[ \t].*)*)", head, re.IGNORECASE | re.MULTILINE)
    return email.utils.parseaddr(match.group(1))[1] if match else ""


_XOAUTH2 = re.compile(r"user=([^\x01]+)\x01auth=Bearer ([^\x01 ]+)\x01\x01")


def parse_xoauth2(blob: bytes) -> tuple[str, str]:
    """(user, token) from ``user=U^Aauth=Bearer T^A^A``, exactly the format Microsoft
    documents (MICROSOFT365.md §2); ValueError for anything else."""
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("XOAUTH2 response is not UTF-8") from exc
    match = _XOAUTH2.fullmatch(text)
    if match is None:
        raise ValueError("XOAUTH2 response is not 'user=<mailbox>^Aauth=Bearer <token>^A^A'")
    return match.group(1), match.group(2)


class _QuietSession(Session):
    """aiosmtpd's own smtp_AUTH sets the deprecated login_data, logging a WARNING per login."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class ExchangeSession(SMTP):
    # App tokens make AUTH lines several KB, and devices send long body lines; Exchange
    # takes both, stock aiosmtpd answers "500 Command line too long".
    line_length_limit = 1 << 20
    command_size_limit = 1 << 16
    command_size_limits: dict[str, int] = collections.defaultdict(lambda: 1 << 16)
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, exchange: ExchangeState, tls: ssl.SSLContext,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.exchange = exchange
        self.connection_id = 0
        self._drop_next_reply = False
        self._auth_refusal: str | None = None
        self._wire: bytearray | None = None
        self.answering = 0  # seq of the message whose 250 is the next reply
        super().__init__(
            _ExchangeHandler(exchange),
            hostname=HOSTNAME,
            ident=f"Microsoft ESMTP MAIL Service ready at {format_datetime(datetime.now(UTC))}",
            tls_context=tls,
            data_size_limit=SIZE_LIMIT,
            enable_SMTPUTF8=True,
            auth_exclude_mechanism=["PLAIN"],
            authenticator=self._refuse_basic_auth,
            loop=loop,
        )

    def _create_session(self) -> Session:
        return _QuietSession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # STARTTLS calls this again for the TLS layer
        super().connection_made(transport)
        if first:
            self.connection_id = self.exchange._opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.exchange._closed(self)
        super().connection_lost(error)

    def hang_up(self) -> asyncio.Task[None] | None:
        """Abort the connection now (no TLS goodbye); returns the session task to await."""
        if isinstance(self.transport, asyncio.Transport):
            self.transport.abort()
        elif self.transport is not None:
            self.transport.close()
        # Aborting a TLS layer whose handshake the server has not finished never reaches
        # connection_lost (asyncio sslproto), so end the session task ourselves.
        self.exchange._closed(self)
        task = self._handler_coroutine
        if task is not None:
            task.cancel()
        return task

    async def _handle_client(self) -> None:
        reply = self.exchange._take("connect")
        if reply is None:
            await super()._handle_client()
            return
        await self.push(reply)  # instead of the banner
        if self.transport is not None:
            self.transport.close()

    async def push(self, status: AnyStr) -> None:
        if self._drop_next_reply:
            self._drop_next_reply = False
            self.hang_up()
            return
        if self.exchange.record_wire and status[:3] in ("354", b"354"):
            self._wire = bytearray()  # the client sends DATA content only after this reply
        await super().push(status)
        if self.answering and status[:1] in ("2", b"2"):
            self.exchange.answered_at[self.answering] = time.monotonic()
        self.answering = 0
        closing = status.startswith("421") if isinstance(status, str) \
            else status.startswith(b"421")
        if closing and self.transport is not None:
            self.transport.close()

    def _session(self) -> Session:
        if self.session is None:  # aiosmtpd sets it in connection_made, before any command
            raise RuntimeError("SMTP command before the connection was set up")
        return self.session

    def data_received(self, data: bytes) -> None:
        if self._wire is not None:
            self._wire += data
        elif data.startswith(b"MAIL FROM:") and data.endswith(b"\r\nDATA\r\n"):
            self.exchange.pipelined += 1
        super().data_received(data)

    def take_wire(self) -> bytes | None:
        wire, self._wire = self._wire, None
        return bytes(wire) if wire is not None else None

    def drop_instead_of_next_reply(self) -> None:
        self._drop_next_reply = True

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Invalid domain name")
            return
        injected = self.exchange._take("ehlo")
        if injected is not None and not injected.startswith("2"):
            await self.push(injected)
            return
        self.envelope = self._create_envelope()
        session = self._session()
        session.extended_smtp = True
        session.host_name = hostname
        if injected is not None:
            await self.push(injected)
            return
        peer = session.peer[0] if session.peer else "unknown"
        # As Exchange: AUTH only appears once the channel is encrypted.
        security = "STARTTLS" if self._tls_protocol is None else "AUTH LOGIN XOAUTH2"
        lines = [f"{self.hostname} Hello [{peer}]", f"SIZE {SIZE_LIMIT}",
                 *(["PIPELINING"] if self.exchange.pipelining else []),
                 "ENHANCEDSTATUSCODES", security, "8BITMIME", "SMTPUTF8"]
        await self.push("\r\n".join(
            f"250{' ' if i == len(lines) - 1 else '-'}{line}" for i, line in enumerate(lines)))

    async def smtp_AUTH(self, arg: str) -> None:
        session = self._session()
        self.exchange.auth_attempts += 1
        if self._tls_protocol is None:
            self.exchange._auth_failed("AUTH before STARTTLS")
            await self.push("504 5.7.4 Unrecognized authentication type")
            return
        injected = self.exchange._take("auth")
        if injected is not None:
            self.exchange._auth_failed(f"injected reply {injected!r}")
            await self.push(injected)
            return
        already = bool(session.authenticated)
        self._auth_refusal = None
        await super().smtp_AUTH(arg)
        if already or not session.authenticated:
            self.exchange._auth_failed(self._auth_refusal or f"AUTH {arg!r} refused")
        elif isinstance(session.auth_data, Grant):
            self.exchange._signed_in_as(self, session.auth_data.user)

    async def auth_XOAUTH2(self, _server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob: Any = await self.challenge_auth("")  # the two-step form: "334 " first
            if not isinstance(blob, bytes):  # client sent "*" or bad base64; already answered
                self._auth_refusal = "XOAUTH2 aborted or not base64"
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                self._auth_refusal = "XOAUTH2 initial response is not base64"
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        try:
            user, token = parse_xoauth2(blob)
            claims, app = self.exchange.entra.check_token(token)
        except (ValueError, TokenError) as exc:
            return self._refuse(str(exc))
        if "scp" in claims:  # a delegated token sends only as the person who signed in
            if user.casefold() != str(claims.get("upn", "")).casefold():
                return self._refuse(f"user={user} but the token was issued to {claims.get('upn')}")
        elif not app.may_use(user):
            return self._refuse(f"app {app.client_id} has no FullAccess on mailbox {user}")
        return AuthResult(success=True, message=AUTH_OK,
                          auth_data=Grant(user, str(claims["appid"])))

    def _refuse(self, reason: str) -> AuthResult:
        self._auth_refusal = reason
        return AuthResult(success=False, handled=False, message=AUTH_FAILED)

    def _refuse_basic_auth(self, server: SMTP, session: Session, envelope: Envelope,
                           mechanism: str, auth_data: Any) -> AuthResult:
        self._auth_refusal = f"basic authentication (AUTH {mechanism}) is disabled"
        return AuthResult(success=False, handled=False, message=BASIC_AUTH_DISABLED)

    async def smtp_MAIL(self, arg: str | None) -> None:
        session = self._session()
        if not session.authenticated:
            await self.push(NOT_AUTHENTICATED)
            return
        grant = session.auth_data
        if isinstance(grant, Grant) and not self.exchange._may_submit(self, grant.user):
            # A fourth concurrent connection of one mailbox (MICROSOFT365.md §3).
            await self.push(self.exchange._limit_refused(TOO_MANY_CONNECTIONS))
            return
        await super().smtp_MAIL(arg)


class _ExchangeHandler:
    """aiosmtpd hooks: Exchange's reply texts, injections, SendAs, and recording."""

    def __init__(self, exchange: ExchangeState) -> None:
        self.exchange = exchange

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        await self.exchange._pause("mail")
        injected = self.exchange._take("mail")
        if injected is not None and not injected.startswith("2"):
            return injected
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return injected or "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        await self.exchange._pause("rcpt")
        injected = self.exchange._take("rcpt", address)
        if injected is not None and not injected.startswith("2"):
            return injected
        limit = self.exchange.limits.recipients_per_message
        if limit > 0 and len(envelope.rcpt_tos) >= limit:
            return self.exchange._limit_refused(TOO_MANY_RECIPIENTS)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return injected or "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: ExchangeSession, session: Session,
                          envelope: Envelope) -> str:
        await self.exchange._pause("data")
        if self.exchange._take("drop_after_data") is not None:
            server.drop_instead_of_next_reply()
            return "451 4.4.2 never sent"
        grant = session.auth_data
        if not isinstance(grant, Grant):  # cannot happen: MAIL needs a successful AUTH
            return NOT_AUTHENTICATED
        # Exchange checks the sender against the signed-in mailbox and its SendAs grants
        # (Add-RecipientPermission): the envelope, and the From header unless told not to.
        granted = {grant.user.casefold(), *(a.casefold() for a in
                                            self.exchange.send_as.get(grant.user.casefold(), ()))}
        senders = [envelope.mail_from or ""]
        if self.exchange.check_from_header:
            senders.append(_header_from(envelope.original_content or b"") or grant.user)
        denied = next((s for s in senders if s.casefold() not in granted), None)
        if denied is not None:
            return (f"554 5.2.252 SendAsDenied; {grant.user} not allowed to send as "
                    f"{denied}; STOREDRV.Submission.Exception:SendAsDeniedException."
                    "MapiExceptionSendAsDenied")
        size_limit = self.exchange.limits.max_send_size
        if size_limit > 0 and len(envelope.original_content or b"") > size_limit:
            return self.exchange._limit_refused(TOO_BIG)  # the mailbox's MaxSendSize
        refused = self.exchange._over_limits(grant.user, len(envelope.rcpt_tos))
        if refused is not None:
            return refused
        injected = self.exchange._take("data")
        if injected is not None and not injected.startswith("2"):
            return injected
        recorded = await self.exchange._record(envelope, grant, server.connection_id,
                                               server.take_wire())
        server.answering = recorded.seq
        internal_id = 10_000_000_000_000 + recorded.seq
        return injected or (
            f"250 2.6.0 <{uuid.uuid4().hex.upper()}@{HOSTNAME}> [InternalId={internal_id}, "
            f"Hostname={HOSTNAME}] Queued mail for delivery")

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Resetting"

    async def handle_NOOP(self, server: SMTP, session: Session, envelope: Envelope,
                          arg: str) -> str:
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "221 2.0.0 Service closing transmission channel"
