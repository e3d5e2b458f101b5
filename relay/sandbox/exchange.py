"""FakeExchange: smtp.office365.com's submission dialogue, on aiosmtpd, in the running loop.

It speaks the parts of Exchange Online a relay depends on: STARTTLS before AUTH, AUTH
XOAUTH2 checked against FakeEntra's signed tokens, SendAs enforcement at the end of DATA,
and Exchange's reply texts. It records every accepted message and can be told to fail any
stage, so tests assert on what the relay really sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import email.utils
import json
import logging
import re
import ssl
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from relay.sandbox.entra import FakeEntra
from relay.sandbox.rules import (
    ADVERTISED_SIZE,
    DAILY_QUOTA,
    MICROSOFT,
    THROTTLED,
    TOO_BIG,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_RECIPIENTS,
    MailboxLimits,
    MailboxMeter,
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
STAGES = frozenset({"connect", "ehlo", "auth", "mail", "rcpt", "data", "drop_after_data"})
_REPLY = re.compile(r"[2-5]\d\d[ -]")


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes  # as received: dot-unstuffed, CRLF line ends
    auth_user: str  # user= of XOAUTH2
    client_id: str  # appid claim of the token used
    connection_id: int  # which TCP connection carried it, counting from 1
    path: Path | None  # the .eml file, if the sandbox has a mail directory
    # With record_wire: the DATA bytes exactly as sent after 354, dot-stuffing and final
    # ".\r\n" included, to check what a relay puts on the wire.
    wire: bytes | None = None
    seq: int = 0  # its number in the sandbox, from 1 (InternalId and the .eml name)
    # time.monotonic() when it was recorded, just before the 250 went out (the time that
    # went out is FakeExchange.answered_at[seq]): crash tests tell from them whether a copy
    # sent twice was in Exchange's hands or the relay's at the crash.
    recorded_at: float = field(default_factory=time.monotonic)


@dataclass
class _Injection:
    stage: str
    reply: str
    remaining: int
    rcpt: str | None


@dataclass
class _Delay:
    stage: str
    seconds: float
    remaining: int


@dataclass(frozen=True)
class _Grant:
    user: str
    client_id: str


class FakeExchange:
    """Records what arrives; ``inject`` makes the next command at a stage fail."""

    def __init__(self, entra: FakeEntra, mail_dir: Path | None = None, *,
                 limits: MailboxLimits = MICROSOFT) -> None:
        self.entra = entra
        # Exchange Online's per-mailbox limits (relay/sandbox/rules.py); tests scale them.
        self.limits = limits
        self.mail_dir = mail_dir
        self.record_wire = False  # keep each message's raw DATA bytes (ReceivedMessage.wire)
        # Exchange Online offers PIPELINING; False leaves it out of EHLO, as other servers do.
        self.pipelining = True
        self.pipelined = 0  # transactions whose MAIL, RCPT and DATA came in one read
        # SendAs grants, mailbox -> addresses it may send as (Add-RecipientPermission). The
        # From header must be the signed-in mailbox or a granted address, as Exchange checks
        # it; check_from_header = False checks only the envelope sender.
        self.check_from_header = True
        self.send_as: dict[str, set[str]] = {}
        self.port = 0
        self.messages: list[ReceivedMessage] = []
        self.answered_at: dict[int, float] = {}  # seq -> time.monotonic() its 250 was written
        self.connections = 0
        self.peak_open_connections = 0
        self.auth_attempts = 0
        self.auth_failures = 0
        self.auth_failure_reasons: list[str] = []
        self._injections: list[_Injection] = []
        self._delays: list[_Delay] = []
        self.delays_started = 0  # delayed commands so far, to know one is in progress
        self._sessions: set[_ExchangeSession] = set()
        self._server: asyncio.Server | None = None
        self._arrived = asyncio.Condition()
        self._seq = 0
        self._rate_reply = THROTTLED
        self._meter = MailboxMeter()
        # mailbox (casefolded) -> its signed-in sessions, oldest first: the first
        # limits.connections of them may submit, the others get 432 4.3.2.
        self._signed_in: dict[str, list[_ExchangeSession]] = {}
        self.throttled = 0  # messages refused by the 30-a-minute limit
        self.refused_for_limits: list[str] = []  # every limit refusal, for tests

    @property
    def open_connections(self) -> int:
        return len(self._sessions)

    def inject(self, stage: str, reply: str = "", times: int = 1,
               rcpt: str | None = None) -> None:
        """Answer the next ``times`` commands at ``stage`` with ``reply`` instead.

        A 2xx reply keeps the normal effect and changes only the text (except at
        "connect" and "auth", which always refuse); any other reply refuses. A 421
        reply also closes the connection, as Exchange does. "drop_after_data" ignores
        ``reply`` and hangs up after the final dot without answering.
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; use one of {sorted(STAGES)}")
        if times < 1:
            raise ValueError("times must be at least 1")
        if rcpt is not None and stage != "rcpt":
            raise ValueError("rcpt= only applies to the 'rcpt' stage")
        if stage != "drop_after_data" and not _REPLY.match(reply):
            raise ValueError(f"reply {reply!r} must start with an SMTP code, e.g. '451 4.3.2 ...'")
        self._injections.append(_Injection(stage, reply, times, rcpt))

    def delay(self, stage: str, seconds: float, times: int = 1) -> None:
        """Think ``seconds`` before answering the next ``times`` commands at ``stage``: "mail",
        "rcpt", or "data" (after the final dot), as a slow Exchange does. A client that hangs
        up meanwhile gets nothing done: the message is not recorded."""
        if stage not in {"mail", "rcpt", "data"}:
            raise ValueError(f"cannot delay {stage!r}; use mail, rcpt or data")
        if seconds <= 0 or times < 1:
            raise ValueError("seconds must be positive and times at least 1")
        self._delays.append(_Delay(stage, seconds, times))

    def rate_limit(self, messages: int, window: float = 60.0, reply: str = THROTTLED) -> None:
        """Refuse a mailbox's message at DATA with ``reply`` while it already had ``messages``
        accepted in the last ``window`` seconds, as Exchange Online's 30-a-minute limit does.
        ``messages=0`` lifts the limit. (Shorthand for replacing ``limits``.)"""
        if not _REPLY.match(reply):
            raise ValueError(f"reply {reply!r} must start with an SMTP code")
        self.limits = replace(self.limits, messages=max(messages, 0), window=window)
        self._rate_reply = reply
        self._meter.clear()

    def _over_limits(self, mailbox: str, recipients: int) -> str | None:
        """The refusal for one more message of ``recipients`` from ``mailbox``, if any."""
        now = asyncio.get_running_loop().time()
        if self._meter.over_rate(mailbox, self.limits, now):
            self.throttled += 1
            return self._limit_refused(self._rate_reply)
        if self._meter.over_day(mailbox, recipients, self.limits, now):
            return self._limit_refused(DAILY_QUOTA)
        self._meter.accepted(mailbox, recipients, now)
        return None

    def _limit_refused(self, reply: str) -> str:
        self.refused_for_limits.append(reply)
        return reply

    def _may_submit(self, session: _ExchangeSession, mailbox: str) -> bool:
        """Only the oldest ``limits.connections`` signed-in sessions of a mailbox submit."""
        if self.limits.connections <= 0:
            return True
        sessions = self._signed_in.get(mailbox.casefold(), [])
        return session in sessions[:self.limits.connections]

    def _signed_in_as(self, session: _ExchangeSession, mailbox: str) -> None:
        self._signed_in.setdefault(mailbox.casefold(), []).append(session)

    def reset(self) -> None:
        """Forget injections and recordings; files already written stay on disk."""
        self._injections.clear()
        self._delays.clear()
        self.messages.clear()
        self.answered_at.clear()
        self.pipelined = 0
        self.connections = 0
        self.peak_open_connections = len(self._sessions)
        self.auth_attempts = self.auth_failures = 0
        self.auth_failure_reasons.clear()
        self._meter.clear()
        self.throttled = 0
        self.refused_for_limits.clear()

    async def wait_for_messages(self, n: int, timeout: float = 10) -> list[ReceivedMessage]:
        """All recorded messages once there are at least ``n``; TimeoutError otherwise."""
        try:
            async with asyncio.timeout(timeout), self._arrived:
                await self._arrived.wait_for(lambda: len(self.messages) >= n)
        except TimeoutError:
            raise TimeoutError(f"the sandbox received {len(self.messages)} message(s), not the "
                               f"{n} expected, within {timeout} s") from None
        return list(self.messages)

    async def start(self, host: str, port: int, tls: ssl.SSLContext) -> int:
        if self.mail_dir is not None:
            # Received mail is private: readable by the sandbox's user only.
            self.mail_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.mail_dir.chmod(0o700)
            # Continue numbering so a restarted sandbox never overwrites earlier mail.
            self._seq = max((int(p.stem) for p in self.mail_dir.glob("*.eml")
                             if p.stem.isdigit()), default=0)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ExchangeSession(self, tls, loop), host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = [t for t in (s.hang_up() for s in list(self._sessions)) if t is not None]
        await server.wait_closed()
        # Let the aborted sessions' tasks finish so no task outlives the loop.
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- called by the sessions ------------------------------------------------------------

    def _take(self, stage: str, rcpt: str | None = None) -> str | None:
        for injection in self._injections:
            if injection.stage != stage:
                continue
            if injection.rcpt is not None and (
                    rcpt is None or injection.rcpt.casefold() != rcpt.casefold()):
                continue
            injection.remaining -= 1
            if injection.remaining == 0:
                self._injections.remove(injection)
            return injection.reply
        return None

    async def _pause(self, stage: str) -> None:
        delay = next((d for d in self._delays if d.stage == stage), None)
        if delay is None:
            return
        delay.remaining -= 1
        if delay.remaining == 0:
            self._delays.remove(delay)
        self.delays_started += 1
        # aiosmtpd cancels this hook when the client disconnects, so nothing happens after.
        await asyncio.sleep(delay.seconds)

    def _opened(self, session: _ExchangeSession) -> int:
        self._sessions.add(session)
        self.connections += 1
        self.peak_open_connections = max(self.peak_open_connections, len(self._sessions))
        return self.connections

    def _closed(self, session: _ExchangeSession) -> None:
        self._sessions.discard(session)
        for sessions in self._signed_in.values():
            if session in sessions:
                sessions.remove(session)

    def _auth_failed(self, reason: str) -> None:
        self.auth_failures += 1
        self.auth_failure_reasons.append(reason)
        log.info("AUTH refused: %s", reason)

    async def _record(self, envelope: Envelope, grant: _Grant,
                      connection_id: int, wire: bytes | None = None) -> ReceivedMessage:
        self._seq += 1
        seq = self._seq  # other sessions record meanwhile (the write below awaits)
        data = envelope.original_content or b""
        path = None
        if self.mail_dir is not None:
            path = self.mail_dir / f"{seq:05d}.eml"
            sidecar = {
                "mail_from": envelope.mail_from,
                "rcpt_tos": envelope.rcpt_tos,
                "mail_options": envelope.mail_options,
                "auth_user": grant.user,
                "client_id": grant.client_id,
                "connection_id": connection_id,
                "size": len(data),
                "received_at": datetime.now(UTC).isoformat(),
            }
            await asyncio.to_thread(_write_message, path, data, sidecar)
        message = ReceivedMessage(
            mail_from=envelope.mail_from or "", rcpt_tos=tuple(envelope.rcpt_tos), data=data,
            auth_user=grant.user, client_id=grant.client_id, connection_id=connection_id,
            path=path, wire=wire, seq=seq)
        async with self._arrived:
            self.messages.append(message)
            self._arrived.notify_all()
        return message


