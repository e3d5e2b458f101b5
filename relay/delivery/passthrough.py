"""``delivery: passthrough``: the upstream transaction happens while the client waits at the end
of DATA, and the client gets Exchange Online's verdict.

* every recipient accepted: ``250``, and nothing is spooled;
* the message refused as a whole, or every recipient refused: Exchange's code and text (a 4xx
  stays 4xx, a 5xx stays 5xx), and nothing is spooled: the client keeps its copy and decides;
* Exchange unreachable, or no connection slot for the mailbox free in time: ``451``/``421``-class
  4xx, so the client retries; an accepted message is never lost;
* some recipients accepted and some refused: the client already had ``250`` for each RCPT and
  the message is out for the others, so it gets ``250``; the refused recipients go to the spool:
  transient refusals are retried like any queued message, permanent ones get a DSN to the
  sender (as a spooled message would). If the spool cannot take them, ``451``: the client
  resends (duplicates for the accepted recipients beat losing the others).

Connections are the delivery lanes' slots (``delivery.connections_per_mailbox``), borrowed for
one transaction, so passthrough and spooled mail together never exceed Exchange's limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from relay.delivery.pacing import Pacer
from relay.delivery.scheduler import Upstream
from relay.diagnosis.errors import BounceError, DeliveryError
from relay.message import Content, DeliveryState, Envelope, QueueEntry, content_size
from relay.spool.base import Store

log = logging.getLogger("m365relay.passthrough")

_MAX_TEXT = 400  # SMTP reply lines stay under 512 octets (RFC 5321 4.5.3.1.5)


def client_reply(exc: DeliveryError) -> str:
    """The reply for the client: the upstream's class and code where it has one."""
    permanent = isinstance(exc, BounceError)
    digit = "5" if permanent else "4"
    code = exc.code if exc.code is not None and str(exc.code).startswith(digit) else None
    if code is None:
        code = 554 if permanent else 451
    text = " ".join(exc.describe().split())
    status = exc.status if exc.status.startswith(digit) else f"{digit}.4.0"
    if len(text) > _MAX_TEXT:
        text = text[: _MAX_TEXT - 3] + "..."
    return f"{code} {status} Upstream refused: {text}"


class Lanes(Protocol):
    """What a passthrough transaction takes from delivery (:class:`Delivery` is one): a slot
    of the mailbox's connections, a connection, the mailbox's pace, and the way back into the
    queue for refused recipients."""

    @property
    def pacer(self) -> Pacer: ...
    def slot_limit(self) -> int: ...
    def borrow(self, app: str, mailbox: str, timeout: float
               ) -> AbstractAsyncContextManager[bool]: ...
    def upstream(self, app_name: str, mailbox: str) -> Upstream | None: ...
    def delivered(self, mailbox: str, count: int) -> None: ...
    def submit(self, entry: QueueEntry) -> None: ...


