"""Abuse limits against the real relay: connection caps and floods, AUTH guessing, timeouts,
command loops. Windows and timeouts are configured small (or the clock is injected) so the
whole file runs in seconds."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, RelayFactory, wait_until
from rawsmtp import RawSMTP

from relay.sandbox import Sandbox
from relay.service.lifecycle import Relay


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def auth_config(relays: RelayFactory, **limits: Any) -> dict[str, Any]:
    data = relays.config()
    data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]
    data["auth_limits"] = limits
    return data


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- connections ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def held_connections(address: tuple[str, int], sources: list[str]
                           ) -> AsyncIterator[list[bytes]]:
    """Open one raw socket per source address (a flood, from a thread so the relay keeps
    running), give each one's first reply, and keep them all open until the block ends."""
    sockets: list[socket.socket] = []

    def open_all() -> list[bytes]:
        for source in sources:
            sockets.append(socket.create_connection(address, timeout=30,
                                                    source_address=(source, 0)))
        return [sock.recv(200) for sock in sockets]

    try:
        yield await asyncio.to_thread(open_all)
    finally:
        for sock in sockets:
            sock.close()


def rss() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


async def banner(relay: Relay, source: str) -> tuple[str, float]:
    started = time.monotonic()
    async with await RawSMTP.connect(relay.addresses["local"], source=source) as client:
        return await client.reply(timeout=5), time.monotonic() - started


async def test_connection_caps_refuse_at_once(relays: RelayFactory,
                                              caplog: pytest.LogCaptureFixture) -> None:
    data = relays.config()
    data["listeners"][0].update(max_connections=5, max_connections_per_ip=3)
    relay = await relays.start(data)
    address = relay.addresses["local"]
    sources = ["127.0.0.2"] * 4 + ["127.0.0.3"] * 2 + ["127.0.0.4"]
    with caplog.at_level(logging.WARNING, "m365relay.listener"):
        async with held_connections(address, sources) as replies:
            assert all(r.startswith(b"220 ") for r in replies[:3] + replies[4:6])
            assert replies[3].startswith(b"421 4.7.0 Too many connections from your address")
            assert replies[6].startswith(b"421 4.7.0 Too many connections to this relay")
            handler = relay.handlers[0]
            assert len(handler.sessions) == 5
            assert handler.slots.per_ip == {"127.0.0.2": 3, "127.0.0.3": 2}
    await wait_until(lambda: handler.slots.total == 0 and not handler.sessions)
    reply, _ = await banner(relay, "127.0.0.2")
    assert reply.startswith("220 ")  # slots come back when sessions end
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("max_connections_per_ip" in m for m in refusals)


async def test_flood_from_one_address(relays: RelayFactory) -> None:
    relay = await relays.start()  # defaults: 100 in total, 20 per client address
    handler = relay.handlers[0]
    flood = [f"127.0.0.{2 + i % 2}" for i in range(1000)]
    before = rss()
    async with held_connections(relay.addresses["local"], flood) as replies:
        # (Sockets silent for a second give way to newer ones, so a slow flood may see a few
        # more welcomes; never more sessions.)
        assert sum(r.startswith(b"220 ") for r in replies) >= 40
        assert sum(r.startswith(b"421 4.7.0 Too many connections from your address")
                   for r in replies) >= 900
        assert len(handler.sessions) == 40  # memory is bounded by the caps
        assert rss() - before < 50_000_000  # about 10 MB here for the whole flood
        reply, seconds = await banner(relay, "127.0.0.9")
        assert reply.startswith("220 ")
        assert seconds < 2
        await asyncio.sleep(1.1)  # the flood's sockets have now been silent for a second
        reply, seconds = await banner(relay, "127.0.0.2")  # from the flood's own address
        assert reply.startswith("220 ")
        assert seconds < 2
        assert handler.slots.per_ip["127.0.0.2"] <= 20
    # Flood lines are throttled: at most one per address and minute.
    assert len(handler.quiet._seen) <= 2


async def test_flood_filling_the_relay_gives_way_to_a_newcomer(relays: RelayFactory) -> None:
    data = relays.config()
    data["listeners"][0].update(max_connections=50, stress_idle_timeout=0.3)
    relay = await relays.start(data)
    flood = [f"127.0.1.{1 + i % 25}" for i in range(200)]  # 25 addresses: the total cap binds
    async with held_connections(relay.addresses["local"], flood) as replies:
        # (A slow flood may already have had its oldest sessions reclaimed.)
        assert sum(r.startswith(b"220 ") for r in replies) >= 50
        assert all(r.startswith((b"220 ", b"421 4.7.0 Too many connections to this relay"))
                   for r in replies)
        assert len(relay.handlers[0].sessions) == 50
        await asyncio.sleep(0.4)  # the flood's sessions are now idle longer than 0.3 s
        reply, seconds = await banner(relay, "127.0.0.9")
        assert reply.startswith("220 ")
        assert seconds < 2
        assert len(relay.handlers[0].sessions) <= 50


# -- AUTH ------------------------------------------------------------------------------------


