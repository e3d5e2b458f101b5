"""Faults: a full disk, and every way Exchange Online or Entra ID can fail.

Each test injects one fault into the real relay's path (a real tmpfs, the sandbox's injections,
a port that hangs up) and checks the promise: nothing acknowledged is lost, nothing is bounced
for a fault that is not the message's, each message arrives once, and a broken path is retried
on the backoff schedule rather than hammered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import smtplib
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from conftest import RelayFactory, message, send, smtp_client, wait_until

from relay.config import records as config_mod
from relay.sandbox import Sandbox
from relay.service.lifecycle import Relay

MIN_BACKOFF, MAX_BACKOFF = 0.2, 1.0


def queued(spool: Path) -> list[Path]:
    folder = spool / "queue"
    return sorted(folder.iterdir()) if folder.exists() else []


def subjects(sandbox: Sandbox) -> list[str]:
    return sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0].decode()
                  for m in sandbox.exchange.messages)


def last_errors(spool: Path) -> str:
    return "\n".join(json.loads(p.read_text()).get("last_error", "")
                     for p in (spool / "state").glob("*.json"))


# --- disk full -------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB filesystem; skipped only where mounting is not allowed (non-root)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs",
                             str(mount_point)], capture_output=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(filesystem: Path, leave: int) -> Path:
    """Fill ``filesystem`` until only about ``leave`` bytes are free."""
    st = os.statvfs(filesystem)
    filler = filesystem / "filler"
    filler.write_bytes(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))
    return filler


def transaction(client: smtplib.SMTP, data: bytes) -> tuple[int, bytes]:
    client.mail("device@printers.example")
    client.rcpt("someone@example.org")
    code, reply = client.data(data)
    if code != 250:
        client.rset()
    return code, reply


@pytest.mark.parametrize("reserve", [0, 1024 * 1024], ids=["enospc", "min_free_space"])
async def test_disk_full_answers_452_and_recovers(relays: RelayFactory, sandbox: Sandbox,
                                                  small_tmpfs: Path, reserve: int) -> None:
    data = relays.config()
    spool = small_tmpfs / "spool"
    data["spool"] = {"directory": str(spool), "min_free_space": reserve}
    relay = await relays.start(data)
    # 300 KB does not fit: with no reserve the write itself hits ENOSPC; with a 1 MB reserve
    # the relay refuses before writing.
    filler = fill(small_tmpfs, leave=reserve + 100 * 1024)
    scan = message("big scan", body=("x" * 76 + "\r\n") * 4000)

    def session() -> list[tuple[int, bytes]]:
        with smtp_client(relay.addresses["local"]) as client:
            client.ehlo("device.test")
            refused = transaction(client, scan)
            stored = sorted((spool / "queue").iterdir()) + sorted((spool / "tmp").iterdir())
            filler.unlink()  # space comes back; the same session may try again
            return [refused, (len(stored), b""), transaction(client, scan)]

    (code, reply), (stored, _), (code2, _) = await asyncio.to_thread(session)
    assert (code, reply[:5]) == (452, b"4.3.1")
    assert stored == 0  # no partial file left behind, so nothing sent that was not acked
    assert code2 == 250
    (got,) = await sandbox.exchange.wait_for_messages(1)
    assert b"Subject: big scan" in got.data


# --- upstream replies --------------------------------------------------------------------


FAULTS = {
    "421 at greeting": ("connect", "421 4.3.2 Service not available, closing transmission "
                                   "channel"),
    "421 after MAIL": ("mail", "421 4.3.2 Service not available, closing transmission channel"),
    "421 after DATA": ("data", "421 4.4.2 Connection dropped due to SocketError"),
    "dropped after the final dot": ("drop_after_data", ""),
    "535 bad token": ("auth", "535 5.7.3 Authentication unsuccessful [SANDBOX]"),
    "535 SMTP AUTH disabled": ("auth", "535 5.7.139 Authentication unsuccessful, "
                                       "SmtpClientAuthentication is disabled for the Tenant."),
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_upstream_fault_defers_then_delivers_once(
        relays: RelayFactory, sandbox: Sandbox, tmp_path: Path, fault: str) -> None:
    stage, reply = FAULTS[fault]
    # Twice: for a 535 the relay retries once with a fresh token, which must fail as well.
    sandbox.exchange.inject(stage, reply, times=2)
    relay = await relays.start()
    code, _ = await asyncio.to_thread(send, relay.addresses["local"], message(fault))
    assert code == 250
    await sandbox.exchange.wait_for_messages(1, timeout=15)
    await wait_until(lambda: not queued(tmp_path / "spool"))
    assert subjects(sandbox) == [fault]  # once, and no DSN
    assert relay.delivery.counters.deferred >= 1
    assert relay.delivery.counters.bounced == 0
    assert not list((tmp_path / "spool" / "failed").iterdir())


async def test_refused_token_waits_then_recovers(relays: RelayFactory, sandbox: Sandbox,
                                                 tmp_path: Path) -> None:
    # AADSTS700016 until the admin consents to the app in the tenant: no config change.
    sandbox.entra.inject(401, {"error": "unauthorized_client", "error_description":
                               "AADSTS700016: Application with identifier "
                               "'11111111-2222-3333-4444-555555555555' was not found."}, times=2)
    relay = await relays.start()
    await asyncio.to_thread(send, relay.addresses["local"], message("token trouble"))
    await wait_until(lambda: "AADSTS700016" in last_errors(tmp_path / "spool"))
    await sandbox.exchange.wait_for_messages(1)
    await wait_until(lambda: not queued(tmp_path / "spool"))
    assert subjects(sandbox) == ["token trouble"]
    assert relay.delivery.counters.bounced == 0


async def test_expired_secret_waits_for_a_new_one(relays: RelayFactory, sandbox: Sandbox,
                                                  tmp_path: Path) -> None:
    sandbox.entra.inject(400, {"error": "invalid_client", "error_description":
                               "AADSTS7000222: The provided client secret keys for app "
                               "'11111111-2222-3333-4444-555555555555' are expired."}, times=1)
    data = relays.config()
    relay = await start_from_file(relays, tmp_path / "relay.yaml", data)
    await asyncio.to_thread(send, relay.addresses["local"], message("expired"))
    spool = tmp_path / "spool"
    await wait_until(lambda: "AADSTS7000222" in last_errors(spool))
    assert "apps.contoso.client_secret" in last_errors(spool)  # the fix names the key
    assert len(queued(spool)) == 1 and relay.delivery.counters.bounced == 0
    # The admin pastes a new secret (here: the same value, inline) and reloads; msal would
    # otherwise keep answering the cached 400 for a minute.
    data["apps"]["contoso"]["client_secret"] = (sandbox.directory / "demo-client-secret"
                                                ).read_text().strip()
    (tmp_path / "relay.yaml").write_text(yaml.safe_dump(data))
    relay.reload()
    await sandbox.exchange.wait_for_messages(1)
    await wait_until(lambda: not queued(spool))
    assert subjects(sandbox) == ["expired"]


# --- a broken path for a while, fixed by a reload ---------------------------------------------


class Blackhole:
    """A port that accepts and hangs up at once, counting each attempt."""

    def __init__(self) -> None:
        self.attempts = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._hang_up, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _hang_up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.attempts += 1
        writer.close()


@pytest.fixture
async def blackhole() -> AsyncIterator[Blackhole]:
    hole = Blackhole()
    await hole.start()
    yield hole
    assert hole.server is not None
    hole.server.close()


async def start_from_file(relays: RelayFactory, path: Path, data: dict[str, Any]) -> Relay:
    """A relay with a config file, so ``reload()`` (what SIGHUP calls) can fix it."""
    path.write_text(yaml.safe_dump(data))
    relay = Relay(config_mod.load(path), config_path=path)
    await relay.start()
    relays.running.append(relay)
    return relay


def schedule_bound(window: float) -> int:
    """Attempts the lane's backoff allows in ``window`` seconds: the first one, one probe after
    each pause that ended, and one for a second message that may have gone out before the
    first attempt failed. (Retrying per message, or one worker per queued message, makes
    more: 6 to 10 here.)"""
    pauses, ended = 0, MIN_BACKOFF
    while ended <= window:
        pauses += 1
        ended += min(MAX_BACKOFF, MIN_BACKOFF * 2 ** pauses)
    return 2 + pauses


@pytest.mark.parametrize("broken", ["smtp_port", "authority", "ca_file"])
async def test_outage_retries_on_schedule_and_recovers_after_reload(
        relays: RelayFactory, sandbox: Sandbox, tmp_path: Path, blackhole: Blackhole,
        broken: str) -> None:
    good = relays.config()
    good["delivery"] = {"min_backoff": MIN_BACKOFF, "max_backoff": MAX_BACKOFF,
                        "idle_timeout": 5, "pacing": {"messages_per_minute": 0}}
    bad = json.loads(json.dumps(good))
    app = bad["apps"]["contoso"]
    if broken == "smtp_port":
        app["smtp_port"] = blackhole.port
    elif broken == "authority":
        app["authority"] = f"https://localhost:{blackhole.port}/demo-tenant"
    else:  # a CA that did not sign the sandbox's certificate: TLS verification fails
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        app["ca_file"] = str(other)
    relay = await start_from_file(relays, tmp_path / "relay.yaml", bad)
    started = time.monotonic()
    count = 20
    for i in range(count):
        await asyncio.to_thread(send, relay.addresses["local"], message(f"outage {i}"))

    def attempts() -> int:
        return (sandbox.exchange.connections if broken == "ca_file" else blackhole.attempts)

    await wait_until(lambda: attempts() >= 1)
    await asyncio.sleep(2)  # the outage lasts a while; count what the relay does in it
    made, window = attempts(), time.monotonic() - started
    assert 1 <= made <= schedule_bound(window), f"{made} attempts in {window:.1f}s"
    spool = tmp_path / "spool"
    assert len(queued(spool)) == count
    assert relay.delivery.counters.bounced == 0
    if broken == "ca_file":
        assert "apps.contoso.ca_file" in last_errors(spool)

    (tmp_path / "relay.yaml").write_text(yaml.safe_dump(good))
    fixed_at = time.monotonic()
    relay.reload()
    await sandbox.exchange.wait_for_messages(count, timeout=30)
    # The longest wait is one full backoff (the lane's pause or a message's own timer), plus
    # a fresh token and the sending itself.
    assert time.monotonic() - fixed_at < MAX_BACKOFF + 5
    await wait_until(lambda: not queued(spool))
    assert subjects(sandbox) == sorted(f"outage {i}" for i in range(count))


async def test_token_endpoint_errors_are_not_hammered(relays: RelayFactory,
                                                      sandbox: Sandbox) -> None:
    data = relays.config()
    data["delivery"] = {"min_backoff": MIN_BACKOFF, "max_backoff": MAX_BACKOFF,
                        "idle_timeout": 5, "pacing": {"messages_per_minute": 0}}
    sandbox.entra.inject(401, {"error": "invalid_client",
                               "error_description": "AADSTS7000222: secret expired"}, times=1000)
    relay = await relays.start(data)
    started = time.monotonic()
    for i in range(20):
        await asyncio.to_thread(send, relay.addresses["local"], message(f"token {i}"))
    await wait_until(lambda: sandbox.entra.token_request_count >= 1)
    await asyncio.sleep(2)  # the outage lasts a while; count what the relay does in it
    made, window = sandbox.entra.token_request_count, time.monotonic() - started
    assert 1 <= made <= schedule_bound(window), f"{made} token requests in {window:.1f}s"
    sandbox.entra.reset()  # the admin renewed the secret
    await sandbox.exchange.wait_for_messages(20, timeout=30)
    assert relay.delivery.counters.bounced == 0


async def test_queued_mail_for_an_app_removed_by_reload_waits_quietly(
        relays: RelayFactory, sandbox: Sandbox, tmp_path: Path, blackhole: Blackhole,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="m365relay")  # whatever earlier tests left
    good = relays.config()
    good["delivery"] = {"min_backoff": MIN_BACKOFF, "max_backoff": MAX_BACKOFF,
                        "idle_timeout": 5, "pacing": {"messages_per_minute": 0}}
    bad = json.loads(json.dumps(good))
    bad["apps"]["contoso"]["smtp_port"] = blackhole.port
    relay = await start_from_file(relays, tmp_path / "relay.yaml", bad)
    await asyncio.to_thread(send, relay.addresses["local"], message("orphaned"))
    await wait_until(lambda: blackhole.attempts >= 1)
    # The admin renames the app; the queued message still names the old one.
    renamed = json.loads(json.dumps(good))
    renamed["apps"] = {"main": renamed["apps"].pop("contoso")}
    for account in renamed["accounts"]:
        account["app"] = "main"
    (tmp_path / "relay.yaml").write_text(yaml.safe_dump(renamed))
    relay.reload()
    await asyncio.sleep(2)  # several backoff rounds pass
    assert len(queued(tmp_path / "spool")) == 1
    crashes = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert not crashes
    assert any("apps.contoso" in r.getMessage() for r in caplog.records)
    # Named again as before: it goes out.
    (tmp_path / "relay.yaml").write_text(yaml.safe_dump(good))
    relay.reload()
    await sandbox.exchange.wait_for_messages(1, timeout=30)
