"""The HTTP endpoint: /metrics, /healthz, /readyz and the status page, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import smtplib
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, RelayFactory, message, send, wait_until
from prometheus_client.parser import text_string_to_metric_families

from relay.config import records as config_mod
from relay.sandbox import Sandbox
from relay.service.lifecycle import Relay, StartupError
from relay.service.logs import _JsonFormatter, log_fields, reply_code

# No proxy from the environment may sit between the test and the relay.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(address: tuple[str, int], path: str, method: str = "GET",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    url = f"http://{address[0]}:{address[1]}{path}"
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


async def get(relay: Relay, path: str, method: str = "GET",
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    assert relay.http_address is not None
    return await asyncio.to_thread(_get, relay.http_address, path, method, headers)


async def metrics(relay: Relay) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Scrape and parse with prometheus_client's own parser (so the format is checked too)."""
    status, headers, body = await get(relay, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def with_http(relays: RelayFactory, **http: Any) -> dict[str, Any]:
    data = relays.config()
    data["http"] = {"bind": "127.0.0.1:0", **http}
    data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]
    return data


async def test_metrics_move_while_sending(relays: RelayFactory, sandbox: Sandbox) -> None:
    relay = await relays.start(with_http(relays))
    before = await metrics(relay)
    assert value(before, "m365relay_messages_received_total", listener="local",
                 account="printers") == 0
    assert value(before, "m365relay_token_requests_total", app="contoso") == 0
    opened_before = value(before, "m365relay_upstream_connections_opened_total")

    async def scrape_while_sending() -> list[float]:
        seen = []
        while len(sandbox.exchange.messages) < 4:
            seen.append(value(await metrics(relay), "m365relay_messages_received_total",
                              listener="local", account="printers"))
        return seen

    scraping = asyncio.create_task(scrape_while_sending())
    address = relay.addresses["local"]
    for i in range(3):
        code, _ = await asyncio.to_thread(send, address, message(f"net {i}"))
        assert code == 250
    code, _ = await asyncio.to_thread(send, address, message("login"),
                                      login=("scanner01", PASSWORD))
    assert code == 250
    await sandbox.exchange.wait_for_messages(4)
    seen = await asyncio.wait_for(scraping, 10)
    assert seen == sorted(seen)  # counters never go back

    after = await metrics(relay)
    assert value(after, "m365relay_messages_received_total", listener="local",
                 account="printers") == 3
    assert value(after, "m365relay_messages_received_total", listener="local",
                 account="scanner") == 1
    assert value(after, "m365relay_delivered_total", account="printers") == 3
    assert value(after, "m365relay_delivered_total", account="scanner") == 1
    assert value(after, "m365relay_token_requests_total", app="contoso") == 1
    assert value(after, "m365relay_token_failures_total", app="contoso") == 0
    assert value(after, "m365relay_token_failing", app="contoso") == 0
    assert 3500 < value(after, "m365relay_token_expiry_seconds", app="contoso") <= 3600
    assert value(after, "m365relay_upstream_connections_opened_total") > opened_before
    # Workers keep their connection until delivery.idle_timeout, as the fake Exchange sees.
    assert value(after, "m365relay_upstream_connections_open") == \
        sandbox.exchange.open_connections >= 1
    # The spool entry goes right after Exchange's 250; the scrape reads the disk.
    await wait_until(lambda: not list((relays.tmp_path / "spool" / "queue").iterdir()))
    final = await metrics(relay)
    assert value(final, "m365relay_queue_messages") == 0
    assert value(final, "m365relay_queue_oldest_age_seconds") == 0
    assert value(final, "m365relay_smtp_auth_failures_total", listener="local") == 0

    with pytest.raises(smtplib.SMTPAuthenticationError):
        await asyncio.to_thread(send, address, message("x"), login=("scanner01", "wrong"))
    # smtplib tries PLAIN, then LOGIN: two failed logins.
    assert value(await metrics(relay), "m365relay_smtp_auth_failures_total",
                 listener="local") == 2