async def test_session_closes_after_three_failed_logins(relays: RelayFactory) -> None:
    relay = await relays.start(auth_config(relays))
    async with await RawSMTP.connect(relay.addresses["local"]) as client:
        assert (await client.reply()).startswith("220")
        await client.command("EHLO device.test")
        assert (await client.command(plain("scanner01", "guess 1"))).startswith("535 5.7.8")
        assert (await client.command("AUTH PLAIN %%%")).startswith("501")  # not a guess
        assert (await client.command(plain("nobody", "guess 2"))).startswith("535 5.7.8")
        last = await client.command(plain("scanner01", "guess 3"))
        assert last.startswith("535 5.7.8") and "closing" in last
        assert await client.closed()


async def test_an_address_gets_five_guesses(relays: RelayFactory,
                                            caplog: pytest.LogCaptureFixture) -> None:
    relay = await relays.start(auth_config(relays))
    clock = Clock()
    relay.auth_guard.clock = clock
    address = relay.addresses["local"]

    async def attempt(source: str, password: str) -> str:
        async with await RawSMTP.connect(address, source=source) as client:
            assert (await client.reply()).startswith("220")
            await client.command("EHLO device.test")
            return await client.command(plain("scanner01", password))

    with caplog.at_level(logging.INFO, "m365relay"):
        replies = [await attempt("127.0.0.5", f"guess {i}") for i in range(5)]
        assert all(r.startswith("535") for r in replies)
        # Refused without a password check, even when the password is right.
        assert (await attempt("127.0.0.5", PASSWORD)).startswith("454 4.7.0")
        assert (await attempt("127.0.0.6", PASSWORD)).startswith("235")  # others unaffected
        clock.now += 599
        assert (await attempt("127.0.0.5", PASSWORD)).startswith("454 4.7.0")
        clock.now += 2
        assert (await attempt("127.0.0.5", PASSWORD)).startswith("235")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("AUTH PLAIN failed for user 'scanner01'" in m for m in messages) == 5
    assert any("too many failed logins for address 127.0.0.5" in m
               and "auth_limits.failures_per_ip" in m for m in messages)
    assert any("refused without checking" in m for m in messages)
    assert not any(PASSWORD in m or "guess" in m for m in messages)


async def test_parallel_guesses_meet_the_failures_before_they_are_checked(
        relays: RelayFactory) -> None:
    relay = await relays.start(auth_config(relays))
    address = relay.addresses["local"]

    async def attempt(n: int) -> str:
        async with await RawSMTP.connect(address, source="127.0.0.7") as client:
            assert (await client.reply()).startswith("220")
            await client.command("EHLO device.test")
            return await client.command(plain("scanner01", f"guess {n}"), timeout=60)

    replies = await asyncio.gather(*(attempt(n) for n in range(15)))
    # In flight is not failed (correct logins from a pool must pass), so a check looks at the
    # failures once it has a hashing slot: at most 5 guesses, plus the 2 already hashing.
    wrong = sum(r.startswith("535") for r in replies)
    assert 5 <= wrong <= 7
    assert sum(r.startswith("454 4.7.0 Too many failed logins") for r in replies) == 15 - wrong


async def test_user_name_lockout(relays: RelayFactory) -> None:
    relay = await relays.start(auth_config(relays, failures_per_user=3, failures_per_ip=0))
    address = relay.addresses["local"]

    async def attempt(source: str, user: str, password: str) -> str:
        async with await RawSMTP.connect(address, source=source) as client:
            assert (await client.reply()).startswith("220")
            await client.command("EHLO device.test")
            return await client.command(plain(user, password))

    for n in range(3):  # a distributed guess: one try from each of three addresses
        assert (await attempt(f"127.0.2.{n + 1}", "scanner01", "guess")).startswith("535")
    reply = await attempt("127.0.2.9", "scanner01", PASSWORD)
    assert reply.startswith("454 4.7.0") and "user name" in reply
    assert (await attempt("127.0.2.9", "other", "guess")).startswith("535")  # per user


async def test_password_hashing_never_stalls_other_sessions(relays: RelayFactory,
                                                            sandbox: Sandbox) -> None:
    relay = await relays.start(auth_config(relays, failures_per_ip=0, failures_per_user=0))
    address = relay.addresses["local"]
    guessers = 12
    answered = 0

    async def guess(n: int) -> None:
        nonlocal answered
        async with await RawSMTP.connect(address, source=f"127.0.3.{n + 1}") as client:
            assert (await client.reply()).startswith("220")
            await client.command("EHLO device.test")
            assert (await client.command(plain("scanner01", "wrong"), timeout=120)
                    ).startswith("535")
            answered += 1

    tasks = [asyncio.create_task(guess(n)) for n in range(guessers)]
    await wait_until(lambda: answered > 0, timeout=60)  # hashing is under way
    started = time.monotonic()
    async with await RawSMTP.connect(address) as client:  # a device in `printers` networks
        assert (await client.reply()).startswith("220")
        await client.transaction()
        await client.send(b"Subject: meanwhile\r\n\r\nscan\r\n.\r\n")
        assert (await client.reply()).startswith("250 2.0.0")
    legit = time.monotonic() - started
    pending = guessers - answered
    await asyncio.gather(*tasks)
    assert pending > 0  # the guesses were still being hashed while the device sent its scan
    assert legit < 2


