"""A permanent failure's consequences, per recipient: counted and logged from its
:class:`~relay.diagnosis.errors.Outcome`, a DSN to the sender (spooled and delivered like any
message, from the same mailbox), and the copy kept aside in the store with its reason."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from relay.config.records import Config
from relay.delivery.dsn import build_dsn
from relay.delivery.events import Events
from relay.delivery.lanes import Counters
from relay.diagnosis.errors import Outcome, enhanced_status, log_extra
from relay.message import DeliveryState, Envelope, Message, QueueEntry
from relay.spool.base import Store

__all__ = ["Bouncer"]

log = logging.getLogger("m365relay.delivery")


class _Schedule(Protocol):
    """What bouncing needs from delivery: the live config, and the way to queue the DSN."""

    @property
    def config(self) -> Config: ...
    def submit(self, entry: QueueEntry) -> None: ...


class Bouncer:
    def __init__(self, schedule: _Schedule, store: Store, events: Events, counters: Counters, *,
                 clock: Callable[[], float], hostname: str) -> None:
        self._schedule = schedule
        self.store = store
        self.events = events
        self.counters = counters
        self._clock = clock
        self._hostname = hostname

    def given_up(self, entry: QueueEntry, age: float) -> Outcome | None:
        """Why this message bounces without an attempt (`m365relay queue bounce`, or older
        than delivery.max_age), or None."""
        state = entry.state
        if state.bounce_reason:
            return Outcome(state.bounce_reason, permanent=True,
                           status=enhanced_status(state.bounce_reason) or "5.0.0")
        if age > self._schedule.config.delivery.max_age:
            reason = (f"5.4.7 message expired: not delivered in {age / 86400:.1f} days "
                      f"(delivery.max_age); last error: {state.last_error or 'none'}")
            return Outcome(reason, status="5.4.7", permanent=True)
        return None

    def trail(self, entry: QueueEntry) -> str:
        """relay= and delay= of a maillog line, as Postfix writes them."""
        app = self._schedule.config.apps.get(entry.envelope.app)
        relay = f"{app.smtp_host}:{app.smtp_port}" if app is not None else "none"
        if app is not None and app.transport == "graph":
            relay = app.graph_endpoint.removeprefix("https://")
        return f"relay={relay}, delay={self._clock() - entry.envelope.received_at:.1f}"

    async def bounce(self, entry: QueueEntry, failed: dict[str, Outcome], data: Message,
                     keep: list[str] | None = None) -> None:
        """Count and log each failed recipient, send the sender a DSN, and (unless ``keep``
        names recipients still to retry) keep the message aside with its reason."""
        env = entry.envelope
        self.counters.bounced += len(failed)
        for rcpt, why in failed.items():
            log.error("%s: to=<%s>, %s, status=bounced (%s)", entry.id, rcpt,
                      self.trail(entry), why.text, extra=log_extra(why))
            self.events.record("bounced", entry, rcpt, why)
        if env.bounce_to:
            await self._send_dsn(entry, failed, data)
        if not keep:
            reason = "\n".join(f"<{r}>: {why.text}" for r, why in failed.items())
            try:
                path = await self.store.fail(entry.id, reason)
            except OSError as exc:
                # The DSN is out; the copy stays in queue/ and is bounced again on the next
                # start, which is better than losing the evidence.
                log.error("%s: cannot move to failed/: %s", entry.id, exc)
            else:
                log.info("%s: kept in %s", entry.id, path)

    async def _send_dsn(self, entry: QueueEntry, failed: dict[str, Outcome], message: Message
                        ) -> None:
        env = entry.envelope
        # Bounces are rare: reading a large message whole for its DSN is fine.
        data = message.data if message.data is not None else await asyncio.to_thread(
            message.read_all)
        dsn = build_dsn(queue_id=entry.id, envelope=env, failed=failed, original=data,
                        reporting_mta=self._hostname, from_addr=env.mailbox,
                        arrival=env.received_at, now=self._clock())
        # The DSN goes out through the same mailbox (Exchange only lets us send as it); its own
        # bounce_to is empty so a failing DSN never produces another DSN.
        dsn_env = Envelope(mail_from=env.mailbox, rcpt_tos=(env.bounce_to,), account=env.account,
                           app=env.app, mailbox=env.mailbox, bounce_to="", client="local",
                           received_at=self._clock(), original_from="", is_dsn=True)
        try:
            dsn_id = await self.store.commit(dsn_env, dsn)
        except OSError as exc:
            log.error("%s: cannot spool the DSN for <%s>: %s", entry.id, env.bounce_to, exc)
            return
        log.info("%s: sender non-delivery notification: %s", entry.id, dsn_id)
        self._schedule.submit(QueueEntry(dsn_id, dsn_env, DeliveryState(), len(dsn)))
