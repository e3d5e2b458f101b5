"""What ``m365relay queue`` prints: records for ``--json`` and aligned tables for people."""

from __future__ import annotations

import email.parser
import email.policy
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from relay.message import QueueEntry

__all__ = [
    "BUCKETS",
    "Item",
    "Shape",
    "format_list",
    "format_show",
    "format_summary",
    "header_fields",
    "item_json",
    "shape",
    "shape_json",
]

_ERROR_HOST = re.compile(r"^\S+:\d+ (?:answered|refused) ")
# qshape(1)'s age buckets in minutes: each column counts messages younger than its bound.
BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
SHOWN_HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID")


@dataclass(frozen=True)
class Item:
    """A message as the operator sees it: the spool entry plus where and how it sits."""

    entry: QueueEntry
    held: bool
    active: bool  # a delivery attempt holds it right now

    @property
    def status(self) -> str:
        if self.held:
            return "held"
        if self.active:
            return "active"
        if self.entry.state.bounce_reason:
            return "bouncing"
        return "deferred" if self.entry.state.attempts else "queued"

    @property
    def pending(self) -> tuple[str, ...]:
        state, env = self.entry.state, self.entry.envelope
        return state.pending_rcpts if state.pending_rcpts is not None else env.rcpt_tos


# ---------------------------------------------------------------------- json


def item_json(item: Item, now: float) -> dict[str, Any]:
    env, state = item.entry.envelope, item.entry.state
    return {
        "id": item.entry.id,
        "status": item.status,
        "folder": "hold" if item.held else "queue",
        "received_at": env.received_at,
        "age_seconds": round(max(now - env.received_at, 0.0), 3),
        "size": item.entry.size,
        "sender": env.mail_from,
        "original_sender": env.original_from,
        "recipients": list(env.rcpt_tos),
        "pending_recipients": list(item.pending),
        "account": env.account,
        "app": env.app,
        "mailbox": env.mailbox,
        "client": env.client,
        "bounce_to": env.bounce_to,
        "is_dsn": env.is_dsn,
        "attempts": state.attempts,
        "next_attempt_at": None if item.held else state.next_attempt_at,
        "last_error": state.last_error,
        "bounce_reason": state.bounce_reason,
    }


# ---------------------------------------------------------------------- list


