"""SIGHUP reloads the files the config names, not only the YAML: a token endpoint with a new CA
(a sandbox restart, a TLS-inspecting proxy's new CA) and a rotated client secret are picked up,
and a lane paused for that cause delivers at once instead of waiting out its backoff."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
import yaml
from conftest import MAILBOX, PASSWORD, base_config, message, send, wait_until
from test_delegated import ME, login, start, write_config
from test_delegated import box as box  # noqa: PLC0414 - the fixture, used by name
from test_lifecycle import RelayProcess

from relay.config import records as config_mod
from relay.sandbox import DEMO_APP, Sandbox, SandboxApp
from relay.service.lifecycle import Relay

ROTATED = SandboxApp(tenant=DEMO_APP.tenant, client_id=DEMO_APP.client_id,
                     client_secret="rotated-sandbox-secret")  # the sandbox's only


@pytest.fixture
async def boxes(tmp_path: Path) -> AsyncIterator[list[Sandbox]]:
    """Sandboxes started by the test (a restart is a new one on the same directory and ports);
    each is stopped at the end."""
    started: list[Sandbox] = []
    yield started
    for started_box in started:
        await started_box.stop()


async def start_box(boxes: list[Sandbox], directory: Path, *, like: Sandbox | None = None,
                    apps: tuple[SandboxApp, ...] = (DEMO_APP,), graph: bool = False
                    ) -> Sandbox:
    if like is not None:
        await like.stop()
        boxes.remove(like)
    box = Sandbox(directory, apps=apps, entra_port=like.entra_port if like else 0,
                  smtp_port=like.smtp_port if like else 0, graph=graph)
    await box.start()
    boxes.append(box)
    return box


def slow_backoff(data: dict[str, Any]) -> dict[str, Any]:
    # The lane stayed paused for 1,200 s: a retry on schedule must not be what
    # makes these tests pass.
    data["delivery"].update(min_backoff=600, max_backoff=1200)
    return data


async def send_one(port: int, subject: str) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        await client.sendmail("device@printers.example", ["a@example.org"], message(subject))


async def test_sighup_after_a_new_token_endpoint_ca_and_secret_delivers_at_once(
        boxes: list[Sandbox], tmp_path: Path, password_hash: str) -> None:
    """The issue's scenario, as a real process: sandbox restarted (new CA, new secret), HUP."""
    box = await start_box(boxes, tmp_path / "sandbox")
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(slow_backoff(base_config(box, tmp_path, password_hash))))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(path),
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    relay = RelayProcess(proc)
    try:
        await relay.wait_ready()
        await send_one(relay.port, "before")
        await box.exchange.wait_for_messages(1)

        box = await start_box(boxes, tmp_path / "sandbox", like=box, apps=(ROTATED,))
        await send_one(relay.port, "after restart")
        await wait_until(lambda: any("CERTIFICATE_VERIFY_FAILED" in line
                                     for line in relay.lines), timeout=30)
        assert any("paused for 600s" in line for line in relay.lines), relay.lines[-5:]

        proc.send_signal(signal.SIGHUP)
        (got,) = await box.exchange.wait_for_messages(1, timeout=30)  # not 600 s later
        assert b"Subject: after restart" in got.data
        # The new sandbox takes only the rotated secret: the token came from the new file.
        assert box.entra.token_requests
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await relay.wait(timeout=30)


async def test_sighup_rebuilds_only_what_a_changed_file_feeds(
        boxes: list[Sandbox], tmp_path: Path, password_hash: str) -> None:
    """Only the CA file changes (same secret): the token client is rebuilt all the same."""
    box = await start_box(boxes, tmp_path / "sandbox")
    path = tmp_path / "relay.yaml"
    data = slow_backoff(base_config(box, tmp_path, password_hash))
    path.write_text(yaml.safe_dump(data))
    relay = Relay(config_mod.load(path), config_path=path)
    await relay.start()
    try:
        port = relay.addresses["local"][1]
        await send_one(port, "one")
        await box.exchange.wait_for_messages(1)
        client = relay.tokens.client("contoso")

        relay.reload()  # nothing changed: the token client and its token stay
        assert relay.tokens.client("contoso") is client

        box = await start_box(boxes, tmp_path / "sandbox", like=box)
        await send_one(port, "two")
        await wait_until(lambda: relay.delivery.counters.deferred >= 1, timeout=30)
        assert "CERTIFICATE_VERIFY_FAILED" in relay.tokens.status("contoso").error

        relay.reload()
        (got,) = await box.exchange.wait_for_messages(1, timeout=15)
        assert b"Subject: two" in got.data
        assert relay.tokens.client("contoso") is not client
    finally:
        await relay.stop(timeout=5)


@pytest.mark.parametrize("tmpdir", ["watched", "missing"])
async def test_relay_needs_no_temporary_directory(
        boxes: list[Sandbox], tmp_path: Path, password_hash: str, tmpdir: str) -> None:
    """A read-only root file system with no /tmp (issue 13): nothing may need a temporary
    directory, with or without `ca_file`, through start, deliveries and a reload.

    "watched": TMPDIR names an empty, writable directory: Python's tempfile takes it first, so
    anything temporary the relay made would show up there (as root, /tmp cannot be made
    unwritable). "missing": TMPDIR names a directory that does not exist."""
    box = await start_box(boxes, tmp_path / "sandbox")
    data = base_config(box, tmp_path, password_hash)
    data["accounts"][0]["app"] = "plain"  # no ca_file: trusts the system's CAs (and fails)
    data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]
    data["apps"]["plain"] = {k: v for k, v in data["apps"]["contoso"].items() if k != "ca_file"}
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(data))
    watched = tmp_path / "tmpdir"
    if tmpdir == "watched":
        watched.mkdir()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(path),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(watched)})
    relay = RelayProcess(proc)
    try:
        await relay.wait_ready()
        await send_one(relay.port, "with ca_file")
        await box.exchange.wait_for_messages(1)
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port) as client:
            await client.login("scanner01", PASSWORD)
            await client.sendmail(MAILBOX, ["a@example.org"], message("no ca_file"))
        await wait_until(lambda: any("CERTIFICATE_VERIFY_FAILED" in line
                                     for line in relay.lines), timeout=30)
        proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: any("config reloaded" in line for line in relay.lines))
        await send_one(relay.port, "after reload")
        await box.exchange.wait_for_messages(2)
        # While running: a stop would clean up.
        if tmpdir == "watched":
            assert list(watched.iterdir()) == []
        else:
            assert not watched.exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await relay.wait(timeout=30)
    assert code == 0, relay.lines
    assert not any("Traceback" in line for line in relay.lines), relay.lines


async def test_sighup_leaves_a_pause_the_server_asked_for(
        boxes: list[Sandbox], tmp_path: Path, password_hash: str) -> None:
    """A 421 at connect is Exchange's own "come back later": a reload must not end it, or every
    SIGHUP would hammer a server that asked for a break."""
    box = await start_box(boxes, tmp_path / "sandbox")
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(slow_backoff(base_config(box, tmp_path, password_hash))))
    relay = Relay(config_mod.load(path), config_path=path)
    await relay.start()
    try:
        box.exchange.inject("connect", "421 4.3.2 Service not available, closing channel")
        await send_one(relay.addresses["local"][1], "later")
        await wait_until(lambda: relay.delivery.counters.deferred >= 1
                         and relay.delivery.workers() == 0, timeout=15)
        relay.reload()
        assert relay.delivery.workers() == 0  # a retry would start one at once (_kick)
        assert box.exchange.messages == []
        # The same message and path after a token failure would be retried (the other tests);
        # here only the operator's `queue retry` or the backoff end it.
    finally:
        await relay.stop(timeout=5)


def test_which_pauses_a_reload_may_end() -> None:
    from relay.delivery.scheduler import AppMissing, reload_may_fix
    from relay.diagnosis.errors import AuthRejected, DeferError, TokenError
    from relay.upstream.smtp import LaneError

    assert reload_may_fix(TokenError("AADSTS7000215 invalid secret"))
    assert reload_may_fix(LaneError("CERTIFICATE_VERIFY_FAILED"))
    assert reload_may_fix(AuthRejected("535 5.7.3", code=535))
    assert reload_may_fix(AppMissing("apps.x is gone"))
    assert not reload_may_fix(LaneError("421 4.3.2", code=421))
    assert not reload_may_fix(LaneError("Graph 429", retry_after=30))
    assert not reload_may_fix(DeferError("451 4.3.0 one message"))


