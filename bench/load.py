"""The load generator: SMTP clients as devices (or, for ``direct``, as an OAuth-capable client).

All targets are driven by the same aiosmtplib code so the client's own cost is the same; only
the session set-up differs:

* ``m365relay``: plain SMTP from the mailbox's loopback source address, no AUTH; or, in the
  AUTH scenarios, from 127.0.0.1 with ``AUTH PLAIN`` as the mailbox's account;
* ``emailproxy``: plain SMTP, ``AUTH PLAIN`` with the mailbox address;
* ``direct``: STARTTLS to the fake Exchange, ``AUTH XOAUTH2`` with one msal token per run.

A client that gets a 4xx, or loses the connection, puts the message at the back of its own
queue and tries again later (bounded attempts), as a well-behaved device would; the relay hides
those faults from the client, the other two cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import msal
import requests

from bench.messages import RCPT, Message
from bench.targets import (
    EMAILPROXY_PASSWORD,
    RELAY_PASSWORD,
    is_relay,
    relay_username,
    source_address,
)

MAX_ATTEMPTS = 25
SMTP_TIMEOUT = 120.0  # a 30 MB message through a slow proxy on a busy machine


@dataclass
class Outcome:
    accepted: set[str] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)   # connection lost after the final dot
    given_up: set[str] = field(default_factory=set)
    latencies: list[float] = field(default_factory=list)
    deferred: int = 0          # 4xx replies seen by the client
    login_refused: int = 0     # 4xx replies to AUTH (the client retried)
    disconnects: int = 0
    connections: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    last_ack: float = 0.0


class Connector:
    """Opens a ready-to-send client session for one target and mailbox. ``ports``: the
    target's listeners; client *c* talks to ``ports[c % len(ports)]`` (two relays of a
    cluster split the clients, as a load balancer would)."""

    def __init__(self, target: str, fakes: dict[str, Any], ports: Sequence[int], *,
                 auth: bool = False) -> None:
        self.target = target
        self.auth = auth
        self.fakes = fakes
        self.ports = tuple(ports) or (0,)
        self.token = ""
        self._tls = ssl.create_default_context(cafile=fakes["ca_file"])

    async def prepare(self) -> None:
        """Direct clients need a token first: one request per run, reused by every client."""
        if self.target == "direct" and not self.token:
            self.token = await asyncio.to_thread(self._fetch_token)

    def _fetch_token(self) -> str:
        secret = Path(self.fakes["secret_file"]).read_text(encoding="utf-8").strip()
        # trust_env off: REQUESTS_CA_BUNDLE would replace the sandbox CA, and no proxy
        # variable may send loopback traffic elsewhere.
        session = requests.Session()
        session.trust_env = False
        session.verify = self.fakes["ca_file"]
        app = msal.ConfidentialClientApplication(
            self.fakes["client_id"], client_credential=secret,
            authority=self.fakes["authority"], instance_discovery=False, http_client=session)
        result = app.acquire_token_for_client(scopes=[self.fakes["scope"]])
        if "access_token" not in result:
            raise RuntimeError(f"the fake Entra refused a token: {result.get('error')}: "
                               f"{result.get('error_description')}")
        return str(result["access_token"])

    async def open(self, mailbox: int, address: str, client: int = 0) -> aiosmtplib.SMTP:
        smtp = self._client(mailbox, self.ports[client % len(self.ports)])
        try:
            await smtp.connect()
            await smtp.ehlo()
            if self.target == "direct":
                await smtp.auth_xoauth2(address, self.token)
            elif self.target == "emailproxy":
                await smtp.auth_plain(address, EMAILPROXY_PASSWORD)
            elif self.auth:
                await smtp.auth_plain(relay_username(mailbox), RELAY_PASSWORD)
        except BaseException:
            smtp.close()  # a refused login must not leave the socket open
            raise
        return smtp

    def _client(self, mailbox: int, port: int) -> aiosmtplib.SMTP:
        if self.target == "direct":
            return aiosmtplib.SMTP(hostname=self.fakes["smtp_host"],
                                   port=self.fakes["smtp_port"], start_tls=True,
                                   tls_context=self._tls, timeout=SMTP_TIMEOUT,
                                   local_hostname="bench-client.example")
        if is_relay(self.target) and not self.auth:
            return aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                                   source_address=(source_address(mailbox), 0),
                                   timeout=SMTP_TIMEOUT, local_hostname="bench-device.example")
        return aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                               timeout=SMTP_TIMEOUT, local_hostname="bench-device.example")


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.quit(timeout=10)
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        smtp.close()


async def run_client(connector: Connector, mailbox: int, messages: Sequence[Message],
                     per_connection: int, outcome: Outcome, *, client: int = 0) -> None:
    queue = deque((m, 0) for m in messages)
    address = messages[0].mailbox if messages else ""
    while queue:
        try:
            smtp = await connector.open(mailbox, address, client)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 500:
                # A refused login does not get better by retrying: the device gives up.
                outcome.errors[f"login refused: {exc.code} {exc.message[:60]}"] += 1
                outcome.given_up.update(m.id for m, _ in queue)
                return
            if isinstance(exc, aiosmtplib.SMTPResponseException):
                outcome.login_refused += 1  # a 4xx to EHLO or AUTH: retried like a device
            outcome.errors[f"connect: {type(exc).__name__}: {str(exc)[:80]}"] += 1
            message, attempts = queue.popleft()
            if attempts + 1 >= MAX_ATTEMPTS:
                outcome.given_up.add(message.id)
            else:
                queue.append((message, attempts + 1))
            await asyncio.sleep(0.05)  # a device's pause before reconnecting
            continue
        outcome.connections += 1
        try:
            await _send_some(smtp, queue, per_connection, outcome)
        finally:
            if smtp.is_connected:
                await _quit(smtp)


async def _send_some(smtp: aiosmtplib.SMTP, queue: deque[tuple[Message, int]],
                     per_connection: int, outcome: Outcome) -> None:
    for _ in range(per_connection):
        if not queue:
            return
        message, attempts = queue.popleft()
        started = time.monotonic()
        try:
            await smtp.sendmail(message.mailbox, [RCPT], message.data,
                                mail_options=["BODY=8BITMIME"])
        except aiosmtplib.SMTPResponseException as exc:
            outcome.errors[f"{exc.code} {exc.message[:60]}"] += 1
            if exc.code >= 500:
                outcome.given_up.add(message.id)
                continue
            outcome.deferred += 1
            _retry(queue, message, attempts, outcome)
            if not smtp.is_connected:
                return
            continue
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # Lost after (part of) the message went out: the client cannot know whether it
            # was taken, so it retries; a copy that did arrive must not arrive twice.
            outcome.disconnects += 1
            outcome.unknown.add(message.id)
            outcome.errors[f"lost: {type(exc).__name__}"] += 1
            _retry(queue, message, attempts, outcome)
            smtp.close()
            return
        now = time.monotonic()
        outcome.latencies.append(now - started)
        outcome.accepted.add(message.id)
        outcome.unknown.discard(message.id)
        outcome.last_ack = max(outcome.last_ack, now)


def _retry(queue: deque[tuple[Message, int]], message: Message, attempts: int,
           outcome: Outcome) -> None:
    if attempts + 1 >= MAX_ATTEMPTS:
        outcome.given_up.add(message.id)
    else:
        queue.append((message, attempts + 1))


async def run_load(connector: Connector, plan: Sequence[tuple[int, Sequence[Message]]],
                   per_connection: int) -> Outcome:
    """Run one client per plan entry (mailbox index, its messages) concurrently."""
    outcome = Outcome()
    await connector.prepare()
    await asyncio.gather(*(run_client(connector, mailbox, messages, per_connection, outcome,
                                      client=client)
                           for client, (mailbox, messages) in enumerate(plan)))
    return outcome


async def hold_idle(port: int, count: int, parallel: int = 25, banner_timeout: float = 10,
                    give_up_after: int = 50) -> tuple[list[asyncio.StreamWriter], int]:
    """Open ``count`` connections that each got the banner; returns them and the failures.

    Stops opening more after ``give_up_after`` failures: a target that cannot hold the
    connections has answered the question, and waiting out every banner would take minutes.
    """
    writers: list[asyncio.StreamWriter] = []
    failures = 0
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        nonlocal failures
        async with gate:
            if failures >= give_up_after:
                return
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                failures += 1
                return
            try:
                banner = await asyncio.wait_for(reader.readline(), banner_timeout)
            except (OSError, TimeoutError):
                banner = b""
            if banner.startswith(b"220"):
                writers.append(writer)
            else:
                failures += 1
                writer.close()

    await asyncio.gather(*(one() for _ in range(count)))
    return writers, failures


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
    for writer in writers:
        with contextlib.suppress(OSError):
            await writer.wait_closed()
