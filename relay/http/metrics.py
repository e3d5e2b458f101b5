"""``/metrics``: the relay's live state in Prometheus text format.

A collector reads the relay's own bookkeeping at scrape time (delivery events, token states,
listener counters, the spool) instead of counters sprinkled through the code, and each relay has
its own registry, so nothing is global. Counts of mail are per recipient, like the log lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from relay import __version__
from relay.message import QueueEntry
from relay.spool.base import Store

if TYPE_CHECKING:
    from relay.http.view import RelayView


@dataclass(frozen=True)
class MailboxQueue:
    mailbox: str
    count: int
    oldest: float  # received_at of the oldest message, unix time
    last_error: str  # of the most recently tried message; "" if none failed yet


@dataclass(frozen=True)
class QueueSummary:
    count: int
    oldest: float | None
    mailboxes: tuple[MailboxQueue, ...]  # most messages first
    held: int = 0  # put on hold by an operator (`m365relay queue hold`); not delivered


def summarize(entries: list[QueueEntry], held: int = 0) -> QueueSummary:
    groups: dict[str, list[QueueEntry]] = {}
    for entry in entries:
        groups.setdefault(entry.envelope.mailbox.lower(), []).append(entry)
    mailboxes = []
    for group in groups.values():
        tried = [e for e in group if e.state.last_error]
        last = max(tried, key=lambda e: e.state.next_attempt_at) if tried else None
        mailboxes.append(MailboxQueue(
            mailbox=group[0].envelope.mailbox, count=len(group),
            oldest=min(e.envelope.received_at for e in group),
            last_error=last.state.last_error if last is not None else ""))
    mailboxes.sort(key=lambda m: (-m.count, m.mailbox))
    oldest = min((e.envelope.received_at for e in entries), default=None)
    return QueueSummary(len(entries), oldest, tuple(mailboxes), held)


async def read_queue(store: Store) -> QueueSummary:
    """The queue as the store has it (which includes messages waiting for a retry). Looking
    must not change it, so nothing is quarantined."""
    return summarize(await store.entries(quarantine=False), len(await store.held_entries()))


class RelayCollector(Collector):
    """Yields the metric families from one relay's state. ``queue`` is refreshed by the HTTP
    server (asynchronously, it reads the disk) right before each scrape."""

    def __init__(self, relay: RelayView, clock: Callable[[], float] = time.time) -> None:
        self.relay = relay
        self.queue = QueueSummary(0, None, ())
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        yield from self._mail()
        yield from self._queue()
        yield from self._tokens()
        yield from self._connections()
        yield from self._pacing()
        info = InfoMetricFamily("m365relay_build", "m365relay version")
        info.add_metric([], {"version": __version__})
        yield info

    def _mail(self) -> Iterator[Metric]:
        config = self.relay.config
        events = self.relay.delivery.events
        accounts = [a.name for a in config.accounts]
        received = CounterMetricFamily(
            "m365relay_messages_received", "Messages accepted from devices and spooled",
            labels=["listener", "account"])
        counts = dict(events.received)
        for listener in config.listeners:
            for account in accounts:
                counts.setdefault((listener.name, account), 0)
        for (listener_name, account), value in sorted(counts.items()):
            received.add_metric([listener_name, account], value)
        yield received

        delivered = CounterMetricFamily(
            "m365relay_delivered", "Recipients accepted by Exchange Online", labels=["account"])
        sent = dict.fromkeys(accounts, 0)
        failed: dict[str, dict[tuple[str, str], int]] = {"deferred": {}, "bounced": {}}
        for (status, account, code), value in events.outcomes.items():
            if status == "sent":
                sent[account] = sent.get(account, 0) + value
            else:
                failed.setdefault(status, {})[(account, code)] = value
        for account, value in sorted(sent.items()):
            delivered.add_metric([account], value)
        yield delivered
        for status, doc in (
                ("deferred", "Recipients deferred for a retry, by upstream reply code "
                             "(none: connection, TLS or token failure)"),
                ("bounced", "Recipients failed permanently (DSN sent, copy in failed/), by "
                            "upstream reply code (none: expired or no SMTP reply)")):
            family = CounterMetricFamily(f"m365relay_{status}", doc, labels=["account", "code"])
            for (account, code), value in sorted(failed[status].items()):
                family.add_metric([account, code], value)
            yield family

    def _queue(self) -> Iterator[Metric]:
        queue = self.queue
        yield GaugeMetricFamily("m365relay_queue_messages",
                                "Messages in the spool waiting for delivery", value=queue.count)
        yield GaugeMetricFamily("m365relay_queue_held_messages",
                                "Messages an operator put on hold", value=queue.held)
        age = max(self._clock() - queue.oldest, 0.0) if queue.oldest is not None else 0.0
        yield GaugeMetricFamily("m365relay_queue_oldest_age_seconds",
                                "Age of the oldest queued message (0 when empty)", value=age)
        by_mailbox = GaugeMetricFamily("m365relay_queue_mailbox_messages",
                                       "Queued messages per sending mailbox", labels=["mailbox"])
        for mailbox in queue.mailboxes:
            by_mailbox.add_metric([mailbox.mailbox], mailbox.count)
        yield by_mailbox

    def _tokens(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("m365relay_token_requests",
                                       "Token requests sent to Entra ID", labels=["app"])
        failures = CounterMetricFamily("m365relay_token_failures",
                                       "Token requests that failed", labels=["app"])
        failing = GaugeMetricFamily("m365relay_token_failing",
                                    "1 if the app's last token request failed", labels=["app"])
        expiry = GaugeMetricFamily(
            "m365relay_token_expiry_seconds",
            "Seconds until the app's current token expires (0 when none or expired; tokens "
            "are fetched on demand, so an idle relay's token may lapse)", labels=["app"])
        now = self._clock()
        for app in sorted(self.relay.config.apps):
            status = self.relay.tokens.status(app)
            requests.add_metric([app], status.requests)
            failures.add_metric([app], status.failures)
            failing.add_metric([app], 1 if status.error else 0)
            expiry.add_metric([app], max(status.expires_at - now, 0.0))
        signin = GaugeMetricFamily(
            "m365relay_signin_needed", "1 if an account of a `flow: delegated` app must sign in "
            "again with `m365relay login ACCOUNT`", labels=["account"])
        delegated = self.relay.tokens.delegated
        for account in delegated.statuses() if delegated is not None else []:
            signin.add_metric([account.account], 1 if account.needs_login else 0)
        yield from (requests, failures, failing, expiry, signin)

    def _connections(self) -> Iterator[Metric]:
        delivery = self.relay.delivery
        yield CounterMetricFamily(
            "m365relay_upstream_connections_opened",
            "Connections to Exchange Online opened (attempts, SMTP and Graph, by this relay)",
            value=delivery.opened.total)
        yield GaugeMetricFamily(
            "m365relay_upstream_connections_open", "Connections to Exchange Online open now",
            value=sum(1 for conn in list(delivery.connections) if conn.connected))
        auth = CounterMetricFamily("m365relay_smtp_auth_failures",
                                   "Failed device logins (AUTH PLAIN/LOGIN)", labels=["listener"])
        sessions = GaugeMetricFamily("m365relay_smtp_sessions", "Device SMTP sessions open now",
                                     labels=["listener"])
        for listener in self.relay.listener_snapshots():
            auth.add_metric([listener.name], listener.auth_failures)
            sessions.add_metric([listener.name], listener.sessions)
        yield auth
        yield sessions


    def _pacing(self) -> Iterator[Metric]:
        pacer = self.relay.delivery.pacer
        recipients = GaugeMetricFamily(
            "m365relay_mailbox_recipients_24h",
            "Recipients accepted per sending mailbox in the last 24 hours (Exchange Online "
            "refuses more than 10,000)", labels=["mailbox"])
        for mailbox, count in pacer.recipients_24h().items():
            recipients.add_metric([mailbox], count)
        yield recipients
        rate = GaugeMetricFamily(
            "m365relay_mailbox_pacing_rate",
            "Messages a minute a mailbox may send now (below delivery.pacing.messages_per_minute "
            "after a throttling reply)", labels=["app", "mailbox"])
        for (app, mailbox) in sorted(pacer.lanes):
            rate.add_metric([app, mailbox], pacer.rate((app, mailbox)))
        yield rate


def new_registry(collector: RelayCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    # process_* (CPU, memory, open files) matter for a service left running for months.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry
