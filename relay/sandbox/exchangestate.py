"""What the fake Exchange Online knows and is told: the messages it recorded (and their .eml
files), the faults and delays a test injects, Exchange's per-mailbox limits and who is
signed in. :mod:`relay.sandbox.exchangewire` speaks SMTP and consults it;
:class:`relay.sandbox.exchange.FakeExchange` puts the two on a socket."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from aiosmtpd.smtp import Envelope

from relay.sandbox.entra import FakeEntra
from relay.sandbox.rules import (
    DAILY_QUOTA,
    MICROSOFT,
    THROTTLED,
    MailboxLimits,
    MailboxMeter,
)

log = logging.getLogger("m365relay.sandbox.exchange")


class WireSession(Protocol):
    """An SMTP session as the state sees it: stored, compared, hung up at stop."""

    def hang_up(self) -> asyncio.Task[None] | None: ...


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
class Grant:
    user: str
    client_id: str


class ExchangeState:
    """Records what arrives; ``inject`` makes the next command at a stage fail. The sessions
    of :mod:`relay.sandbox.exchangewire` report to it and ask it (the ``_`` methods)."""

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
        self._sessions: set[WireSession] = set()
        self._server: asyncio.Server | None = None
        self._arrived = asyncio.Condition()
        self._seq = 0
        self._rate_reply = THROTTLED
        self._meter = MailboxMeter()
        # mailbox (casefolded) -> its signed-in sessions, oldest first: the first
        # limits.connections of them may submit, the others get 432 4.3.2.
        self._signed_in: dict[str, list[WireSession]] = {}
        # mailbox (casefolded) -> most sessions signed in as it at once, whoever opened them:
        # what a cluster of relays must keep within Exchange's 3.
        self.peak_signed_in: dict[str, int] = {}
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

    def _may_submit(self, session: WireSession, mailbox: str) -> bool:
        """Only the oldest ``limits.connections`` signed-in sessions of a mailbox submit."""
        if self.limits.connections <= 0:
            return True
        sessions = self._signed_in.get(mailbox.casefold(), [])
        return session in sessions[:self.limits.connections]

    def _signed_in_as(self, session: WireSession, mailbox: str) -> None:
        sessions = self._signed_in.setdefault(mailbox.casefold(), [])
        sessions.append(session)
        box = mailbox.casefold()
        self.peak_signed_in[box] = max(self.peak_signed_in.get(box, 0), len(sessions))

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
        self.peak_signed_in = {box: len(s) for box, s in self._signed_in.items() if s}

    async def wait_for_messages(self, n: int, timeout: float = 10) -> list[ReceivedMessage]:
        """All recorded messages once there are at least ``n``; TimeoutError otherwise."""
        try:
            async with asyncio.timeout(timeout), self._arrived:
                await self._arrived.wait_for(lambda: len(self.messages) >= n)
        except TimeoutError:
            raise TimeoutError(f"the sandbox received {len(self.messages)} message(s), not the "
                               f"{n} expected, within {timeout} s") from None
        return list(self.messages)

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

    def _opened(self, session: WireSession) -> int:
        self._sessions.add(session)
        self.connections += 1
        self.peak_open_connections = max(self.peak_open_connections, len(self._sessions))
        return self.connections

    def _closed(self, session: WireSession) -> None:
        self._sessions.discard(session)
        for sessions in self._signed_in.values():
            if session in sessions:
                sessions.remove(session)

    def _auth_failed(self, reason: str) -> None:
        self.auth_failures += 1
        self.auth_failure_reasons.append(reason)
        log.info("AUTH refused: %s", reason)

    async def _record(self, envelope: Envelope, grant: Grant,
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
