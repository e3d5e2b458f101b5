"""The status page at ``/``: what an admin checks first when a scanner's mail did not arrive.

One data model (:func:`status_data`) serves both the HTML rendered here and ``/api/status``,
which the page's script (``/status.js``, a same-origin file: the CSP allows no inline script)
fetches every few seconds to redraw the page in place, draw the queue-age chart and show times
in the viewer's time zone. Without script the page is complete too, in UTC, and reloads
itself. Everything shown is escaped (``textContent`` in the script): recipients, error texts
and account names carry whatever a device or an upstream server sent. Secrets are never on the
page (it shows client ids, which are not secret, and the explanations the log already has).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime
from html import escape
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay import __version__
from relay.config.commands import command
from relay.http.metrics import QueueSummary
from relay.http.queueview import AGE_CLASSES

if TYPE_CHECKING:
    from relay.http.view import RelayView

ASSETS = {"/status.js": ("status.js", "text/javascript; charset=utf-8"),
          "/status.css": ("status.css", "text/css; charset=utf-8"),
          # Named in the page, so browsers do not ask for /favicon.ico (a 404 in the console).
          "/favicon.svg": ("favicon.svg", "image/svg+xml")}
AGE_LABELS = ("under 1m", "1-5m", "5-15m", "15m-1h", "1-6h", "6h-1d", "over 1d")
REFRESH_SECONDS = 5


def asset(path: str) -> tuple[bytes, str]:
    name, content_type = ASSETS[path]
    return resources.files("relay.http.static").joinpath(name).read_bytes(), content_type


def _age(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


# --- the data model ---------------------------------------------------------------------------


def status_data(relay: RelayView, queue: QueueSummary, *, now: float | None = None
                ) -> dict[str, Any]:
    now = time.time() if now is None else now
    waiting_ids = {w.id for w in queue.waiting}
    return {
        "hostname": relay.hostname, "version": __version__, "now": now,
        "refresh": REFRESH_SECONDS,
        "queue": {
            "count": queue.count, "held": queue.held, "deferred": queue.deferred,
            "oldest": queue.oldest, "summary": _queue_summary(queue, now, relay.config_path),
            "ages": [{"label": label, "class": name, "count": count} for label, (name, _), count
                     in zip(AGE_LABELS, AGE_CLASSES, queue.ages, strict=True)],
            "mailboxes": [{"mailbox": m.mailbox, "count": m.count, "oldest": m.oldest,
                           "age": _age(now - m.oldest),
                           "last_error": m.last_error or "no error so far"}
                          for m in queue.mailboxes]},
        "waiting": [{"id": w.id, "account": w.account, "mailbox": w.mailbox,
                     "recipients": list(w.recipients), "received_at": w.received_at,
                     "attempts": w.attempts, "next_attempt_at": w.next_attempt_at,
                     "last_error": w.last_error or "no error recorded"}
                    for w in queue.waiting],
        "tokens": _tokens(relay, now),
        "cluster": [{"node": n.name, "me": n.name == queue.node, "alive": n.alive,
                     "started": n.started_at, "seen_ago": _age(now - n.seen_at),
                     "owned": n.owned, "claimed": n.claimed, "slots": n.slots}
                    for n in queue.nodes],
        **_recent(relay, now, waiting_ids),
    }


def _queue_summary(queue: QueueSummary, now: float, config_path: Path | None) -> str:
    if queue.unavailable:
        return f"The queue cannot be read: {queue.unavailable}"
    if queue.oldest is None:
        summary = "The queue is empty."
    else:
        summary = (f"{queue.count} message(s) queued; the oldest arrived "
                   f"{_age(now - queue.oldest)} ago.")
        if queue.deferred:
            summary += f" {queue.deferred} wait(s) for a retry."
    if queue.held:
        release = command("queue", "release", "<id>", config=config_path)
        summary += f" {queue.held} message(s) on hold (`{release}`)."
    return summary


def _tokens(relay: RelayView, now: float) -> list[dict[str, Any]]:
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
        rows.append({"app": name, "client_id": app.client_id, "state": state, "css": css,
                     "expires_in": _age(status.expires_at - now)
                     if status.expires_at > now else "—",
                     "requests": status.requests, "failures": status.failures,
                     "detail": detail})
    return rows


def _recent(relay: RelayView, now: float, waiting: set[str]) -> dict[str, Any]:
    events = relay.delivery.events
    totals = {"sent": 0, "deferred": 0, "bounced": 0}
    for (status, _account, _code), value in events.outcomes.items():
        totals[status] = totals.get(status, 0) + value
    received = sum(events.received.values())
    summary = (f"Since the start: {received} message(s) received; recipients "
               f"{totals['sent']} delivered, {totals['deferred']} deferred, "
               f"{totals['bounced']} bounced.")
    recent = [{"time": ev.time, "ago": _age(now - ev.time), "queue_id": ev.queue_id,
               "account": ev.account, "recipient": ev.recipient, "status": ev.status,
               "detail": ev.detail,
               "waiting": ev.status == "deferred" and ev.queue_id in waiting}
              for ev in reversed(events.recent)]
    return {"totals": {"received": received, **totals}, "summary": summary, "recent": recent}


# --- HTML (the same sections /status.js redraws from /api/status) ----------------------------


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _time(timestamp: float) -> str:
    """UTC for the page without script; the script rewrites it in the viewer's zone."""
    when = datetime.fromtimestamp(timestamp, UTC)
    return (f'<time datetime="{when.isoformat()}" data-unix="{timestamp:.3f}">'
            f'{when.strftime("%Y-%m-%d %H:%M:%S")} UTC</time>')