# -- timeouts and loops ----------------------------------------------------------------------


def timeouts(relays: RelayFactory, **values: Any) -> dict[str, Any]:
    data = relays.config()
    data["listeners"][0].update(values)
    return data


async def test_slow_upload_succeeds_where_a_slowloris_does_not(relays: RelayFactory,
                                                              sandbox: Sandbox) -> None:
    relay = await relays.start(timeouts(relays, idle_timeout=0.5, data_idle_timeout=0.5,
                                        data_timeout=3))
    address = relay.addresses["local"]
    # Slow but steady: 1.5 s in all, three times the command idle timeout.
    async with await RawSMTP.connect(address) as client:
        assert (await client.reply()).startswith("220")
        await client.transaction()
        await client.send(b"Subject: slow scan\r\n\r\n")
        for _ in range(15):
            await client.send((b"B" * 76 + b"\r\n") * 100)
            await asyncio.sleep(0.1)
        await client.send(b".\r\n")
        assert (await client.reply()).startswith("250 2.0.0")
    # A slowloris: a byte now and then, each within the idle time; the total stops it.
    async with await RawSMTP.connect(address) as client:
        assert (await client.reply()).startswith("220")
        await client.transaction()
        started = time.monotonic()

        async def drip() -> None:
            with contextlib.suppress(ConnectionError):
                while True:
                    await client.send(b"x")
                    await asyncio.sleep(0.3)

        dripping = asyncio.create_task(drip())
        try:
            reply = await client.reply(timeout=10)
        finally:
            dripping.cancel()
        assert reply.startswith("421 4.4.2") and "longer than 3s" in reply
        assert 2.5 < time.monotonic() - started < 6
        assert await client.closed()
    await sandbox.exchange.wait_for_messages(1)


async def test_stalled_data_and_idle_sessions_are_closed(relays: RelayFactory) -> None:
    relay = await relays.start(timeouts(relays, idle_timeout=0.3, data_idle_timeout=0.3))
    address = relay.addresses["local"]
    async with await RawSMTP.connect(address) as client:
        assert (await client.reply()).startswith("220")
        reply = await client.reply(timeout=5)  # say nothing
        assert reply.startswith("421 4.4.2") and "no command for 0.3s" in reply
        assert await client.closed()
    async with await RawSMTP.connect(address) as client:
        assert (await client.reply()).startswith("220")
        await client.transaction()
        await client.send(b"Subject: stall\r\n\r\nhalf a li")
        reply = await client.reply(timeout=5)
        assert reply.startswith("421 4.4.2") and "no message data for 0.3s" in reply
        assert await client.closed()
    assert relay.spool.entries() == []


async def test_session_time_is_capped(relays: RelayFactory) -> None:
    relay = await relays.start(timeouts(relays, session_timeout=1))
    async with await RawSMTP.connect(relay.addresses["local"]) as client:
        assert (await client.reply()).startswith("220")
        started = time.monotonic()
        reply = await client.command("EHLO device.test")
        while reply.startswith("250"):
            await asyncio.sleep(0.2)
            reply = await client.command("MAIL FROM:<d@printers.example>")
            if reply.startswith("250"):
                reply = await client.command("RSET")
        assert reply.startswith("421 4.4.2") and "session longer than 1s" in reply
        assert 0.8 < time.monotonic() - started < 4


async def test_noop_loops_and_error_loops_are_cut(relays: RelayFactory) -> None:
    relay = await relays.start(timeouts(relays, max_junk_commands=5, max_errors=3))
    address = relay.addresses["local"]
    async with await RawSMTP.connect(address) as client:
        assert (await client.reply()).startswith("220")
        for _ in range(4):  # EHLO counts too
            assert (await client.command("NOOP")).startswith("250")
        await client.transaction()  # an accepted message resets the count
        await client.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        assert (await client.reply()).startswith("250 2.0.0")
        for _ in range(5):
            assert (await client.command("RSET")).startswith("250")
        reply = await client.command("NOOP")
        assert reply.startswith("421 4.7.0") and "NOOP" in reply
        assert await client.closed()
    async with await RawSMTP.connect(address) as client:
        assert (await client.reply()).startswith("220")
        await client.command("EHLO device.test")
        for _ in range(3):
            assert (await client.command("RCPT TO:<a@example.org>")).startswith("503")
        reply = await client.command("RCPT TO:<a@example.org>")
        assert reply.startswith("421 4.7.0 Too many errors")
        assert await client.closed()
    async with await RawSMTP.connect(address) as client:  # the same, pipelined in one write
        assert (await client.reply()).startswith("220")
        await client.send(b"EHLO device.test\r\n" + b"RCPT TO:<a@example.org>\r\n" * 10)
        replies = [await client.reply() for _ in range(5)]
        assert [r[:3] for r in replies] == ["250", "503", "503", "503", "421"]
        assert await client.reader.read() == b""  # nothing after the 421
