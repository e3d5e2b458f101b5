"""The relay as a real process: SIGKILL loses nothing acknowledged, SIGTERM drains."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml
from conftest import base_config, message, wait_until
from relayproc import RelayProcess

from relay.sandbox import Sandbox


@pytest.fixture
def config_file(sandbox: Sandbox, tmp_path: Path, password_hash: str) -> Path:
    data: dict[str, Any] = base_config(sandbox, tmp_path, password_hash)
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
async def spawn(config_file: Path) -> AsyncIterator[Any]:
    started: list[RelayProcess] = []

    async def start(shutdown_timeout: float = 10) -> RelayProcess:
        relay = await RelayProcess.start(config_file, shutdown_timeout=shutdown_timeout)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        if relay.proc.returncode is None:
            relay.proc.kill()
            await relay.proc.wait()


def subject_of(data: bytes) -> str:
    return data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()


async def test_sigkill_loses_no_acknowledged_message(spawn: Any, sandbox: Sandbox,
                                                     tmp_path: Path) -> None:
    rng = random.Random(1234)
    acked: list[str] = []
    kills = 3

    async def sender(port: int, name: str, stop: asyncio.Event) -> None:
        n = 0
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as client:
                while not stop.is_set():
                    subject = f"{name}-{n}"
                    n += 1
                    await client.sendmail("device@printers.example", ["a@example.org"],
                                          message(subject, body="x" * rng.randint(10, 20000)))
                    acked.append(subject)  # only after the relay said 250

    tmp = tmp_path / "spool" / "tmp"
    orphans: set[Path] = set()
    for round_no in range(kills):
        relay = await spawn()
        survivors = orphans & set(tmp.iterdir())
        assert not survivors, f"temp files of the killed relay survived the restart: {survivors}"
        stop = asyncio.Event()
        senders = [asyncio.create_task(sender(relay.port, f"r{round_no}c{c}", stop))
                   for c in range(3)]
        target = len(acked) + rng.randint(5, 25)
        async with asyncio.timeout(60):
            while len(acked) < target:
                await asyncio.sleep(0.005)  # watching a counter that other tasks advance
        # Then a random moment on top: the kill lands mid-DATA, mid-commit or mid-delivery.
        await asyncio.sleep(rng.random() * 0.05)
        relay.proc.send_signal(signal.SIGKILL)
        await relay.wait()
        orphans = set(tmp.iterdir())
        stop.set()
        await asyncio.gather(*senders)

    final = await spawn()
    assert not orphans & set(tmp.iterdir()), "temp files of the killed relay survived"

    def delivered() -> list[str]:
        return [subject_of(m.data) for m in sandbox.exchange.messages]

    # Wait on arrivals (duplicates count too, so a count alone is not enough).
    with contextlib.suppress(TimeoutError):
        while not set(acked) <= set(delivered()):
            await sandbox.exchange.wait_for_messages(len(delivered()) + 1, timeout=30)
    missing = set(acked) - set(delivered())
    assert not missing, f"acknowledged with 250 but never delivered: {sorted(missing)}"
    duplicates = len(delivered()) - len(set(delivered()))
    assert duplicates <= kills
    spool = tmp_path / "spool"
    async with asyncio.timeout(30):
        while any((spool / "queue").iterdir()):
            await asyncio.sleep(0.05)
    assert not any((spool / "tmp").iterdir()), "orphan temp files survived the restart"
    final.proc.send_signal(signal.SIGTERM)
    assert await final.wait() == 0


async def test_sigterm_lets_a_client_mid_data_finish(spawn: Any, sandbox: Sandbox) -> None:
    relay = await spawn()
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)

    async def reply() -> bytes:
        line = await reader.readline()
        while line[3:4] == b"-":
            line = await reader.readline()
        return line

    idle = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port)
    await idle.connect()
    assert (await reply()).startswith(b"220")
    for command, expected in ((b"EHLO raw.test", b"250"),
                              (b"MAIL FROM:<device@printers.example>", b"250"),
                              (b"RCPT TO:<a@example.org>", b"250"), (b"DATA", b"354")):
        writer.write(command + b"\r\n")
        assert (await reply()).startswith(expected)
    writer.write(b"Subject: half-sent\r\n\r\nfirst half\r\n")
    await writer.drain()

    relay.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        while not any("stopping: draining" in line for line in relay.lines):
            await asyncio.sleep(0.01)
    # The idle client is told to go away at once...
    with pytest.raises((aiosmtplib.SMTPResponseException, aiosmtplib.SMTPServerDisconnected)
                       ) as info:
        await idle.noop()
    if isinstance(info.value, aiosmtplib.SMTPResponseException):
        assert info.value.code == 421
    # ...while the client mid-DATA may finish and gets its 250.
    writer.write(b"second half\r\n.\r\n")
    await writer.drain()
    assert (await reply()).startswith(b"250 2.0.0")
    writer.close()
    assert await relay.wait() == 0
    (got,) = await sandbox.exchange.wait_for_messages(1)
    assert subject_of(got.data) == "half-sent"


async def test_port_in_use_exits_69(config_file: Path) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    data = yaml.safe_load(config_file.read_text())
    data["listeners"][0]["bind"] = f"127.0.0.1:{port}"
    config_file.write_text(yaml.safe_dump(data))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(config_file),
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    blocker.close()
    assert proc.returncode == 69
    assert b"cannot listen on" in err and b"local" in err


async def test_sighup_reload_applies_new_accounts_and_refuses_bad_config(
        sandbox: Sandbox, tmp_path: Path, password_hash: str, config_file: Path) -> None:
    from relay.config import records as config_mod
    from relay.service.lifecycle import Relay

    relay = Relay(config_mod.load(config_file), config_path=config_file)
    await relay.start()
    try:
        data = yaml.safe_load(config_file.read_text())
        data["accounts"][1]["mailbox"] = "reloaded@contoso.example"
        config_file.write_text(yaml.safe_dump(data))
        relay.reload()
        address = relay.addresses["local"]
        async with aiosmtplib.SMTP(hostname=address[0], port=address[1]) as client:
            await client.sendmail("device@printers.example", ["a@example.org"], message("one"))
        (got,) = await sandbox.exchange.wait_for_messages(1)
        assert got.auth_user == "reloaded@contoso.example"

        config_file.write_text("listeners: [oops\n")
        relay.reload()  # refused: the running config stays
        assert relay.config.accounts[1].mailbox == "reloaded@contoso.example"
    finally:
        await relay.stop(timeout=5)


async def test_sigterm_mid_delivery_finishes_it_within_the_deadline(
        spawn: Any, sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.exchange.delay("data", 1.0)  # Exchange takes a second to accept the message
    relay = await spawn(shutdown_timeout=10)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port) as client:
        await client.sendmail("device@printers.example", ["a@example.org"], message("drained"))
    await wait_until(lambda: sandbox.exchange.delays_started == 1)  # delivery in flight
    started = time.monotonic()
    relay.proc.send_signal(signal.SIGTERM)
    assert await relay.wait() == 0
    assert time.monotonic() - started < 10
    assert [subject_of(m.data) for m in sandbox.exchange.messages] == ["drained"]
    assert any("status=sent" in line for line in relay.lines)
    assert not any((tmp_path / "spool" / "queue").iterdir())  # so a restart sends nothing


async def test_sigterm_mid_delivery_past_the_deadline_keeps_it_queued(
        spawn: Any, sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.exchange.delay("data", 60)  # Exchange hangs after the final dot
    relay = await spawn(shutdown_timeout=1)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port) as client:
        await client.sendmail("device@printers.example", ["a@example.org"], message("cut off"))
    await wait_until(lambda: sandbox.exchange.delays_started == 1)
    started = time.monotonic()
    relay.proc.send_signal(signal.SIGTERM)
    assert await relay.wait() == 0
    assert time.monotonic() - started < 1 + 2  # the deadline, and a moment to hang up
    assert any("cancelling" in line for line in relay.lines)
    assert not any("status=sent" in line for line in relay.lines)  # nothing claimed sent
    assert sandbox.exchange.messages == []
    assert len(list((tmp_path / "spool" / "queue").iterdir())) == 1

    await spawn()  # the next start delivers it, once
    (got,) = await sandbox.exchange.wait_for_messages(1)
    assert subject_of(got.data) == "cut off"
    async with asyncio.timeout(10):
        while any((tmp_path / "spool" / "queue").iterdir()):
            await asyncio.sleep(0.02)
    assert len(sandbox.exchange.messages) == 1