def _table(headers: Iterable[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def render(relay: RelayView, queue: QueueSummary, *, now: float | None = None) -> str:
    data = status_data(relay, queue, now=now)
    host = _e(data["hostname"])
    return "\n".join([
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        # Without script the page reloads itself; with it, /status.js refreshes in place.
        '<noscript><meta http-equiv="refresh" content="30"></noscript>',
        f'<title>m365relay on {host}</title><link rel="stylesheet" href="/status.css">'
        '<link rel="icon" href="/favicon.svg" type="image/svg+xml">',
        '<script src="/status.js" defer></script></head><body>',
        f"<h1>m365relay on {host}</h1>",
        f'<p class="muted">version {_e(data["version"])} · updated '
        f'<span id="updated">{_time(data["now"])}</span> · <a href="/metrics">metrics</a> · '
        '<a href="/readyz">readiness</a> · <a href="/api/status">JSON</a> '
        '<span id="refresh-state"></span></p>',
        f'<section id="queue">{_queue_html(data)}</section>',
        f'<section id="waiting">{_waiting_html(data)}</section>',
        f'<section id="tokens">{_tokens_html(data)}</section>',
        f'<section id="cluster">{_cluster_html(data)}</section>',
        f'<section id="recent">{_recent_html(data)}</section>',
        "</body></html>",
    ])


def _queue_html(data: dict[str, Any]) -> str:
    queue = data["queue"]
    rows = [f"<tr><td>{_e(m['mailbox'])}</td><td>{m['count']}</td><td>{_e(m['age'])}</td>"
            f'<td class="detail">{_e(m["last_error"])}</td></tr>' for m in queue["mailboxes"]]
    ages = " · ".join(f"{_e(a['label'])}: {a['count']}" for a in queue["ages"] if a["count"])
    table = _table(["mailbox", "messages", "oldest", "last error"], rows, "") if rows else ""
    return (f'<h2>Queue</h2><p id="queue-summary">{_e(queue["summary"])}</p>'
            f'<figure id="age-chart" aria-label="queued messages by age">'
            f'<figcaption class="muted">{ages or "no queued messages"}</figcaption></figure>'
            f"{table}")


def _waiting_html(data: dict[str, Any]) -> str:
    rows, reasons = [], []
    for w in data["waiting"]:
        rows.append(
            f'<tr><td class="nw">{_e(w["id"])}</td><td>{_e(w["account"])}</td>'
            f'<td>{_e(", ".join(w["recipients"]))}</td><td>{w["attempts"]}</td>'
            f'<td class="nw">{_time(w["next_attempt_at"])}</td>'
            f'<td><a href="#why-{_e(w["id"])}">why?</a></td></tr>')
        reasons.append(f'<div class="why" id="why-{_e(w["id"])}"><h3>{_e(w["id"])}: why it '
                       f'waits</h3><p class="detail">{_e(w["last_error"])}</p></div>')
    return ("<h2>Waiting for a retry</h2>"
            + _table(["queue id", "account", "recipients", "attempts", "next try", ""], rows,
                     "No message waits for a retry.") + "".join(reasons))


def _tokens_html(data: dict[str, Any]) -> str:
    rows = [
        f'<tr><td>{_e(t["app"])}</td><td class="nw">{_e(t["client_id"])}</td>'
        f'<td class="{_e(t["css"])} nw">{_e(t["state"])}</td><td class="nw">'
        f'{_e(t["expires_in"])}</td><td>{t["requests"]} / {t["failures"]}</td>'
        f'<td class="detail">{_e(t["detail"])}</td></tr>' for t in data["tokens"]]
    return "<h2>Tokens</h2>" + _table(
        ["app", "client id", "state", "expires in", "requests / failures", "explanation"],
        rows, "No apps configured.")


def _cluster_html(data: dict[str, Any]) -> str:
    """Cluster mode only: the relays sharing the queue database."""
    if not data["cluster"]:
        return ""
    rows = [
        f'<tr><td>{_e(n["node"])}{" (this relay)" if n["me"] else ""}</td>'
        f'<td class="{"ok" if n["alive"] else "failing"}">{"alive" if n["alive"] else "gone"}'
        f'</td><td class="nw">{_time(n["started"])}</td><td>{_e(n["seen_ago"])} ago</td>'
        f'<td>{n["owned"]}</td><td>{n["claimed"]}</td><td>{n["slots"]}</td></tr>'
        for n in data["cluster"]]
    return "<h2>Cluster</h2>" + _table(
        ["node", "state", "started", "last seen", "queued", "in flight", "connection slots"],
        rows, "")


def _recent_html(data: dict[str, Any]) -> str:
    rows = []
    for ev in data["recent"]:
        status = _e(ev["status"])
        if ev["waiting"]:
            status = f'<a href="#why-{_e(ev["queue_id"])}">{status}</a>'
        rows.append(
            f'<tr><td class="nw">{_time(ev["time"])} ({_e(ev["ago"])} ago)</td>'
            f'<td>{_e(ev["queue_id"])}</td><td>{_e(ev["account"])}</td>'
            f'<td>{_e(ev["recipient"])}</td><td class="{_e(ev["status"])}">{status}</td>'
            f'<td class="detail">{_e(ev["detail"])}</td></tr>')
    return (f'<h2>Recent deliveries</h2><p id="recent-summary">{_e(data["summary"])}</p>'
            + _table(["when", "queue id", "account", "recipient", "status", "reply"], rows,
                     "Nothing delivered or tried since the start."))
