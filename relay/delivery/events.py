"""What happened to mail, kept in memory for ``/metrics`` and the status page.

Counts are per recipient (like the maillog lines), keyed by account and the upstream reply
code (the :class:`~relay.diagnosis.errors.Outcome` field, never parsed back out of a text),
because "which device's mail fails, and with what" is the first question an admin asks.
Only the last few outcomes are kept in full; the log has the rest.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from relay.diagnosis.errors import Outcome
from relay.message import QueueEntry

NO_CODE = "none"  # no SMTP reply: network, TLS, token, expiry, internal errors


@dataclass(frozen=True)
class Event:
    time: float
    queue_id: str
    account: str
    mailbox: str
    recipient: str
    status: str  # sent | deferred | bounced
    code: str  # upstream reply code, or NO_CODE
    detail: str  # the upstream reply, or what went wrong and how to fix it


class Latency:
    """A cumulative histogram of seconds (Prometheus buckets), kept without prometheus_client:
    the listener records into it on every message, and /metrics is optional."""

    # From a fsync on a fast SSD (~1 ms) to a spool on a struggling network disk.
    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, count) pairs as the exposition format has them, +Inf last."""
        out, total = [], 0
        for bound, count in zip((*self.BUCKETS, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out


class Events:
    """Counters and a ring of recent delivery outcomes for one relay."""

    def __init__(self, size: int = 50, clock: Callable[[], float] = time.time) -> None:
        self.recent: deque[Event] = deque(maxlen=size)
        self.outcomes: Counter[tuple[str, str, str]] = Counter()  # (status, account, code)
        self.received: Counter[tuple[str, str]] = Counter()  # (listener, account)
        self._clock = clock

    def accepted(self, listener: str, entry: QueueEntry) -> None:
        self.received[(listener, entry.envelope.account)] += 1

    def record(self, status: str, entry: QueueEntry, recipient: str, outcome: Outcome
               ) -> None:
        """Count one recipient's outcome by its fields (the reply code), never its text."""
        env = entry.envelope
        self.outcomes[(status, env.account, outcome.label)] += 1
        self.recent.append(Event(self._clock(), entry.id, env.account, env.mailbox, recipient,
                                 status, outcome.label, outcome.text))