def test_a_replaced_pfx_or_ca_file_counts_as_a_changed_app(tmp_path: Path,
                                                         tls_files: Any) -> None:
    import trustme

    from relay.tokens.provider import TokenProvider

    ca = trustme.CA()
    pfx = tmp_path / "app.pfx"
    pfx.write_bytes(b"first")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    data = {"listeners": [{"name": "x"}],
            "apps": {"pfx": {"tenant": "t", "client_id": DEMO_APP.client_id,
                             "certificate": {"pfx": str(pfx)}},
                     "ca": {"tenant": "t", "client_id": DEMO_APP.client_id,
                            "client_secret": "s", "ca_file": str(ca_file)},
                     "still": {"tenant": "t", "client_id": DEMO_APP.client_id,
                               "client_secret": "s"}},
            "accounts": [{"name": "n", "networks": ["127.0.0.1"], "app": "ca",
                          "mailbox": "a@b.cd"}],
            "spool": {"directory": str(tmp_path / "spool")}}
    provider = TokenProvider(config_mod.parse(data).apps)
    assert provider.update(config_mod.parse(data).apps, margin=600) == set()
    pfx.write_bytes(b"renewed")
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    assert provider.update(config_mod.parse(data).apps, margin=600) == {"pfx", "ca"}
    data["apps"]["still"]["client_secret"] = "rotated"
    assert provider.update(config_mod.parse(data).apps, margin=600) == {"still"}


async def test_sighup_reconnects_a_graph_lane_with_the_new_trust(
        boxes: list[Sandbox], tmp_path: Path, password_hash: str) -> None:
    """The Graph transport keeps an HTTPS session per worker: after the reload it must not go
    on with the one that trusts the old CA."""
    box = await start_box(boxes, tmp_path / "sandbox", graph=True)
    path = tmp_path / "relay.yaml"
    data = slow_backoff(base_config(box, tmp_path, password_hash))
    data["apps"]["contoso"].update(transport="graph", graph_endpoint=box.graph_url)
    path.write_text(yaml.safe_dump(data))
    relay = Relay(config_mod.load(path), config_path=path)
    await relay.start()
    try:
        port = relay.addresses["local"][1]
        assert box.graph is not None
        await send_one(port, "graph one")
        await box.graph.wait_for_messages(1)

        box = await start_box(boxes, tmp_path / "sandbox", like=box, graph=True)
        assert box.graph is not None
        await send_one(port, "graph two")
        # The cached token goes to the old Graph's port, which is gone: the lane pauses.
        await wait_until(lambda: relay.delivery.counters.deferred >= 1, timeout=30)
        data["apps"]["contoso"]["graph_endpoint"] = box.graph_url  # its port is new each start
        path.write_text(yaml.safe_dump(data))
        relay.reload()
        (got,) = await box.graph.wait_for_messages(1, timeout=15)
        assert got.route == "sendMail"
    finally:
        await relay.stop(timeout=5)


async def test_sighup_rebuilds_a_delegated_client_after_a_new_ca_file(
        box: Sandbox, tmp_path: Path, password_hash: str) -> None:
    """A delegated (user) sign-in's msal client is built again when its app's `ca_file`
    changes, and the stored sign-in still serves through the new one."""
    path = write_config(box, tmp_path, password_hash)
    await login(box, path, "personal", ME)
    data = yaml.safe_load(path.read_text())
    ca_file = tmp_path / "proxy-ca.pem"
    ca_file.write_bytes(box.ca_file.read_bytes())
    data["apps"]["outlook"]["ca_file"] = str(ca_file)
    path.write_text(yaml.safe_dump(data))
    relay = await start(path)
    try:
        await asyncio.to_thread(send, relay.addresses["local"], message("first"))
        await box.exchange.wait_for_messages(1)
        assert relay.tokens.delegated is not None
        client = relay.tokens.delegated.client("personal")
        assert client is not None

        relay.reload()  # same files: the client stays
        assert relay.tokens.delegated.client("personal") is client
        # A proxy's CA added beside the endpoint's (what an admin appends to ca_file).
        ca_file.write_bytes(box.ca_file.read_bytes() + trustme.CA().cert_pem.bytes())
        relay.reload()
        assert relay.tokens.delegated.client("personal") is None
        # Exchange refuses the cached token once: the relay refreshes through the new client.
        box.exchange.inject("auth", "535 5.7.3 Authentication unsuccessful")
        await asyncio.to_thread(send, relay.addresses["local"], message("second"))
        await box.exchange.wait_for_messages(2)
        assert relay.tokens.delegated.client("personal") not in (None, client)
    finally:
        await relay.stop(timeout=5)
