"""kill -9 under an office's load: nothing acknowledged is lost, few messages go out twice.

The relay runs as a real process; real SMTP clients keep it busy the way a LAN does (an app
server's pool on persistent connections, printers that log in for every message, so argon2,
spool commits and deliveries all compete); the sandbox's fake Exchange records every message
it said 250 to. After each SIGKILL the relay restarts on the same spool and delivers what is
queued. A message delivered twice is one whose 250 from Exchange the killed relay had not yet
recorded (its spool file still there): the window this test bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiosmtplib
import pytest
import yaml
from conftest import PASSWORD, RelayFactory, base_config, message, wait_until
from relayproc import RelayProcess

from relay.sandbox import Sandbox

KILLS = 5
ACKED_PER_ROUND = 80  # 400 acknowledged over five kills, as in the field report
STREAMS = 6  # an app server's pool: network-mapped, many messages per connection
PRINTERS = 3  # AUTH on every connection, one message each: argon2 on the relay's threads
POOL = 2  # threads of the default pool in the tests that fill it


class Acked:
    """Subjects the relay answered 250 for, and an event when there are enough."""

    def __init__(self) -> None:
        self.subjects: list[str] = []
        self.target = 0
        self.reached = asyncio.Event()

    def add(self, subject: str) -> None:
        self.subjects.append(subject)
        if len(self.subjects) >= self.target:
            self.reached.set()

    def expect(self, more: int) -> None:
        self.target = len(self.subjects) + more
        self.reached.clear()


async def _stream(port: int, name: str, acked: Acked, rng: random.Random) -> None:
    n = 0
    with contextlib.suppress(aiosmtplib.SMTPException, OSError):
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as client:
            while True:
                subject = f"{name}-{n}"
                n += 1
                await client.sendmail("device@printers.example", ["a@example.org"],
                                      message(subject, body="x" * rng.randint(10, 20000)))
                acked.add(subject)  # only after the relay said 250


async def _printer(port: int, name: str, acked: Acked) -> None:
    n = 0
    while True:
        subject = f"{name}-{n}"
        n += 1
        try:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as client:
                await client.login("scanner01", PASSWORD)
                await client.sendmail("scanner01@printers.example", ["b@example.org"],
                                      message(subject, body="scan " * 200))
        except aiosmtplib.SMTPResponseException:
            continue  # refused (busy): a printer tries again
        except (aiosmtplib.SMTPException, OSError):
            return  # the relay is gone
        acked.add(subject)


@contextlib.asynccontextmanager
async def busy_pool() -> AsyncIterator[None]:
    """Every thread of the loop's default pool taken, as ingress fsyncs and argon2 checks
    take them under load."""
    loop = asyncio.get_running_loop()
    release = threading.Event()
    busy = [loop.run_in_executor(None, release.wait, 30) for _ in range(POOL)]
    try:
        yield
    finally:
        release.set()
        await asyncio.gather(*busy)


@pytest.fixture
async def small_pool() -> None:
    pool = ThreadPoolExecutor(max_workers=POOL, thread_name_prefix="small-test-pool")
    asyncio.get_running_loop().set_default_executor(pool)


async def test_delivery_is_recorded_while_the_thread_pool_is_busy(
        small_pool: None, relays: RelayFactory, sandbox: Sandbox, tmp_path: Path) -> None:
    """The record of a 250 must not wait for a thread: every second it waits is a second in
    which a crash sends the message again."""
    sandbox.exchange.mail_dir = None  # the fake records in memory: it needs no thread either
    relay = await relays.start()
    sandbox.exchange.delay("data", 0.5)  # Exchange thinks before its 250
    address = relay.addresses["local"]
    async with aiosmtplib.SMTP(hostname=address[0], port=address[1]) as client:
        await client.sendmail("device@printers.example", ["a@example.org"], message("busy"))
    queue = tmp_path / "spool" / "queue"
    assert any(queue.iterdir())
    await wait_until(lambda: sandbox.exchange.delays_started == 1)  # sent; Exchange thinking
    async with busy_pool():
        await sandbox.exchange.wait_for_messages(1)
        await wait_until(lambda: not any(queue.iterdir()), timeout=5)


async def test_a_partial_delivery_is_recorded_while_the_thread_pool_is_busy(
        small_pool: None, relays: RelayFactory, sandbox: Sandbox, tmp_path: Path) -> None:
    """Exchange took one recipient and deferred the other: who is left must be saved without
    waiting for the pool, or a crash sends the first one a second copy."""
    sandbox.exchange.mail_dir = None
    relay = await relays.start()
    sandbox.exchange.inject("rcpt", "451 4.3.2 try b later", rcpt="b@example.org")
    sandbox.exchange.delay("data", 0.5)
    address = relay.addresses["local"]
    async with aiosmtplib.SMTP(hostname=address[0], port=address[1]) as client:
        await client.sendmail("device@printers.example", ["a@example.org", "b@example.org"],
                              message("half"))
    (queue_id,) = (p.name for p in (tmp_path / "spool" / "queue").iterdir())
    state = tmp_path / "spool" / "state" / f"{queue_id}.json"
    await wait_until(lambda: sandbox.exchange.delays_started == 1)
    async with busy_pool():
        (got,) = await sandbox.exchange.wait_for_messages(1)
        assert got.rcpt_tos == ("a@example.org",)
        await wait_until(state.exists, timeout=5)
    assert json.loads(state.read_text())["pending_rcpts"] == ["b@example.org"]


def _subject(data: bytes) -> str:
    return data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()


async def test_kill9_under_load_loses_nothing_and_duplicates_at_most_one_per_kill(
        sandbox: Sandbox, tmp_path: Path, password_hash: str) -> None:
    data = base_config(sandbox, tmp_path, password_hash)
    # The fake answers as soon as it has a message (no .eml to write first), so a copy sent
    # twice is one whose 250 the relay got and did not record: what this test bounds.
    sandbox.exchange.mail_dir = None
    data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]
    config_file = tmp_path / "relay.yaml"
    config_file.write_text(yaml.safe_dump(data))
    rng = random.Random(14)
    acked = Acked()
    lives: list[tuple[float, float]] = []  # (spawned, killed) of each killed relay
    started: list[RelayProcess] = []
    try:
        for round_no in range(KILLS):
            spawned = time.monotonic()
            relay = await RelayProcess.start(config_file)
            started.append(relay)
            acked.expect(ACKED_PER_ROUND)
            clients = [asyncio.create_task(_stream(relay.port, f"r{round_no}s{c}", acked, rng))
                       for c in range(STREAMS)]
            clients += [asyncio.create_task(_printer(relay.port, f"r{round_no}p{c}", acked))
                        for c in range(PRINTERS)]
            async with asyncio.timeout(120):
                await acked.reached.wait()
            # A random moment on top, so the kill lands mid-DATA, mid-commit, mid-delivery.
            await asyncio.sleep(rng.random() * 0.05)
            lives.append((spawned, time.monotonic()))
            await relay.kill()
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)

        final = await RelayProcess.start(config_file)
        started.append(final)
        queue = tmp_path / "spool" / "queue"
        # Empty only once every delivery is recorded (a directory has no event to wait on).
        await wait_until(lambda: not any(queue.iterdir()), timeout=120)
    finally:
        for proc in started:
            await proc.kill()

    delivered = Counter(_subject(m.data) for m in sandbox.exchange.messages)
    lost = set(acked.subjects) - set(delivered)
    twice = {s: n for s, n in delivered.items() if n > 1}
    duplicates = sum(n - 1 for n in twice.values())
    # Whose hands each duplicate's first copy was in at the kill: the relay's, if Exchange's
    # 250 had gone out to the relay before it died (the window this test bounds); Exchange's,
    # if not (the whole message was sent, the answer came too late: no relay avoids that).
    firsts = {}
    for m in sandbox.exchange.messages:
        firsts.setdefault(_subject(m.data), m)
    held = []
    for subject in twice:
        m = firsts[subject]
        answered = sandbox.exchange.answered_at.get(m.seq)
        for spawned, killed in lives:
            if spawned < m.recorded_at < killed and answered is not None and answered < killed:
                held.append(round(1000 * (killed - answered), 1))
    figures = (f"{len(acked.subjects)} acknowledged, {len(delivered)} delivered, "
               f"{len(lost)} lost, {duplicates} duplicates in {KILLS} kills "
               f"({duplicates / KILLS:.1f} per kill); {len(held)} had their 250 before the "
               f"kill, by {sorted(held)} ms")
    print(figures)
    assert len(acked.subjects) >= KILLS * ACKED_PER_ROUND
    assert not lost, f"acknowledged with 250 but never delivered: {sorted(lost)}; {figures}"
    # Each upstream connection has at most one message in flight at any moment: sent and not
    # yet answered (RFC 1047's window, which no relay can close), or answered and not yet
    # recorded (the relay's own window, under a millisecond since the record is an unlink on
    # the event loop). So a kill costs at most one duplicate per connection. Which window a
    # duplicate fell in is printed, not asserted: on a loaded machine a 250 the fake sent
    # before the kill may not have been read by the relay yet. On a quiet machine the total
    # stays under one a kill (closing note of issue 14).
    connections = data.get("delivery", {}).get("connections_per_mailbox", 3)
    assert duplicates <= KILLS * connections, figures
