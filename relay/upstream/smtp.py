"""One authenticated SMTP connection to Exchange Online for one mailbox.

STARTTLS is mandatory (``start_tls=True``: aiosmtplib's default would silently skip TLS when
the server does not offer it), certificates are always verified (``ca_file`` only *adds* a
trust anchor), and the login is ``AUTH XOAUTH2`` with an app-only token. Every failure becomes
a :class:`~relay.diagnosis.errors.DeliveryError` whose class says retry or bounce.
"""

from __future__ import annotations

import logging
import ssl
import time

import aiosmtplib

from relay.config.files import Stamp, stat_stamps
from relay.config.records import App
from relay.diagnosis.errors import (
    AuthRejected,
    DeferError,
    DeliveryError,
    enhanced_status,
    error_for,
)
from relay.diagnosis.explain import Context, Verdict, explain_connection_error, explain_smtp
from relay.message import Body
from relay.tokens.provider import TokenProvider
from relay.upstream.counts import Opened
from relay.upstream.smtpwire import send_mail

# Exchange Online takes 500 recipients per message by default (admins may set 1 to 1,000;
# MICROSOFT365.md §4) and refuses the rest with 452 4.5.3: never offer more in one transaction.
RECIPIENTS_PER_MESSAGE = 500

log = logging.getLogger("m365relay.upstream")


_contexts: dict[tuple[str, Stamp | None], ssl.SSLContext] = {}


def tls_context(app: App) -> ssl.SSLContext:
    """One verifying client context per trust setting, shared by all connections: loading the
    system trust store takes tens of milliseconds on the event loop."""
    key: tuple[str, Stamp | None] = ("", None)
    if app.ca_file is not None:
        # A file rewritten or replaced (a proxy's new CA) is loaded again.
        key = (str(app.ca_file), stat_stamps([app.ca_file])[0])
    context = _contexts.get(key)
    if context is None:
        context = _contexts[key] = _new_tls_context(app)
    return context


def reset_tls_contexts() -> None:
    """SIGHUP: every ``ca_file`` is read again for the next connection, even one replaced
    within the file system's timestamp granularity."""
    _contexts.clear()


def _new_tls_context(app: App) -> ssl.SSLContext:
    context = ssl.create_default_context()
    # Exchange Online refuses TLS < 1.2 (421 4.7.66); failing here is clearer.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if app.ca_file is not None:
        context.load_verify_locations(cafile=str(app.ca_file))
    return context


class LaneError(DeferError):
    """A failure of the path (connect, TLS, token, login), not of one message: every message
    for this mailbox would fail the same way, so the whole lane waits."""


