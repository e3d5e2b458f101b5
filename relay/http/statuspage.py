"""The status page at ``/``: what an admin checks first when a scanner's mail did not arrive.

Plain HTML, no script. Everything shown is escaped: recipients, error texts and account names
can carry whatever a device or an upstream server sent. Secrets are never on the page (it shows
client ids, which are not secret, and the explanations the log already has).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from relay import __version__
from relay.config.commands import command
from relay.http.metrics import QueueSummary

if TYPE_CHECKING:
    from relay.http.view import RelayView

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4}
td.detail{font-family:monospace;font-size:12px;word-break:break-word}
.ok,.sent{color:#1a7f37}.failing,.bounced{color:#b42318;font-weight:bold}
.deferred,.idle{color:#9a6700}.muted{color:#666}.nw{white-space:nowrap}
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _age(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(headers: Iterable[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def render(relay: RelayView, queue: QueueSummary, *, now: float | None = None) -> str:
    now = time.time() if now is None else now
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        '<meta http-equiv="refresh" content="30">',
        f"<title>m365relay on {_e(relay.hostname)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>m365relay on {_e(relay.hostname)}</h1>",
        f'<p class="muted">version {_e(__version__)} · {_e(_utc(now))} UTC · '
        '<a href="/metrics">metrics</a> · <a href="/readyz">readiness</a></p>',
        _queue(queue, now, relay.config_path),
        _tokens(relay, now),
        _recent(relay, now),
        "</body></html>",
    ]
    return "\n".join(parts)


def _queue(queue: QueueSummary, now: float, config_path: Path | None) -> str:
    if queue.oldest is None:
        summary = "The queue is empty."
    else:
        summary = (f"{queue.count} message(s) queued; the oldest arrived "
                   f"{_age(now - queue.oldest)} ago.")
    rows = [
        f"<tr><td>{_e(m.mailbox)}</td><td>{m.count}</td><td>{_e(_age(now - m.oldest))}</td>"
        f'<td class="detail">{_e(m.last_error or "no error so far")}</td></tr>'
        for m in queue.mailboxes
    ]
    if queue.held:
        release = command("queue", "release", "<id>", config=config_path)
        summary += f" {queue.held} message(s) on hold (`{release}`)."
    table = _table(["mailbox", "messages", "oldest", "last error"], rows, "") if rows else ""
    return f"<h2>Queue</h2><p>{_e(summary)}</p>{table}"


def _tokens(relay: RelayView, now: float) -> str:
    rows = []
    for name, app in sorted(relay.config.apps.items()):
        status = relay.tokens.status(name)
        if status.error:
            state = "needs sign-in" if app.flow == "delegated" else "failing"
            css, detail = "failing", status.error
        elif status.expires_at > now:
            state, css, detail = "ok", "ok", ""
        elif status.expires_at:
            state, css = "expired", "idle"
            detail = "fetched again on the next delivery"
        else:
            state, css, detail = "not requested yet", "idle", "fetched on the first delivery"
        expires = _age(status.expires_at - now) if status.expires_at > now else "—"
        rows.append(
            f'<tr><td>{_e(name)}</td><td class="nw">{_e(app.client_id)}</td>'
            f'<td class="{css} nw">{_e(state)}</td><td class="nw">{_e(expires)}</td>'
            f"<td>{status.requests} / {status.failures}</td>"
            f'<td class="detail">{_e(detail)}</td></tr>')
    return "<h2>Tokens</h2>" + _table(
        ["app", "client id", "state", "expires in", "requests / failures", "explanation"],
        rows, "No apps configured.")


def _recent(relay: RelayView, now: float) -> str:
    events = relay.delivery.events
    totals = {"sent": 0, "deferred": 0, "bounced": 0}
    for (status, _account, _code), value in events.outcomes.items():
        totals[status] = totals.get(status, 0) + value
    received = sum(events.received.values())
    summary = (f"Since the start: {received} message(s) received; recipients "
               f"{totals['sent']} delivered, {totals['deferred']} deferred, "
               f"{totals['bounced']} bounced.")
    rows = [
        f'<tr><td class="nw">{_e(_age(now - ev.time))} ago</td><td>{_e(ev.queue_id)}</td>'
        f"<td>{_e(ev.account)}</td><td>{_e(ev.recipient)}</td>"
        f'<td class="{_e(ev.status)}">{_e(ev.status)}</td>'
        f'<td class="detail">{_e(ev.detail)}</td></tr>'
        for ev in reversed(events.recent)
    ]
    return (f"<h2>Recent deliveries</h2><p>{_e(summary)}</p>"
            + _table(["when", "queue id", "account", "recipient", "status", "reply"], rows,
                     "Nothing delivered or tried since the start."))