def format_list(items: Sequence[Item], now: float, width: int) -> str:
    header = ("ID", "AGE", "SIZE", "TRIES", "STATUS", "NEXT", "SENDER", "RECIPIENTS")
    rows = [
        (it.entry.id, age(now - it.entry.envelope.received_at), size(it.entry.size),
         str(it.entry.state.attempts), it.status, _next(it, now),
         _cut(it.entry.envelope.mail_from or "<>", 32), _recipients(it.pending))
        for it in items
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    used = sum(widths) + 2 * len(widths)
    room = max(width - used, 30)  # the last error gets what the terminal has left

    def line(cells: Sequence[str], error: str) -> str:
        text = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
        return f"{text}  {error}".rstrip()

    out = [line(header, "LAST ERROR")]
    out += [line(row, _cut(short_error(it.entry.state.last_error), room))
            for row, it in zip(rows, items, strict=True)]
    return "\n".join(out)


def short_error(text: str) -> str:
    """The reply itself: "535 5.7.3 Authentication unsuccessful at AUTH", without the host
    in front or the explanation after " -- " (``show`` prints those)."""
    text = _ERROR_HOST.sub("", text, count=1)
    return text.split(" -- ", 1)[0]


def _next(item: Item, now: float) -> str:
    if item.held or item.active:
        return "-"
    wait = item.entry.state.next_attempt_at - now
    return "now" if wait <= 0 else f"in {age(wait)}"


def _recipients(rcpts: Sequence[str]) -> str:
    if not rcpts:
        return "-"
    first = _cut(rcpts[0], 32)
    return first if len(rcpts) == 1 else f"{first} (+{len(rcpts) - 1})"


# ---------------------------------------------------------------------- show


def format_show(item: Item, headers: Sequence[tuple[str, str]], path: str, now: float) -> str:
    env, state = item.entry.envelope, item.entry.state
    pending = set(item.pending)
    rcpts = [f"{r} ({'pending' if r in pending else 'done'})" for r in env.rcpt_tos]
    status = f"{item.status}, {state.attempts} attempt(s)" if state.attempts else item.status
    if not item.held and not item.active:
        status += f", next attempt {_next(item, now)}"
    sender = env.mail_from or "<>"
    if env.original_from and env.original_from != env.mail_from:
        sender += f" (the device gave {env.original_from})"
    fields = [
        ("Queue ID", item.entry.id),
        ("Status", status),
        ("File", path),
        ("Received", f"{_stamp(env.received_at)} ({age(now - env.received_at)} ago) from "
                     f"{env.client}"),
        ("Account", f"{env.account} (app {env.app}, mailbox {env.mailbox})"),
        ("Sender", sender),
        ("Recipients", "\n".join(rcpts) or "-"),
        ("Bounces to", env.bounce_to or "nobody (null sender or a bounce itself)"),
        ("Size", f"{item.entry.size:,} bytes"),
        ("Last error", state.last_error or "-"),
    ]
    if state.bounce_reason:
        fields.append(("Bounce", state.bounce_reason))
    label = max(len(k) for k, _ in fields) + 2
    out = []
    for key, value in fields:
        first, *rest = value.splitlines() or [""]
        out.append(f"{key + ':':<{label}}{first}")
        out += [" " * label + more for more in rest]
    out.append("")
    out.append("Headers:")
    out += [f"  {name}: {value}" for name, value in headers] or ["  (none)"]
    return "\n".join(out)


def header_fields(data: bytes) -> list[tuple[str, str]]:
    """The headers an operator looks for, decoded for display."""
    try:
        msg = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(data)
    except Exception:  # a damaged header block must not stop `show`
        return []
    out = []
    for name in SHOWN_HEADERS:
        for value in msg.get_all(name, []):
            try:
                text = str(value)
            except Exception:
                text = "(undecodable)"
            out.append((name, " ".join(text.split())))
    return out


# ---------------------------------------------------------------------- summary (qshape)


@dataclass(frozen=True)
class Shape:
    labels: tuple[str, ...]
    rows: list[tuple[str, list[int]]]  # key, counts per bucket (total first)


def shape(entries: Iterable[QueueEntry], now: float, by: str) -> Shape:
    """Messages per key and age bucket; the TOTAL row counts each message once, even when
    ``by="domain"`` counts it under each of its recipients' domains."""
    counts: dict[str, Counter[int]] = {}
    total: Counter[int] = Counter()
    for entry in entries:
        minutes = max(now - entry.envelope.received_at, 0.0) / 60
        bucket = next((i for i, bound in enumerate(BUCKETS) if minutes < bound), len(BUCKETS))
        total[bucket] += 1
        for key in _keys(entry, by):
            counts.setdefault(key, Counter())[bucket] += 1
    labels = ("T", *(f"{b}m" for b in BUCKETS), f"{BUCKETS[-1]}m+")
    rows = [(key, _cells(counter)) for key, counter in counts.items()]
    rows.sort(key=lambda r: (-r[1][0], r[0]))
    return Shape(labels, [("TOTAL", _cells(total)), *rows])


def _cells(counter: Counter[int]) -> list[int]:
    cells = [counter[i] for i in range(len(BUCKETS) + 1)]
    return [sum(cells), *cells]


def _keys(entry: QueueEntry, by: str) -> list[str]:
    env = entry.envelope
    if by == "account":
        return [env.account]
    if by == "domain":
        rcpts = entry.state.pending_rcpts if entry.state.pending_rcpts is not None \
            else env.rcpt_tos
        return sorted({r.rpartition("@")[2].lower() or r for r in rcpts}) or ["-"]
    return [env.mailbox.lower()]


def format_summary(result: Shape, by: str) -> str:
    key_width = max([len(by), *(len(k) for k, _ in result.rows)])
    widths = [max(len(label), *(len(str(c[i])) for _, c in result.rows))
              for i, label in enumerate(result.labels)]

    def line(key: str, cells: Sequence[str]) -> str:
        return "  ".join([key.ljust(key_width),
                          *(c.rjust(w) for c, w in zip(cells, widths, strict=True))])

    out = [line(by, result.labels)]
    out += [line(key, [str(c) for c in counts]) for key, counts in result.rows]
    return "\n".join(out)


def shape_json(result: Shape, by: str) -> dict[str, Any]:
    bounds = [0, *BUCKETS]
    buckets = [{"label": f"{lo}-{hi}m", "min_minutes": lo, "max_minutes": hi}
               for lo, hi in zip(bounds, BUCKETS, strict=False)]
    buckets.append({"label": f"{BUCKETS[-1]}m+", "min_minutes": BUCKETS[-1],
                    "max_minutes": None})
    (_, total), *rows = result.rows
    return {
        "by": by,
        "buckets": buckets,
        "total": {"count": total[0], "counts": total[1:]},
        "rows": [{"key": key, "count": c[0], "counts": c[1:]} for key, c in rows],
    }


# ---------------------------------------------------------------------- units


def age(seconds: float) -> str:
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"  # pragma: no cover - the loop always returns


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"
