"""The device-facing SMTP listener (aiosmtpd), one server per ``listeners[]`` entry.

Policy, in the order a session meets it:

1. connect: the client's address must be in the listener's ``networks`` (default loopback
   only), else ``554 5.7.1``; then a connection slot (``max_connections``,
   ``max_connections_per_ip``), else ``421 4.7.0``; either way the connection closes at once;
2. AUTH (PLAIN, LOGIN) is offered only over TLS, or in clear to ``cleartext_auth_networks``,
   with failure limits per session, per address and per user (``auth_limits``);
3. MAIL: the sender is an authenticated account, or the first account whose ``networks``
   contain the client; anyone else gets ``530 5.7.0`` (no open relay). Recipients are passed
   to Exchange Online as given (``%`` and ``!`` are not interpreted; a source route
   ``<@a,@b:user@c>`` is reduced to ``user@c`` as RFC 5321 C asks);
   The account's ``from``/``allowed_from`` check the sender, ``allowed_recipients`` each RCPT
   (:mod:`relay.policy.identity`);
4. DATA: the message is prepared (From rewrite, Message-ID, lines over 998 octets folded),
   committed to the spool with fsync, and only then answered ``250``. If the spool cannot take
   it the client gets a 4xx and keeps its copy. With ``delivery: passthrough`` it goes to
   Exchange Online instead while the client waits (:mod:`relay.delivery.passthrough`).

The session itself (timeouts, DATA parsing, command limits, AUTH) is in
:mod:`relay.ingress.session`; the counters are in :mod:`relay.ingress.limits`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import Envelope, Session

from relay.config.records import Account, Config, Listener
from relay.delivery.events import Latency
from relay.delivery.passthrough import Passthrough
from relay.ingress.data import SMTP_LINE_LIMIT, fold_long_lines
from relay.ingress.limits import AuthGuard, ConnectionSlots, LogThrottle, raise_open_files_limit
from relay.ingress.peers import in_networks, safe
from relay.ingress.session import RelaySMTP
from relay.message import DeliveryState, QueueEntry
from relay.message import Envelope as SpoolEnvelope
from relay.policy import identity, rewrite
from relay.spool.base import SpoolFullError, Store

__all__ = ["RelayHandler", "RelaySMTP", "start_listener"]

log = logging.getLogger("m365relay.listener")


class RelayHandler:
    """aiosmtpd hooks shared by all sessions of one listener."""

    def __init__(self, listener: Listener, config: Config, store: Store,
                 submit: Callable[[QueueEntry], None], hostname: str, *,
                 guard: AuthGuard | None = None, passthrough: Passthrough | None = None) -> None:
        self.listener = listener
        self.config = config
        self.store = store
        self.submit = submit
        self.hostname = hostname
        self.sessions: set[RelaySMTP] = set()
        self.changed = asyncio.Event()  # a session ended or finished a transaction
        self.closing = False
        self.auth_failures = 0  # for /metrics (read through the snapshot)
        # End of DATA to the 250 (or 4xx): what a device waits for after its final dot.
        self.ack_latency = Latency()
        # One guard for all listeners (the service passes it), or more listeners would give
        # an attacker more guesses.
        self.guard = guard or AuthGuard()
        self.slots = ConnectionSlots()
        self.quiet = LogThrottle()
        self.passthrough = passthrough  # for accounts and listeners with delivery: passthrough

    def session_changed(self) -> None:
        self.changed.set()

    def login_failed(self) -> None:
        self.auth_failures += 1

    # -- admission -----------------------------------------------------------------------

    def admit(self, session: RelaySMTP, address: Any) -> str | None:
        """Take a connection slot for a new session, or return the reply that refuses it."""
        listener = self.listener
        client = session.client
        if self.closing:
            return "421 4.3.2 Service shutting down, try again later"
        if not in_networks(address, listener.networks):
            self._refused(client, "network", f"not in listeners[{listener.name}].networks")
            return "554 5.7.1 Access denied: this network may not use this relay"
        refusal = self.slots.refusal(client, listener.max_connections,
                                     listener.max_connections_per_ip)
        if refusal is not None:
            everyone = self.slots.total >= listener.max_connections
            if self._reclaim(None if everyone else client):
                refusal = self.slots.refusal(client, listener.max_connections,
                                             listener.max_connections_per_ip)
        if refusal is not None:
            key = "max_connections" if "to this relay" in refusal else "max_connections_per_ip"
            self._refused(client, key, f"listeners[{listener.name}].{key} reached")
            return refusal
        self.slots.take(client)
        return None

    def _reclaim(self, client: str | None) -> bool:
        """At a limit, the session idle longest makes room (outside a mail transaction, and
        idle ``stress_idle_timeout``, or a second if it never sent a command), as Postfix
        shortens its timeouts under stress."""
        now = asyncio.get_running_loop().time()
        idle = self.listener.stress_idle_timeout
        candidates = [s for s in self.sessions if (client is None or s.client == client)
                      and s.reclaimable(now, idle)]
        if not candidates:
            return False
        oldest = min(candidates, key=lambda s: s.last_command)
        log.info("%s: closing, idle %.0fs while listeners[%s] is at its connection limit "
                 "(stress_idle_timeout)", oldest.client, now - oldest.last_command,
                 self.listener.name)
        oldest.hang_up(f"421 4.4.2 {self.hostname} Error: timeout exceeded (idle while the "
                       "relay is busy), reconnect")
        oldest.release_slot()
        return True

    def _refused(self, client: str, kind: str, why: str) -> None:
        # A full relay is one condition, however many addresses meet it.
        quiet = self.quiet.allow(kind if kind == "max_connections" else f"{kind} {client}")
        if quiet is not None:
            more = f" ({quiet} more since the last report)" if quiet else ""
            log.warning("connection from %s refused: %s%s", client, why, more)

    # -- aiosmtpd hooks ------------------------------------------------------------------

    def account_for_network(self, address: Any) -> Account | None:
        return next((a for a in self.config.accounts if in_networks(address, a.networks)),
                    None)

    async def handle_MAIL(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        account = server.account or self.account_for_network(server.address)
        if account is None:
            log.info("%s: MAIL from <%s> refused: not authenticated and not in any account's "
                     "networks", server.client, safe(address))
            return ("530 5.7.0 Authentication required: log in with AUTH, or add this client's "
                    "address to an account's networks")
        # The null sender (a device's own reports, fax confirmations) claims no identity:
        # with from: enforce the From header decides, after DATA.
        refusal = None if address in ("", "<>") else identity.sender_refusal(account, address,
                                                                            "Sender")
        if refusal is not None:
            self._sender_refused(server, account, "MAIL FROM", address)
            return refusal
        server.mail_account = account
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    @staticmethod
    def _sender_refused(server: RelaySMTP, account: Account, what: str, address: str) -> None:
        # The device's mail is lost (a 5xx), so the admin must see it at the default level.
        log.warning("%s: %s <%s> refused for account %s: it may only send as <%s> "
                    "(accounts[%s].from: %s; add the address to allowed_from to allow it)",
                    server.client, what, safe(address), account.name, account.mailbox,
                    account.name, account.from_)

    async def handle_RCPT(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.listener.max_recipients:
            return f"452 4.5.3 Too many recipients (at most {self.listener.max_recipients})"
        if "@" not in address or address.startswith("@"):
            return "553 5.1.3 Recipient must be a full address (user@domain)"
        account = server.mail_account
        refusal = None if account is None else identity.recipient_refusal(account, address)
        if refusal is not None:
            log.info("%s: RCPT <%s> refused by accounts[%s].allowed_recipients", server.client,
                     safe(address), account.name if account else "")
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        started = time.perf_counter()
        try:
            return await self._data(server, session, envelope)
        finally:
            self.ack_latency.observe(time.perf_counter() - started)

    async def _data(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        account = server.mail_account
        if account is None or envelope.mail_from is None:  # aiosmtpd checks MAIL came first
            return "503 5.5.1 Error: need MAIL command"
        # The content as the session assembled it (not in envelope.content: no bytes copy);
        # the spool gets the new header block and a view of the body as received.
        content = server.message.content if server.message is not None else b""
        fields, body = rewrite.split_headers(content)
        header_from = rewrite.header_address(fields, "from")
        if header_from:
            refusal = identity.sender_refusal(account, header_from, "From: header")
            if refusal is not None:
                self._sender_refused(server, account, "From: header", header_from)
                return refusal
        # aiosmtpd keeps the null sender as "<>": no bounce may go to it (RFC 5321 4.5.5).
        reverse_path = "" if envelope.mail_from == "<>" else envelope.mail_from
        sending = identity.sending_identity(account, header_from, reverse_path)
        header = rewrite.prepare(fields, body, mailbox=sending.sender,
                                 rewrite_from=not sending.keep_from, hostname=self.hostname,
                                 received=self._received(server, session))
        # Spooled as it will be sent, so every hop after us takes it (RFC 5322 2.1.1); the
        # split is at a line boundary, so each part folds alone, and the body only needs a
        # look when the session saw a line that long.
        data: tuple[bytes, bytes | memoryview] = (fold_long_lines(header), body)
        if server.message is not None and server.message.longest > SMTP_LINE_LIMIT:
            data = (data[0], fold_long_lines(body))
        size = len(data[0]) + len(data[1])
        spooled = SpoolEnvelope(
            mail_from=sending.mail_from, rcpt_tos=tuple(envelope.rcpt_tos), account=account.name,
            app=account.app, mailbox=sending.mailbox, bounce_to=reverse_path,
            client=server.client, received_at=time.time(), original_from=reverse_path)
        mode = account.delivery or self.listener.delivery
        if mode == "passthrough" and self.passthrough is not None:
            return await self.passthrough.transact(server.client, spooled, data)
        try:
            queue_id = await self.store.commit(spooled, data)
        except SpoolFullError as exc:
            log.error("%s: message refused, spool full: %s", server.client, exc)
            return "452 4.3.1 Insufficient system storage, try again later"
        except Exception as exc:  # any failure before the commit must leave the client a 4xx
            log.error("%s: message refused, spool write failed: %s", server.client, exc)
            return "451 4.3.0 Local error writing the message, try again later"
        if log.isEnabledFor(logging.INFO):
            log.info("%s: client=%s, account=%s, from=<%s>, size=%d, nrcpt=%d", queue_id,
                     server.client, account.name, safe(envelope.mail_from), size,
                     len(envelope.rcpt_tos))
        self.submit(QueueEntry(queue_id, spooled, DeliveryState(), size))
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def _received(self, server: RelaySMTP, session: Session) -> str:
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        if server.is_tls:
            proto += "S"
        if server.account is not None:
            proto += "A"
        helo = safe(session.host_name or "unknown", 64)
        date = rewrite.date_now()
        return (f"from {helo} ([{server.client}]) by {self.hostname} (m365relay) "
                f"with {proto}; {date}")


async def start_listener(listener: Listener, handler: RelayHandler,
                         context: ssl.SSLContext | None = None) -> asyncio.Server:
    """Bind and start serving one listener; port 0 picks a free port (see ``sockets``).
    ``context`` is the listener's TLS (relay/servertls.py), None for ``tls: none``."""
    raise_open_files_limit()
    loop = asyncio.get_running_loop()
    implicit = listener.tls == "implicit"

    def factory() -> RelaySMTP:
        return RelaySMTP(handler, implicit_tls=implicit,
                         tls_context=None if implicit else context)

    # A deep accept queue: during a flood, connections wait in the kernel for their 421
    # instead of being dropped (which clients see as a hang and then a retry).
    return await loop.create_server(factory, host=listener.host, port=listener.port,
                                    ssl=context if implicit else None, reuse_address=True,
                                    backlog=1024)
