"""What happened to mail, kept in memory for ``/metrics`` and the status page.

Counts are per recipient (like the maillog lines), keyed by account and the upstream reply
code, because "which device's mail fails, and with what" is the first question an admin asks.
Only the last few outcomes are kept in full; the log has the rest.
"""

from __future__ import annotations

import re
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from relay.message import QueueEntry

NO_CODE = "none"  # no SMTP reply: network, TLS, token, expiry, internal errors

# The reply code inside DeliveryError texts from relay.upstream.smtp: "HOST:PORT answered 550 ..."
# and "HOST:PORT refused <rcpt>: 550 ...". Anchored on those words so the port never matches.
_CODE = re.compile(r"(?:\banswered|>:) ([2-5]\d\d)\b")
_QUEUE_ID = re.compile(r"([0-9A-HJKMNP-TV-Z]{15}): ")
_KEY = re.compile(r"([a-z_]+)=")


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


class Events:
    """Counters and a ring of recent delivery outcomes for one relay."""

    def __init__(self, size: int = 50, clock: Callable[[], float] = time.time) -> None:
        self.recent: deque[Event] = deque(maxlen=size)
        self.outcomes: Counter[tuple[str, str, str]] = Counter()  # (status, account, code)
        self.received: Counter[tuple[str, str]] = Counter()  # (listener, account)
        self._clock = clock

    def accepted(self, listener: str, entry: QueueEntry) -> None:
        self.received[(listener, entry.envelope.account)] += 1

    def record(self, status: str, entry: QueueEntry, recipient: str, detail: str,
               code: int | None = None) -> None:
        label = str(code) if code else reply_code(detail)
        env = entry.envelope
        self.outcomes[(status, env.account, label)] += 1
        self.recent.append(Event(self._clock(), entry.id, env.account, env.mailbox, recipient,
                                 status, label, detail))


def reply_code(text: str) -> str:
    """The upstream SMTP reply code quoted in a delivery error or reply text."""
    if text[:3].isdigit() and text[:1] in "2345" and text[3:4] in {"", " ", "-"}:
        return text[:3]
    match = _CODE.search(text)
    return match.group(1) if match else NO_CODE


def log_fields(message: str) -> dict[str, str]:
    """Structured fields of a maillog-style line, for JSON logs.

    ``"3F2A...: to=<a@b>, relay=h:587, delay=0.4, status=sent (250 ok)"`` gives queue_id, to,
    relay, delay, status and detail. Parsing stops at the first part that is not ``key=value``,
    so free text after the fields never turns into bogus keys.
    """
    match = _QUEUE_ID.match(message)
    if match is None:
        return {}
    fields = {"queue_id": match.group(1)}
    pos = match.end()
    while (key := _KEY.match(message, pos)) is not None:
        pos = key.end()
        if message.startswith("<", pos):
            close = message.find(">", pos)
            end = len(message) if close < 0 else close + 1
            value = message[pos + 1:end if close < 0 else close]
        else:
            end = pos
            while end < len(message) and message[end] not in ", ":
                end += 1
            value = message[pos:end]
        fields[key.group(1)] = value
        pos = end
        if message.startswith(" (", pos):
            close = _matching_paren(message, pos + 1)
            fields["detail"] = message[pos + 2:close]
            pos = close + 1
        if not message.startswith(", ", pos):
            break
        pos += 2
    return fields


def _matching_paren(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return len(text)