def _write_message(path: Path, data: bytes, sidecar: dict[str, Any]) -> None:
    path.write_bytes(data)
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")


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


class _ExchangeSession(SMTP):
    # App tokens make AUTH lines several KB, and devices send long body lines; Exchange
    # takes both, stock aiosmtpd answers "500 Command line too long".
    line_length_limit = 1 << 20
    command_size_limit = 1 << 16
    command_size_limits: dict[str, int] = collections.defaultdict(lambda: 1 << 16)
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, exchange: FakeExchange, tls: ssl.SSLContext,
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
        elif isinstance(session.auth_data, _Grant):
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
                          auth_data=_Grant(user, str(claims["appid"])))

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
        if isinstance(grant, _Grant) and not self.exchange._may_submit(self, grant.user):
            # A fourth concurrent connection of one mailbox (MICROSOFT365.md §3).
            await self.push(self.exchange._limit_refused(TOO_MANY_CONNECTIONS))
            return
        await super().smtp_MAIL(arg)


class _ExchangeHandler:
    """aiosmtpd hooks: Exchange's reply texts, injections, SendAs, and recording."""

    def __init__(self, exchange: FakeExchange) -> None:
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

    async def handle_DATA(self, server: _ExchangeSession, session: Session,
                          envelope: Envelope) -> str:
        await self.exchange._pause("data")
        if self.exchange._take("drop_after_data") is not None:
            server.drop_instead_of_next_reply()
            return "451 4.4.2 never sent"
        grant = session.auth_data
        if not isinstance(grant, _Grant):  # cannot happen: MAIL needs a successful AUTH
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