class Passthrough:
    def __init__(self, lanes: Lanes, store: Store, *, slot_timeout: float = 30.0) -> None:
        self.lanes = lanes
        self.store = store
        self.slot_timeout = slot_timeout

    async def transact(self, client: str, env: Envelope, data: Content) -> str:
        """Send now; return the reply for the client's DATA. ``data`` may be the message's
        pieces (header block, body as received): sent and spooled without joining them."""
        async with self.lanes.borrow(env.app, env.mailbox, self.slot_timeout) as ok:
            if not ok:
                limit = self.lanes.slot_limit()
                log.warning("%s: passthrough for %s refused: all %d connections for the "
                            "mailbox busy for %.0fs", client, env.mailbox, limit,
                            self.slot_timeout)
                return (f"451 4.3.2 Mailbox {env.mailbox} has all {limit} connections in use "
                        "(delivery.connections_per_mailbox); try again shortly")
            conn = self.lanes.upstream(env.app, env.mailbox)
            if conn is None:
                return (f"451 4.3.5 App {env.app} is not configured (apps.{env.app}); "
                        "try again after the configuration is fixed")
            rcpts = list(env.rcpt_tos)
            # Passthrough counts against the same per-mailbox pace as spooled delivery, so a
            # burst from an application cannot trip Exchange's throttling either.
            key = (env.app, env.mailbox.lower())
            pacer = self.lanes.pacer
            try:
                admitted = await asyncio.wait_for(pacer.admit(key), self.slot_timeout)
            except TimeoutError:
                await conn.close()
                return (f"451 4.7.0 Mailbox {env.mailbox} is at its sending pace "
                        "(delivery.pacing.messages_per_minute); try again shortly")
            if not admitted:
                await conn.close()
                return "451 4.3.2 Service shutting down, try again later"
            try:
                refused, reply = await conn.send(env.mail_from, rcpts, data)
            except DeliveryError as exc:
                pacer.throttled(key, exc)
                log.warning("%s: passthrough from=<%s> for %s failed: %s", client,
                            env.original_from, env.mailbox, exc.describe())
                return client_reply(exc)
            except Exception as exc:  # a bug must still leave the client a 4xx, not a 250
                log.exception("%s: passthrough failed unexpectedly", client)
                return f"451 4.3.0 Local error while sending upstream ({type(exc).__name__})"
            finally:
                pacer.done(key)
                await conn.close()
        accepted = [r for r in rcpts if r not in refused]
        self.lanes.delivered(env.mailbox, len(accepted))
        for rcpt in accepted:
            log.info("passthrough: client=%s, to=<%s>, app=%s, status=sent (%s)", client,
                     rcpt, env.app, reply)
        if not refused:
            return f"250 2.0.0 Ok: delivered ({' '.join(reply.split())[:_MAX_TEXT]})"
        if not accepted:
            transient = [e for e in refused.values() if not isinstance(e, BounceError)]
            return client_reply(transient[0] if transient else next(iter(refused.values())))
        return await self._spool_refused(client, env, data, refused)

    async def _spool_refused(self, client: str, env: Envelope, data: Content,
                             refused: dict[str, DeliveryError]) -> str:
        later = tuple(r for r, e in refused.items() if not isinstance(e, BounceError))
        bounced = {r: e for r, e in refused.items() if isinstance(e, BounceError)}
        try:
            if later:
                await self._queue(env, later, data, DeliveryState())
            if bounced:
                reason = "; ".join(f"<{r}>: {e.describe()}" for r, e in bounced.items())
                await self._queue(env, tuple(bounced), data,
                                  DeliveryState(bounce_reason=reason[:2000]))
        except Exception as exc:
            log.error("%s: passthrough partly delivered, and the refused recipients cannot be "
                      "spooled (%s); asking the client to resend", client, exc)
            return "451 4.3.0 Partly delivered; local error keeping the rest, try again later"
        for rcpt, error in refused.items():
            log.warning("passthrough: client=%s, to=<%s> refused (%s); queued for %s", client,
                        rcpt, error.describe(), "a DSN" if rcpt in bounced else "retry")
        return (f"250 2.0.0 Ok: delivered to {len(env.rcpt_tos) - len(refused)} recipient(s); "
                f"{len(refused)} refused upstream and queued (retry or non-delivery report)")

    async def _queue(self, env: Envelope, rcpts: tuple[str, ...], data: Content,
                     state: DeliveryState) -> None:
        part = Envelope(mail_from=env.mail_from, rcpt_tos=rcpts, account=env.account,
                        app=env.app, mailbox=env.mailbox, bounce_to=env.bounce_to,
                        client=env.client, received_at=time.time(),
                        original_from=env.original_from)
        queue_id = await self.store.commit(part, data)
        if state.bounce_reason:
            await self.store.save_state(queue_id, state)
        self.lanes.submit(QueueEntry(queue_id, part, state, content_size(data)))
