"""sd_notify for real: the relay as a subprocess, systemd played by a datagram socket we bind."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from conftest import base_config

from relay.sandbox import Sandbox
from relay.service.notify import Notifier


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="m365n") as folder:
        path = str(Path(folder) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)
        yield sock, path
        sock.close()


async def receive(sock: socket.socket, timeout: float = 20) -> dict[str, str]:
    async with asyncio.timeout(timeout):
        data = await asyncio.get_running_loop().sock_recv(sock, 65536)
    return dict(line.split("=", 1) for line in data.decode().splitlines())


async def receive_until(sock: socket.socket, key: str, timeout: float = 20
                        ) -> list[dict[str, str]]:
    """Messages up to and including the first that has ``key`` (watchdog pings interleave)."""
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            message = await receive(sock, timeout)
            seen.append(message)
            if key in message:
                return seen


@pytest.fixture
async def relay_process(sandbox: Sandbox, tmp_path: Path, password_hash: str,
                        notify_socket: tuple[socket.socket, str]
                        ) -> AsyncIterator[asyncio.subprocess.Process]:
    config = tmp_path / "relay.yaml"
    config.write_text(yaml.safe_dump(base_config(sandbox, tmp_path, password_hash)))
    log = (tmp_path / "relay.log").open("wb")
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket[1], "WATCHDOG_USEC": "200000"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(config),
        "--shutdown-timeout", "5", stderr=log, env=env)
    yield proc
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
    log.close()


async def banner(host: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        async with asyncio.timeout(10):
            return await reader.readline()
    finally:
        writer.close()


async def test_ready_watchdog_reload_and_stopping(
        relay_process: asyncio.subprocess.Process,
        notify_socket: tuple[socket.socket, str], tmp_path: Path) -> None:
    sock = notify_socket[0]
    first = await receive(sock)
    assert first.get("READY") == "1", (tmp_path / "relay.log").read_text()
    # READY=1 means the listeners accept connections: the status names where, and it answers.
    address = first["STATUS"].split(" on ", 1)[1].split(",")[0]
    host, port = address.rsplit(":", 1)
    assert (await banner(host, int(port))).startswith(b"220 ")

    # WATCHDOG_USEC=200000: a ping every 0.1 s from the event loop.
    pings = 0
    async with asyncio.timeout(10):
        while pings < 5:
            pings += (await receive(sock)).get("WATCHDOG") == "1"

    relay_process.send_signal(signal.SIGHUP)
    reload = await receive_until(sock, "RELOADING")
    assert int(reload[-1]["MONOTONIC_USEC"]) > 0
    assert "READY" in (await receive_until(sock, "READY"))[-1]

    relay_process.send_signal(signal.SIGTERM)
    stopping = (await receive_until(sock, "STOPPING"))[-1]
    assert stopping["STOPPING"] == "1"
    assert "draining" in stopping["STATUS"]
    async with asyncio.timeout(20):
        assert await relay_process.wait() == 0


def test_abstract_namespace_socket() -> None:
    name = f"m365relay-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready("relaying: test")
        notifier.close()
        assert sock.recv(4096) == b"READY=1\nSTATUS=relaying: test"


def test_no_op_outside_systemd() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert notifier.watchdog_interval is None
    # Not a path or @name (e.g. a newer systemd's vsock:): ignored rather than crashing.
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_watchdog_for_another_process_is_ignored() -> None:
    mine = Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval == 30.0
    theirs = Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert theirs.watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval is None


def test_a_vanished_socket_is_reported_not_raised(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert not notifier.watchdog()