async def test_deferred_and_bounced_by_account_and_code(relays: RelayFactory,
                                                        sandbox: Sandbox) -> None:
    sandbox.exchange.inject("rcpt", "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found",
                            rcpt="gone@example.org")
    sandbox.exchange.inject("rcpt", "452 4.5.3 Too many recipients", rcpt="later@example.org")
    relay = await relays.start(with_http(relays))
    rcpts = ("ok@example.org", "gone@example.org", "later@example.org")
    await asyncio.to_thread(send, relay.addresses["local"], message("partial"), rcpts=rcpts)
    await sandbox.exchange.wait_for_messages(3)  # ok@, later@ on retry, the DSN
    await wait_until(lambda: relay.delivery.counters.delivered >= 3)
    samples = await metrics(relay)
    assert value(samples, "m365relay_bounced_total", account="printers", code="550") == 1
    assert value(samples, "m365relay_deferred_total", account="printers", code="452") == 1
    # ok@, later@ after the retry, and the DSN to the device's sender.
    assert value(samples, "m365relay_delivered_total", account="printers") == 3


async def test_token_failure_shows_in_metrics_and_status_page(
        relays: RelayFactory, sandbox: Sandbox, tmp_path: Path, password_hash: str) -> None:
    secret = tmp_path / "wrong-secret"
    secret.write_text("not-the-secret\n")
    data = with_http(relays)
    broken = dict(data["apps"]["contoso"], client_secret={"file": str(secret)})
    data["apps"]["broken"] = broken
    data["accounts"].insert(0, {"name": "copier", "username": "copier01",
                                "password_hash": password_hash, "app": "broken",
                                "mailbox": "copier@contoso.example"})
    relay = await relays.start(data)
    address = relay.addresses["local"]
    _, ok_reply = await asyncio.to_thread(send, address, message("fine"))
    _, stuck_reply = await asyncio.to_thread(send, address, message("stuck"),
                                             login=("copier01", PASSWORD))
    ok_id = ok_reply.decode().rsplit(" ", 1)[1]
    stuck_id = stuck_reply.decode().rsplit(" ", 1)[1]
    await sandbox.exchange.wait_for_messages(1)
    await wait_until(lambda: relay.tokens.status("broken").failures >= 1
                     and relay.delivery.counters.delivered >= 1
                     and relay.delivery.counters.deferred >= 1)

    samples = await metrics(relay)
    assert value(samples, "m365relay_token_failing", app="broken") == 1
    assert value(samples, "m365relay_token_failures_total", app="broken") >= 1
    assert value(samples, "m365relay_token_failing", app="contoso") == 0
    assert value(samples, "m365relay_deferred_total", account="copier", code="none") >= 1
    assert value(samples, "m365relay_queue_messages") == 1
    assert value(samples, "m365relay_queue_mailbox_messages",
                 mailbox="copier@contoso.example") == 1
    assert value(samples, "m365relay_queue_oldest_age_seconds") > 0

    status, headers, page = await get(relay, "/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert ok_id in page and stuck_id in page
    assert "AADSTS7000215" in page  # the explanation of the wrong secret
    assert "failing" in page
    assert "copier@contoso.example" in page  # queue per mailbox
    assert "1 message(s) queued" in page
    assert "not-the-secret" not in page
    assert (sandbox.directory / "demo-client-secret").read_text().strip() not in page
    # Script only from the same-origin file the CSP allows; none inline.
    assert re.findall(r"<script[^>]*>", page) == ['<script src="/status.js" defer>']
    assert "script-src 'self'" in headers["Content-Security-Policy"]

    # An operator puts the stuck message on hold: it leaves the queue count, shows as held.
    claim = await asyncio.to_thread(relay.spool.claim, stuck_id, wait=5)
    assert claim is not None
    try:
        await asyncio.to_thread(relay.spool.hold, stuck_id)
    finally:
        claim.release()
    samples = await metrics(relay)
    assert value(samples, "m365relay_queue_messages") == 0
    assert value(samples, "m365relay_queue_held_messages") == 1
    assert "1 message(s) on hold" in (await get(relay, "/"))[2]


async def test_status_page_escapes_client_strings(relays: RelayFactory,
                                                  sandbox: Sandbox) -> None:
    relay = await relays.start(with_http(relays))
    rcpt = '"<script>alert(1)</script>&"@example.org'
    code, _ = await asyncio.to_thread(send, relay.addresses["local"], message("xss"),
                                      rcpts=(rcpt,))
    assert code == 250
    await sandbox.exchange.wait_for_messages(1)
    await wait_until(lambda: relay.delivery.counters.delivered == 1)
    _, _, page = await get(relay, "/")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;" in page


async def test_readyz_reports_unwritable_spool(relays: RelayFactory, tmp_path: Path) -> None:
    relay = await relays.start(with_http(relays))
    status, _, body = await get(relay, "/readyz")
    assert (status, body) == (200, "ready\n")
    tmp = tmp_path / "spool" / "tmp"
    assert list(tmp.iterdir()) == []  # the probe cleans up after itself
    shutil.rmtree(tmp)
    tmp.write_text("not a directory\n")
    status, _, body = await get(relay, "/readyz")
    assert status == 503
    assert "spool not writable" in body
    assert "Not a directory" in body
    assert "spool.directory" in body
    tmp.unlink()
    tmp.mkdir()
    status, _, body = await get(relay, "/readyz")
    assert (status, body) == (200, "ready\n")


async def test_readyz_says_shutting_down_while_draining(relays: RelayFactory) -> None:
    relay = await relays.start(with_http(relays))
    address = relay.addresses["local"]
    loop = asyncio.get_running_loop()
    client = await loop.run_in_executor(None, lambda: smtplib.SMTP(*address, timeout=15))
    try:
        await asyncio.to_thread(client.ehlo, "device.test")
        await asyncio.to_thread(client.mail, "device@printers.example")
        await asyncio.to_thread(client.rcpt, "someone@example.org")
        stopping = asyncio.create_task(relays.stop(relay, timeout=10))
        # The relay waits for the client mid-transaction; meanwhile it is not ready.
        while (result := await get(relay, "/readyz"))[0] == 200:
            await asyncio.sleep(0.02)
        status, _, body = result
        assert status == 503
        assert "shutting down" in body
        code, _ = await asyncio.to_thread(client.data, message("last one"))
        assert code == 250
    finally:
        client.close()
    await asyncio.wait_for(stopping, 10)
    with pytest.raises(OSError):
        assert relay.http_address is not None
        socket.create_connection(relay.http_address, timeout=2).close()


async def test_healthz_routes_and_methods(relays: RelayFactory) -> None:
    relay = await relays.start(with_http(relays))
    assert (await get(relay, "/healthz"))[::2] == (200, "ok\n")
    status, headers, body = await get(relay, "/healthz", method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, "", "3")
    status, _, body = await get(relay, "/nope")
    assert status == 404
    assert "/metrics" in body
    status, headers, _ = await get(relay, "/metrics", method="POST")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    # Prometheus asking for OpenMetrics gets it.
    status, headers, body = await get(
        relay, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


async def test_garbage_and_slow_clients_do_not_hurt(relays: RelayFactory) -> None:
    relay = await relays.start(with_http(relays))
    assert relay.http_address is not None
    reader, writer = await asyncio.open_connection(*relay.http_address)
    writer.write(b"\x16\x03\x01garbage\r\n\r\n")
    await writer.drain()
    assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
    writer.close()
    reader, writer = await asyncio.open_connection(*relay.http_address)
    writer.write(b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n")
    await writer.drain()
    assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
    writer.close()
    # A client that connects and says nothing does not block others.
    _idle_reader, idle = await asyncio.open_connection(*relay.http_address)
    assert (await get(relay, "/healthz"))[0] == 200
    idle.close()


async def test_clients_outside_http_networks_are_refused(relays: RelayFactory) -> None:
    relay = await relays.start(with_http(relays, networks=["192.0.2.0/24"]))
    status, _, body = await get(relay, "/metrics")
    assert status == 403
    assert "http.networks" in body


def _listening_ports() -> set[int]:
    """TCP ports this process listens on, from /proc (sockets owned by our descriptors)."""
    fds = Path("/proc/self/fd")
    inodes = set()
    for fd in fds.iterdir():
        try:
            target = fd.readlink()
        except OSError:
            continue
        if str(target).startswith("socket:["):
            inodes.add(str(target)[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def test_http_is_off_by_default(relays: RelayFactory) -> None:
    before = _listening_ports()
    relay = await relays.start()
    assert relay.web is None and relay.http_address is None
    assert _listening_ports() - before == {relay.addresses["local"][1]}


async def test_http_port_in_use_fails_the_start(relays: RelayFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = with_http(relays)
        data["http"]["bind"] = f"127.0.0.1:{port}"
        config = config_mod.parse(data, base_dir=relays.tmp_path)
        relay = Relay(config)
        with pytest.raises(StartupError, match=r"http\.bind"):
            await relay.start()
    assert all(not server.is_serving() for server in relay.servers)


def test_http_config_errors_name_the_key(relays: RelayFactory) -> None:
    data = relays.config()
    data["http"] = {"bind": "everywhere", "networks": ["lan"], "port": 1}
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.parse(data)
    text = str(info.value)
    assert "http.bind: 'everywhere' is not HOST:PORT" in text
    assert "http.networks: 'lan' is not an IP address" in text
    assert "http.port: unknown key" in text
    data["http"] = {}
    assert config_mod.parse(data).http == config_mod.HttpSettings()
    assert config_mod.parse(data).http.bind == "127.0.0.1:9925"  # type: ignore[union-attr]


async def test_json_log_trail_carries_the_queue_id(relays: RelayFactory, sandbox: Sandbox,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    relay = await relays.start()
    with caplog.at_level(logging.INFO, logger="m365relay"):
        _, reply = await asyncio.to_thread(send, relay.addresses["local"], message("trail"))
        queue_id = reply.decode().rsplit(" ", 1)[1]
        await sandbox.exchange.wait_for_messages(1)
        await wait_until(lambda: any(r.getMessage() == f"{queue_id}: removed"
                                     for r in caplog.records))
    formatter = _JsonFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records]
    trail = [line for line in lines if line.get("queue_id") == queue_id]
    received, sent, removed = trail
    assert received["client"] == "127.0.0.1"
    assert received["account"] == "printers"
    assert received["from"] == "device@printers.example"
    assert sent["to"] == "someone@example.org"
    assert sent["relay"] == f"{sandbox.smtp_host}:{sandbox.smtp_port}"
    assert sent["status"] == "sent"
    assert sent["detail"].startswith("250 ")
    assert float(sent["delay"]) >= 0
    assert removed["message"] == f"{queue_id}: removed"
    assert all(line["level"] and line["logger"].startswith("m365relay") for line in trail)


def test_log_fields_and_reply_codes() -> None:
    line = ("0123456789ABCDE: to=<a@b.example>, relay=smtp.office365.com:587, delay=1.5, "
            "status=deferred (smtp.office365.com:587 answered 451 4.7.500 Server busy (try "
            "later) at DATA -- Exchange is busy. Fix: none), retry in 300s")
    fields = log_fields(line)
    assert fields == {"queue_id": "0123456789ABCDE", "to": "a@b.example",
                      "relay": "smtp.office365.com:587", "delay": "1.5", "status": "deferred",
                      "detail": "smtp.office365.com:587 answered 451 4.7.500 Server busy (try "
                                "later) at DATA -- Exchange is busy. Fix: none"}
    assert log_fields("connect from 127.0.0.1 on local") == {}
    assert log_fields("0123456789ABCDE: kept in /x") == {"queue_id": "0123456789ABCDE"}
    assert reply_code("250 2.0.0 OK") == "250"
    assert reply_code("h:587 refused <x@y>: 550 5.1.1 unknown") == "550"
    assert reply_code("cannot reach h:587: ConnectionRefusedError") == "none"
    assert reply_code("5.4.7 message expired") == "none"

