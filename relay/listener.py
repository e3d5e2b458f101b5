"""The device-facing SMTP listener (aiosmtpd), one server per ``listeners[]`` entry.

Policy, in the order a session meets it:

1. connect: the client's address must be in the listener's ``networks`` (default loopback
   only), else ``554 5.7.1`` and the connection closes;
2. AUTH (PLAIN, LOGIN) is offered only over TLS, or in clear to ``cleartext_auth_networks``;
3. MAIL: the sender is an authenticated account, or the first account whose ``networks``
   contain the client; anyone else gets ``530 5.7.0`` (no open relay);
4. DATA: the message is prepared (From rewrite, Message-ID), committed to the spool with fsync,
   and only then answered ``250``. If the spool cannot take it the client gets a 4xx and keeps
   its copy.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import ssl
import time
from base64 import b64decode
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

from relay import auth, rewrite
from relay.config import Account, Config, IPNetwork, Listener
from relay.spool import DeliveryState, QueueEntry, Spool, SpoolFullError
from relay.spool import Envelope as SpoolEnvelope

log = logging.getLogger("m365relay.listener")


def _ip(peer: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(peer[0])
    except (TypeError, ValueError, IndexError):
        return None
    # An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d; match it as IPv4.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _in(address: Any, networks: tuple[IPNetwork, ...]) -> bool:
    return address is not None and any(address in net for net in networks)


def _safe(text: str, limit: int = 200) -> str:
    """Client-supplied text for a log line: printable, bounded."""
    return text.encode("unicode_escape", errors="backslashreplace").decode("ascii")[:limit]


def server_tls_context(listener: Listener) -> ssl.SSLContext | None:
    if listener.tls == "none":
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(listener.certificate), str(listener.private_key))
    return context


class RelayHandler:
    """aiosmtpd hooks shared by all sessions of one listener."""

    def __init__(self, listener: Listener, config: Config, spool: Spool,
                 submit: Callable[[QueueEntry], None], hostname: str) -> None:
        self.listener = listener
        self.config = config
        self.spool = spool
        self.submit = submit
        self.hostname = hostname
        self.sessions: set[RelaySMTP] = set()
        self.changed = asyncio.Event()  # a session ended or finished a transaction
        self.closing = False

    def account_for_network(self, address: Any) -> Account | None:
        return next((a for a in self.config.accounts if _in(address, a.networks)), None)

    async def handle_MAIL(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        account = server.account or self.account_for_network(_ip(session.peer))
        if account is None:
            log.info("%s: MAIL from <%s> refused: not authenticated and not in any account's "
                     "networks", server.client, _safe(address))
            return ("530 5.7.0 Authentication required: log in with AUTH, or add this client's "
                    "address to an account's networks")
        if account.from_ == "enforce" and address.lower() != account.mailbox.lower():
            return (f"550 5.7.1 Sender <{address}> refused: account {account.name} may only send "
                    f"as <{account.mailbox}> (from: enforce)")
        server.mail_account = account
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.listener.max_recipients:
            return f"452 4.5.3 Too many recipients (at most {self.listener.max_recipients})"
        if "@" not in address or address.startswith("@"):
            return "553 5.1.3 Recipient must be a full address (user@domain)"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        account = server.mail_account
        if account is None or envelope.mail_from is None:  # aiosmtpd checks MAIL came first
            return "503 5.5.1 Error: need MAIL command"
        content = envelope.original_content or b""
        if account.from_ == "enforce":
            fields, _ = rewrite.split_headers(content)
            header_from = rewrite.header_address(fields, "from")
            if header_from is not None and header_from.lower() != account.mailbox.lower():
                return (f"550 5.7.1 From: header <{header_from}> refused: account {account.name} "
                        f"may only send as <{account.mailbox}> (from: enforce)")
        rewrite_from = account.from_ == "rewrite"
        data = rewrite.prepare(content, mailbox=account.mailbox, rewrite_from=rewrite_from,
                               hostname=self.hostname, received=self._received(server, session))
        sender = account.mailbox if rewrite_from else envelope.mail_from
        spooled = SpoolEnvelope(
            mail_from=sender, rcpt_tos=tuple(envelope.rcpt_tos), account=account.name,
            app=account.app, mailbox=account.mailbox, bounce_to=envelope.mail_from,
            client=server.client, received_at=time.time(), original_from=envelope.mail_from)
        try:
            queue_id = await asyncio.to_thread(self.spool.commit, spooled, data)
        except SpoolFullError as exc:
            log.error("%s: message refused, spool full: %s", server.client, exc)
            return "452 4.3.1 Insufficient system storage, try again later"
        except Exception as exc:  # any failure before the commit must leave the client a 4xx
            log.error("%s: message refused, spool write failed: %s", server.client, exc)
            return "451 4.3.0 Local error writing the message, try again later"
        log.info("%s: client=%s, account=%s, from=<%s>, size=%d, nrcpt=%d", queue_id,
                 server.client, account.name, _safe(envelope.mail_from), len(data),
                 len(envelope.rcpt_tos))
        self.submit(QueueEntry(queue_id, spooled, DeliveryState(), len(data)))
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def _received(self, server: RelaySMTP, session: Session) -> str:
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        if server.is_tls:
            proto += "S"
        if server.account is not None:
            proto += "A"
        helo = _safe(session.host_name or "unknown", 64)
        date = email.utils.formatdate(localtime=True)
        return (f"from {helo} ([{server.client}]) by {self.hostname} (m365relay) "
                f"with {proto}; {date}")


class RelaySMTP(SMTP):
    """One SMTP session."""

    # aiosmtpd 1.4.6 sends "User Name\x00"; Xerox printers, Go and curl give up on the NUL.
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, handler: RelayHandler, *, implicit_tls: bool = False, **kwargs: Any) -> None:
        listener = handler.listener
        # Read by SMTP.__init__ to size the stream buffer, so it must be set first.
        self.line_length_limit = listener.max_line_length + 2
        super().__init__(
            handler,
            hostname=handler.hostname,
            data_size_limit=listener.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=listener.idle_timeout,
            require_starttls=listener.require_tls,
            ident="m365relay",
            **kwargs,
        )
        self.relay_handler = handler
        self.implicit_tls = implicit_tls
        self.account: Account | None = None       # authenticated account
        self.mail_account: Account | None = None  # account of the current transaction
        self.client = "?"

    @property
    def is_tls(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        self.account = None  # STARTTLS resets the session (RFC 3207 4.2)
        if first:
            assert self.session is not None  # noqa: S101 - aiosmtpd just created it
            self.relay_handler.sessions.add(self)
            address = _ip(self.session.peer)
            self.client = str(address) if address is not None else "?"
            self._peer_ip = address
            listener = self.relay_handler.listener
            # AUTH in clear only where the admin listed the network; implicit TLS is TLS
            # although aiosmtpd does not know it (it would then never offer AUTH).
            self._auth_require_tls = not (
                self.implicit_tls or _in(address, listener.cleartext_auth_networks))

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self.relay_handler.sessions.discard(self)
        self.relay_handler.changed.set()

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def close_for_shutdown(self) -> None:
        """Tell the client we are going away (it keeps its message and retries) and hang up."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(b"421 4.3.2 Service shutting down, try again later\r\n")
            transport.close()

    async def _handle_client(self) -> None:
        if self.relay_handler.closing:
            self.close_for_shutdown()
            return
        if not _in(self._peer_ip, self.relay_handler.listener.networks):
            log.warning("connection from %s refused: not in listeners[%s].networks",
                        self.client, self.relay_handler.listener.name)
            await self.push("554 5.7.1 Access denied: this network may not use this relay")
            assert self.transport is not None  # noqa: S101
            self.transport.close()
            return
        log.info("connect from %s on %s", self.client, self.relay_handler.listener.name)
        await super()._handle_client()

    def _set_rset_state(self) -> None:
        super()._set_rset_state()  # type: ignore[no-untyped-call]
        self.mail_account = None

    def _set_post_data_state(self) -> None:
        super()._set_post_data_state()  # type: ignore[no-untyped-call]
        self.mail_account = None
        # aiosmtpd calls this right before pushing the DATA reply; a draining shutdown waits
        # for it so a client mid-DATA still gets its answer.
        if hasattr(self, "relay_handler"):
            self.relay_handler.changed.set()

    # AUTH PLAIN/LOGIN as in aiosmtpd, but the password check is awaited (argon2 runs in a
    # thread) instead of aiosmtpd's synchronous authenticator callback.
    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._check("PLAIN", parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._check("LOGIN", login, password)

    async def _check(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        account = await auth.authenticate(self.relay_handler.config, login, password)
        user = _safe(login.decode("utf-8", errors="replace"), 64)
        if account is None:
            log.warning("%s: AUTH %s failed for user %r", self.client, mechanism, user)
            return AuthResult(success=False, handled=False)
        log.info("%s: AUTH %s ok user=%r account=%s", self.client, mechanism, user, account.name)
        self.account = account
        return AuthResult(success=True, auth_data=LoginPassword(login, b""))


async def start_listener(listener: Listener, handler: RelayHandler) -> asyncio.Server:
    """Bind and start serving one listener; port 0 picks a free port (see ``sockets``)."""
    loop = asyncio.get_running_loop()
    context = server_tls_context(listener)
    implicit = listener.tls == "implicit"

    def factory() -> RelaySMTP:
        return RelaySMTP(handler, implicit_tls=implicit,
                         tls_context=None if implicit else context)

    return await loop.create_server(factory, host=listener.host, port=listener.port,
                                    ssl=context if implicit else None, reuse_address=True)
