"""``/metrics``: the relay's live state in Prometheus text format.

A collector reads the relay's own bookkeeping at scrape time (delivery events, token states,
listener counters, the spool) instead of counters sprinkled through the code, and each relay has
its own registry, so nothing is global. Counts of mail are per recipient, like the log lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from relay import __version__
from relay.http.certinfo import CertificateDates
from relay.http.queueview import AGE_CLASSES, QueueSummary, read_queue

__all__ = ["QueueSummary", "RelayCollector", "new_registry", "read_queue"]

if TYPE_CHECKING:
    from relay.http.view import RelayView


class RelayCollector(Collector):
    """Yields the metric families from one relay's state. ``queue`` is refreshed by the HTTP
    server (asynchronously, it reads the disk) right before each scrape."""

    def __init__(self, relay: RelayView, clock: Callable[[], float] = time.time,
                 http_certificate: Path | None = None) -> None:
        self.relay = relay
        self.queue = QueueSummary(0, None, ())
        self._clock = clock
        self._http_certificate = http_certificate
        self._certificates = CertificateDates()

    def collect(self) -> Iterator[Metric]:
        yield from self._mail()
        yield from self._queue()
        yield from self._tokens()
        yield from self._connections()
        yield from self._pacing()
        yield from self._listeners()
        yield from self._certs()
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
        # 0 while the queue cannot be read (cluster mode: the database is away); the queue's
        # gauges are then left out rather than reported as an empty queue.
        yield GaugeMetricFamily("m365relay_spool_up", "Whether the queue could be read",
                                value=0 if queue.unavailable else 1)
        if queue.unavailable:
            return
        yield from self._cluster(queue)
        yield GaugeMetricFamily("m365relay_queue_messages",
                                "Messages in the spool waiting for delivery", value=queue.count)
        yield GaugeMetricFamily("m365relay_queue_held_messages",
                                "Messages an operator put on hold", value=queue.held)
        age = max(self._clock() - queue.oldest, 0.0) if queue.oldest is not None else 0.0
        yield GaugeMetricFamily("m365relay_queue_oldest_age_seconds",
                                "Age of the oldest queued message (0 when empty)", value=age)
        yield GaugeMetricFamily(
            "m365relay_queue_deferred_messages",
            "Queued messages that failed at least once and wait for a retry", value=queue.deferred)
        by_age = GaugeMetricFamily(
            "m365relay_queue_messages_by_age",
            "Queued messages by age class (le: upper bound of the class)", labels=["le"])
        for (label, _), count in zip(AGE_CLASSES, queue.ages, strict=True):
            by_age.add_metric([label], count)
        yield by_age
        spool = self.relay.config.spool
        if queue.free_bytes is not None:
            yield GaugeMetricFamily("m365relay_spool_free_bytes",
                                    "Free space on the spool's filesystem", value=queue.free_bytes)
        yield GaugeMetricFamily(
            "m365relay_spool_min_free_bytes",
            "spool.min_free_space: below it new mail is refused with 452",
            value=spool.min_free_space)
        by_mailbox = GaugeMetricFamily("m365relay_queue_mailbox_messages",
                                       "Queued messages per sending mailbox", labels=["mailbox"])
        for mailbox in queue.mailboxes:
            by_mailbox.add_metric([mailbox.mailbox], mailbox.count)
        yield by_mailbox

    @staticmethod
    def _cluster(queue: QueueSummary) -> Iterator[Metric]:
        """Cluster mode: each relay sharing the queue, as the database sees it. Every node
        reports the same rows (and the same cluster-wide queue gauges): aggregate with max()
        by node, not sum()."""
        if not queue.nodes:
            return
        families = {
            "up": GaugeMetricFamily("m365relay_cluster_node_up",
                                    "Whether the node's lease is current (it is alive)",
                                    labels=["node"]),
            "owned": GaugeMetricFamily("m365relay_cluster_node_messages",
                                       "Queued messages the node schedules", labels=["node"]),
            "claimed": GaugeMetricFamily("m365relay_cluster_node_claims",
                                         "Messages the node holds a lease on (in flight)",
                                         labels=["node"]),
            "slots": GaugeMetricFamily("m365relay_cluster_node_connection_slots",
                                       "Upstream connection slots the node holds",
                                       labels=["node"]),
        }
        for node in queue.nodes:
            families["up"].add_metric([node.name], int(node.alive))
            families["owned"].add_metric([node.name], node.owned)
            families["claimed"].add_metric([node.name], node.claimed)
            families["slots"].add_metric([node.name], node.slots)
        yield from families.values()

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
        per_mailbox = GaugeMetricFamily(
            "m365relay_upstream_mailbox_connections",
            "Connections to Exchange Online (or Graph sessions) open now per sending mailbox; "
            "Exchange allows 3 (delivery.connections_per_mailbox)", labels=["app", "mailbox"])
        counts: dict[tuple[str, str], int] = {}
        for conn in list(delivery.connections):
            key = (conn.app_name, conn.mailbox.lower())
            counts[key] = counts.get(key, 0) + (1 if conn.connected else 0)
        for (app, mailbox), count in sorted(counts.items()):
            per_mailbox.add_metric([app, mailbox], count)
        yield per_mailbox
        auth = CounterMetricFamily("m365relay_smtp_auth_failures",
                                   "Failed device logins (AUTH PLAIN/LOGIN)", labels=["listener"])
        sessions = GaugeMetricFamily("m365relay_smtp_sessions", "Device SMTP sessions open now",
                                     labels=["listener"])
        for listener in self.relay.listener_snapshots():
            auth.add_metric([listener.name], listener.auth_failures)
            sessions.add_metric([listener.name], listener.sessions)
        yield auth
        yield sessions
        yield from self._logins()

    def _logins(self) -> Iterator[Metric]:
        guard = self.relay.auth_guard
        yield CounterMetricFamily(
            "m365relay_smtp_auth_password_checks",
            "argon2 password checks run for device logins (the credential cache spares the "
            "rest; auth_limits.cache_ttl)", value=guard.password_checks)
        yield CounterMetricFamily(
            "m365relay_smtp_auth_cache_hits",
            "Device logins recognised by the credential cache, with no argon2 check",
            value=guard.cache_hits)
        refusals = CounterMetricFamily(
            "m365relay_smtp_auth_refusals",
            "Device logins refused without a password check: blocked (too many failures, "
            "auth_limits) or busy (no check slot in time)", labels=["cause"])
        for cause, count in sorted(guard.refusals.items()):
            refusals.add_metric([cause], count)
        yield refusals

    def _listeners(self) -> Iterator[Metric]:
        latency = HistogramMetricFamily(
            "m365relay_smtp_ack_seconds",
            "From the end of DATA to the relay's reply (250 once the message is fsynced)",
            labels=["listener"])
        for listener in self.relay.listener_snapshots():
            latency.add_metric([listener.name], list(listener.ack_buckets), listener.ack_sum)
        yield latency

    def _certs(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "m365relay_certificate_expiry_timestamp_seconds",
            "notAfter of a certificate as unix time (kind: app = apps.NAME.certificate, "
            "listener = listeners[].certificate, http = http.tls.certificate)",
            labels=["kind", "name"])
        for kind, name, when in self._certificates.collect(self.relay.config,
                                                           self._http_certificate):
            family.add_metric([kind, name], when)
        yield family

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
        throttled = CounterMetricFamily(
            "m365relay_throttled",
            "Throttling replies from Exchange Online or Graph (432 4.3.2, 429, 4.7.500 'server "
            "busy'), per sending mailbox", labels=["app", "mailbox"])
        for (app, mailbox), count in sorted(pacer.throttle_replies.items()):
            throttled.add_metric([app, mailbox], count)
        yield throttled


def new_registry(collector: RelayCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    # process_* (CPU, memory, open files) matter for a service left running for months.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry
