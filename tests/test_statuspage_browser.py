"""The status page in a real headless Chromium: what an admin sees, with the CSP holding.

The relay has mail delivered, deferred and bounced and a delegated account that must sign in
(tests/watchrelay.py). Set UPDATE_SCREENSHOT=1 to write docs/status-page.png (the README's).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from cdp import Page, chromium, trust_certificate_flag
from conftest import PASSWORD, RelayFactory, TLSFiles, message, send
from pgserver import PgServer
from watchrelay import BUSY, SANDBOX_APPS, Watched, start_watched

from relay.sandbox import Sandbox

pytestmark = pytest.mark.slow
ZONE = "Asia/Kolkata"  # UTC+05:30: a shift no test machine's own zone hides
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "status-page.png"
# Registered before any page script runs (DevTools scripts are not subject to the CSP).
_WATCH_CSP = """window.__csp = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__csp.push(e.violatedDirective + " " + e.blockedURI));"""


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with Sandbox(tmp_path / "sandbox", apps=SANDBOX_APPS) as box:
        yield box


async def open_page(page: Page, watched: Watched) -> None:
    assert watched.relay.http_address is not None
    host, port = watched.relay.http_address
    await page.send("Page.addScriptToEvaluateOnNewDocument", source=_WATCH_CSP)
    await page.send("Page.navigate", url=f"http://{host}:{port}/")
    await page.wait_event("Page.loadEventFired")
    await page.wait_for("Number(document.body.dataset.refreshed || 0) >= 1")


def text_of(selector: str) -> str:
    return f"document.querySelector({json.dumps(selector)}).innerText"


def local(unix: float) -> str:
    when = datetime.fromtimestamp(unix, ZoneInfo(ZONE))
    offset = when.strftime("%z")
    return when.strftime("%Y-%m-%d %H:%M:%S") + f" UTC{offset[:3]}:{offset[3:]}"


async def test_status_page_in_chromium(relays: RelayFactory, sandbox: Sandbox,
                                       tls_files: TLSFiles, tmp_path: Path) -> None:
    watched = await start_watched(relays, sandbox, tls_files)
    async with chromium(tmp_path / "profile") as browser:
        page = await browser.new_page(timezone=ZONE, height=1000)
        await open_page(page, watched)

        queue = await page.evaluate(text_of("#queue-summary"))
        assert "2 message(s) queued" in queue and "2 wait(s) for a retry" in queue
        recent = await page.evaluate(text_of("#recent-summary"))
        assert ("4 message(s) received; recipients 2 delivered, 2 deferred, 1 bounced"
                in recent)
        tokens = await page.evaluate(text_of("#tokens"))
        assert "needs sign-in" in tokens
        assert "m365relay login personal" in tokens  # the sign-in hint, with the command
        rows = await page.evaluate("""[...document.querySelectorAll('#recent tr')].slice(1)
            .map((tr) => [...tr.cells].map((td) => td.innerText))""")
        by_id = {row[1]: row for row in rows}
        assert by_id[watched.bounced_id][4] == "bounced"
        assert "The recipient address does not exist" in by_id[watched.bounced_id][5]
        assert by_id[watched.deferred_id][4] == "deferred"
        assert "Exchange Online is temporarily restricting" in by_id[watched.deferred_id][5]
        assert "sent" in {row[4] for row in rows}

        # Times in the viewer's zone, from the same instants the server rendered in UTC.
        stamps = await page.evaluate("""[...document.querySelectorAll('time[data-unix]')]
            .map((t) => [Number(t.dataset.unix), t.textContent])""")
        assert stamps
        for unix, shown in stamps:
            assert shown == local(unix)

        # Queue age at a glance: both queued messages are under a minute old.
        bars = await page.evaluate("""[...document.querySelectorAll('#age-chart svg rect')]
            .map((r) => [r.dataset.class, Number(r.dataset.count),
                         Number(r.getAttribute('height'))])""")
        assert len(bars) == 7
        assert bars[0][:2] == ["1m", 2] and bars[0][2] > 0
        assert all(count == 0 and height == 0 for _, count, height in bars[1:])

        # Each deferred message links to its explanation, with the fix.
        link = f'#recent a[href="#why-{watched.deferred_id}"]'
        await page.evaluate(f"document.querySelector({json.dumps(link)}).click()")
        assert await page.evaluate("location.hash") == f"#why-{watched.deferred_id}"
        why = await page.evaluate(text_of(f"#why-{watched.deferred_id}"))
        assert BUSY in await page.evaluate(text_of("#waiting")) and "Fix:" in why
        assert await page.evaluate(f"""getComputedStyle(document.getElementById(
            'why-{watched.deferred_id}')).backgroundColor""") == "rgb(255, 248, 230)"

        if os.environ.get("UPDATE_SCREENSHOT") == "1":
            await page.evaluate("window.scrollTo(0, 0)")
            shot = await page.send("Page.captureScreenshot", format="png",
                                   captureBeyondViewport=True)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))

        # New mail shows without a reload: the page refreshes itself from /api/status.
        await page.evaluate("window.__stayed = true")
        address = watched.relay.addresses["local"]
        code, _ = await asyncio.to_thread(send, address, message("later"),
                                          rcpts=("later@example.org",))
        assert code == 250
        await page.wait_for(f"{text_of('#recent-summary')}.includes('5 message(s) received')")
        assert await page.evaluate("window.__stayed") is True
        assert await page.evaluate("document.querySelectorAll('#recent tr').length") == \
            len(rows) + 2  # the new row and the header

        assert page.console_problems() == []
        assert await page.evaluate("window.__csp") == []

        # The CSP holds: an inline script injected into the page does not run, and is reported.
        await page.evaluate("""(() => { const s = document.createElement('script');
            s.textContent = 'window.__inline = 1'; document.body.append(s); })()""")
        violations = await page.wait_for("window.__csp.length && window.__csp")
        assert violations[0].startswith("script-src-elem inline")
        assert await page.evaluate("window.__inline") is None


async def test_page_without_script_is_complete_and_says_utc(
        relays: RelayFactory, sandbox: Sandbox, tls_files: TLSFiles, tmp_path: Path) -> None:
    watched = await start_watched(relays, sandbox, tls_files)
    async with chromium(tmp_path / "profile") as browser:
        page = await browser.new_page(timezone=ZONE)
        await page.send("Emulation.setScriptExecutionDisabled", value=True)
        assert watched.relay.http_address is not None
        host, port = watched.relay.http_address
        await page.send("Page.navigate", url=f"http://{host}:{port}/")
        await page.wait_event("Page.loadEventFired")
        body = await page.evaluate("document.body.innerText")
        assert "2 message(s) queued" in body and "needs sign-in" in body
        assert " UTC\n" in body or " UTC " in body
        assert "UTC+05:30" not in body
        assert await page.evaluate("document.body.dataset.refreshed") is None


async def test_status_page_over_tls_with_basic_auth(
        relays: RelayFactory, sandbox: Sandbox, tls_files: TLSFiles, tmp_path: Path) -> None:
    """The admin's setup beyond loopback: HTTPS and a password. The page's own refreshes go
    through with the credentials the browser was given once."""
    watched = await start_watched(
        relays, sandbox, tls_files,
        tls={"certificate": str(tls_files.cert), "private_key": str(tls_files.key)},
        basic_auth_users={"admin": relays.password_hash})
    assert watched.relay.http_address is not None
    host, port = watched.relay.http_address
    trust = trust_certificate_flag(tls_files.cert.read_bytes())
    async with chromium(tmp_path / "profile", trust) as browser:
        page = await browser.new_page(timezone=ZONE)
        await page.log_in("admin", PASSWORD)
        await page.send("Page.addScriptToEvaluateOnNewDocument", source=_WATCH_CSP)
        await page.send("Page.navigate", url=f"https://{host}:{port}/")
        await page.wait_event("Page.loadEventFired")
        assert await page.evaluate("location.protocol") == "https:"
        # Two refreshes from /api/status: the first at load, the next 5 s later.
        await page.wait_for("Number(document.body.dataset.refreshed || 0) >= 2", timeout=20)
        assert "needs sign-in" in await page.evaluate(text_of("#tokens"))
        challenges = [p for name, p in page.events if name == "Fetch.authRequired"]
        assert len(challenges) == 1  # asked once, for the page; the script's fetches reuse it
        assert page.console_problems() == []
        assert await page.evaluate("window.__csp") == []


async def test_cluster_table_is_drawn_by_the_script(
        relays: RelayFactory, sandbox: Sandbox, pg_server: PgServer, tmp_path: Path) -> None:
    """Cluster mode: the page's script redraws the Cluster table from /api/status, with no
    error and within the CSP, and shows both nodes."""
    dsn = pg_server.dsn(pg_server.new_database("page"))
    data = relays.config()
    data["http"] = {"bind": "127.0.0.1:0"}
    data["spool"] = {"postgres": dsn, "node": "web-a", "lease": "5s"}
    relay = await relays.start(data)
    other = relays.config()
    other["spool"] = {"postgres": dsn, "node": "web-b", "lease": "5s"}
    await relays.start(other)
    assert relay.http_address is not None
    host, port = relay.http_address
    async with chromium(tmp_path / "profile") as browser:
        page = await browser.new_page(timezone=ZONE)
        await page.send("Page.addScriptToEvaluateOnNewDocument", source=_WATCH_CSP)
        await page.send("Page.navigate", url=f"http://{host}:{port}/")
        await page.wait_event("Page.loadEventFired")
        await page.wait_for("Number(document.body.dataset.refreshed || 0) >= 1")
        table = await page.evaluate(text_of("#cluster"))
        assert "web-a (this relay)" in table and "web-b" in table, table
        assert "alive" in table and "connection slots" in table
        assert await page.evaluate("window.__csp") == []