class UpstreamConnection:
    """A reusable connection; ``send`` connects and logs in on first use or after a drop."""

    def __init__(self, *, app_name: str, app: App, mailbox: str, tokens: TokenProvider,
                 timeout: float = 60.0, local_hostname: str | None = None,
                 context: ssl.SSLContext | None = None, opened: Opened | None = None) -> None:
        self.opened = opened if opened is not None else Opened()  # the relay's, for /metrics
        self.app_name = app_name
        self.app = app
        self.mailbox = mailbox
        self._tokens = tokens
        self._timeout = timeout
        self._local_hostname = local_hostname
        self._context = context  # None: the app's, looked up per connection (reloads)
        self._smtp: aiosmtplib.SMTP | None = None
        self.last_used = time.monotonic()

    @property
    def relay(self) -> str:
        return f"{self.app.smtp_host}:{self.app.smtp_port}"

    @property
    def connected(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    def _ctx(self, sender: str = "") -> Context:
        return Context(mailbox=self.mailbox, sender=sender, app=self.app_name,
                       client_id=self.app.client_id, tenant=self.app.tenant,
                       smtp_host=self.app.smtp_host, smtp_port=self.app.smtp_port)

    def abort(self) -> None:
        """Drop the connection without QUIT: a command may still be waiting for its reply."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None or not smtp.is_connected:
            return
        try:
            await smtp.quit(timeout=5)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            smtp.close()

    async def login(self) -> None:
        """Connect and sign in without sending anything (``m365relay doctor``); raises what
        ``send`` would raise for the same failure."""
        if not self.connected:
            self._smtp = await self._connect()

    async def _connect(self) -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(hostname=self.app.smtp_host, port=self.app.smtp_port,
                               start_tls=True, tls_context=self._context or tls_context(self.app),
                               timeout=self._timeout,
                               local_hostname=self._local_hostname)
        stage = "connect"
        try:
            self.opened.total += 1
            await smtp.connect()
            stage = "ehlo"
            # aiosmtplib forgets the extensions after STARTTLS until we EHLO again.
            await smtp.ehlo()
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise self._lane_error(exc.code, exc.message, stage) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            smtp.close()
            explanation = explain_connection_error(exc, stage=stage, ctx=self._ctx())
            raise LaneError(f"cannot reach {self.relay}: {type(exc).__name__}: {exc}",
                            explanation=explanation) from None
        await self._login(smtp)
        log.info("upstream connected relay=%s mailbox=%s", self.relay, self.mailbox)
        return smtp

    async def _login(self, smtp: aiosmtplib.SMTP) -> None:
        for attempt in (1, 2):
            token = await self._tokens.token(self.app_name, self.mailbox)
            try:
                await smtp.auth_xoauth2(self.mailbox, token)
                return
            except aiosmtplib.SMTPAuthenticationError as exc:
                explanation = explain_smtp(exc.code, exc.message, stage="auth", ctx=self._ctx())
                # A rejected token may be stale or revoked: one fresh token is worth a try.
                if attempt == 1 and explanation.verdict is Verdict.RETRY_NEW_TOKEN:
                    self._tokens.invalidate(self.app_name, token, self.mailbox)
                    log.info("upstream auth rejected (%s %s); retrying once with a new token",
                             exc.code, exc.message)
                    if smtp.is_connected:
                        continue
                smtp.close()
                raise AuthRejected(f"{self.relay} rejected XOAUTH2 for {self.mailbox}: "
                                   f"{exc.code} {exc.message}", code=exc.code,
                                   status=enhanced_status(exc.message),
                                   reply=f"{exc.code} {exc.message}",
                                   explanation=explanation) from None
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                smtp.close()
                explanation = explain_connection_error(exc, stage="auth", ctx=self._ctx())
                raise LaneError(f"{self.relay} dropped the connection during AUTH: {exc}",
                                explanation=explanation) from None

    def _lane_error(self, code: int, message: str, stage: str) -> DeliveryError:
        explanation = explain_smtp(code, message, stage=stage, ctx=self._ctx())
        text = f"{self.relay} answered {code} {message} at {stage.upper()}"
        if explanation.verdict is Verdict.BOUNCE:
            return error_for(text, explanation, code=code, reply=message, stage=stage)
        return LaneError(text, code=code, status=enhanced_status(message),
                         reply=f"{code} {message}", explanation=explanation)

    async def send(self, mail_from: str, rcpts: list[str], body: Body
                   ) -> tuple[dict[str, DeliveryError], str]:
        """Send one message. Returns the recipients Exchange refused (the rest were accepted)
        and Exchange's final reply; raises DeliveryError when the message as a whole failed.

        ``body`` may be the message's pieces, or a spooled :class:`~relay.message.Message` that
        is read from its file while it is sent.

        More recipients than Exchange takes in one message go in several transactions on this
        connection, as Postfix's smtp_destination_recipient_limit does; once one transaction
        went through, a later one's failure is returned for its recipients only, so what was
        accepted is never sent twice."""
        if len(rcpts) <= RECIPIENTS_PER_MESSAGE:
            return await self._transaction(mail_from, rcpts, body)
        refused: dict[str, DeliveryError] = {}
        replies: list[str] = []
        for start in range(0, len(rcpts), RECIPIENTS_PER_MESSAGE):
            chunk = rcpts[start:start + RECIPIENTS_PER_MESSAGE]
            try:
                chunk_refused, reply = await self._transaction(mail_from, chunk, body)
            except DeliveryError as exc:
                if not replies:
                    raise
                refused.update(dict.fromkeys(chunk, exc))
                continue
            refused.update(chunk_refused)
            if reply:
                replies.append(reply)
        return refused, replies[0] if replies else ""

    async def _transaction(self, mail_from: str, rcpts: list[str], body: Body
                           ) -> tuple[dict[str, DeliveryError], str]:
        if not self.connected:
            self._smtp = await self._connect()
        smtp = self._smtp
        assert smtp is not None  # noqa: S101 - just connected
        ctx = self._ctx(mail_from)
        try:
            refused, reply = await send_mail(smtp, mail_from, rcpts, body,
                                             timeout=self._timeout)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            return {r.recipient: self._rcpt_error(r, ctx) for r in exc.recipients}, ""
        except aiosmtplib.SMTPSenderRefused as exc:
            raise self._message_error(exc.code, exc.message, "mail", ctx) from None
        except aiosmtplib.SMTPDataError as exc:
            raise self._message_error(exc.code, exc.message, "data", ctx) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise self._message_error(exc.code, exc.message, "data", ctx) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            explanation = explain_connection_error(exc, stage="data", ctx=ctx)
            raise DeferError(f"connection to {self.relay} lost while sending: "
                             f"{type(exc).__name__}: {exc}", explanation=explanation) from None
        finally:
            self.last_used = time.monotonic()
        return {
            rcpt: self._rcpt_error(aiosmtplib.SMTPRecipientRefused(r.code, r.message, rcpt), ctx)
            for rcpt, r in refused.items()
        }, f"250 {reply}"

    def _message_error(self, code: int, message: str, stage: str, ctx: Context) -> DeliveryError:
        if code == 421 or not self.connected:
            # 421 means the server closes the connection; reconnect for the next message.
            self._smtp = None
        explanation = explain_smtp(code, message, stage=stage, ctx=ctx)
        return error_for(f"{self.relay} answered {code} {message} at {stage.upper()}",
                         explanation, code=code, reply=message, stage=stage)

    def _rcpt_error(self, exc: aiosmtplib.SMTPRecipientRefused, ctx: Context) -> DeliveryError:
        explanation = explain_smtp(exc.code, exc.message, stage="rcpt", ctx=ctx)
        return error_for(f"{self.relay} refused <{exc.recipient}>: {exc.code} {exc.message}",
                         explanation, code=exc.code, reply=exc.message, stage="rcpt")
