"""The upstream mail transaction: pipelined when offered, one command at a time when not, and
large messages streamed from the spool; checked on the fake Exchange's wire and recordings."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest
from conftest import RelayFactory, message, send, wait_until
from hypothesis import given
from hypothesis import strategies as st

from relay.message import Envelope
from relay.sandbox import Sandbox
from relay.spool.store import INLINE_LIMIT, Spool
from relay.upstream.smtpwire import DotStuffer

BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
SENDER = "device@printers.example"


def unstuffed(wire: bytes) -> bytes:
    """The message a server reads from DATA's wire bytes (RFC 5321 4.5.2)."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire[:-3].split(b"\r\n")[:-1]
    assert all(line != b"." for line in lines)  # no early end of data
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def stuffed(pieces: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(piece) for piece in pieces) + stuffer.end()


LINES = st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"\r\n.", b"abc", b"\xc3\xa9"]),
                 max_size=12)


@given(lines=LINES, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_dot_stuffing_survives_any_split(lines: list[bytes], cuts: list[int]) -> None:
    message_bytes = b"".join(line + b"\r\n" for line in lines)
    points = sorted({min(c, len(message_bytes)) for c in cuts})
    pieces = [message_bytes[a:b] for a, b in zip([0, *points], [*points, len(message_bytes)],
                                                 strict=True)]
    wire = stuffed(pieces)
    assert wire == stuffed([message_bytes])  # where the pieces split changes nothing
    assert unstuffed(wire) == message_bytes


def test_message_without_final_line_break_gets_one() -> None:
    assert stuffed([b"Subject: x\r\n\r\n", b".no end"]) == b"Subject: x\r\n\r\n..no end\r\n.\r\n"


def mail_options(sandbox: Sandbox, n: int) -> list[str]:
    path = sandbox.exchange.messages[n].path
    assert path is not None
    return list(json.loads(path.with_suffix(".json").read_text())["mail_options"])


async def test_mail_rcpt_and_data_go_in_one_write(relays: RelayFactory,
                                                  sandbox: Sandbox) -> None:
    sandbox.exchange.record_wire = True
    relay = await relays.start()
    rcpts = ("a@example.org", "b@example.org", "c@example.org")
    body = ".first line starts with a dot\r\ncafé\r\n.\r\n..\r\nend\r\n"
    for i in range(3):
        await asyncio.to_thread(send, relay.addresses["local"],
                                message(f"pipelined {i}", body=body), rcpts=rcpts)
    got = await sandbox.exchange.wait_for_messages(3)
    # One round trip for the envelope, not five: the fake saw each group in one read.
    assert sandbox.exchange.pipelined == 3
    for n, received in enumerate(got):
        assert received.rcpt_tos == rcpts
        assert received.wire is not None and BARE.search(received.wire) is None
        assert unstuffed(received.wire) == received.data
        assert received.data.endswith(body.encode())
        assert "BODY=8BITMIME" in mail_options(sandbox, n)
        assert any(o.startswith("SIZE=") for o in mail_options(sandbox, n))
    await wait_until(lambda: relay.delivery.counters.delivered == 9)


async def test_without_pipelining_commands_go_one_at_a_time(relays: RelayFactory,
                                                           sandbox: Sandbox,
                                                           tmp_path: Path) -> None:
    sandbox.exchange.pipelining = False
    sandbox.exchange.record_wire = True
    sandbox.exchange.inject("rcpt", "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found",
                            rcpt="gone@example.org")
    relay = await relays.start()
    await asyncio.to_thread(send, relay.addresses["local"], message("one by one"),
                            rcpts=("ok@example.org", "gone@example.org"))
    got = await sandbox.exchange.wait_for_messages(2)  # the message and the DSN for gone@
    await wait_until(lambda: not list((tmp_path / "spool" / "queue").iterdir()))
    assert sandbox.exchange.pipelined == 0
    [sent] = [m for m in got if m.rcpt_tos == ("ok@example.org",)]
    [dsn] = [m for m in got if m.rcpt_tos == (SENDER,)]
    assert b"gone@example.org" in dsn.data
    assert sent.wire is not None and unstuffed(sent.wire) == sent.data
    assert relay.delivery.counters.delivered == 2 and relay.delivery.counters.bounced == 1


async def test_every_recipient_refused_in_a_pipelined_group(relays: RelayFactory,
                                                           sandbox: Sandbox,
                                                           tmp_path: Path) -> None:
    # DATA went out in the same write; the server answers it 503 (no valid recipients), and
    # the next message on the same connection still goes through.
    for rcpt in ("x@example.org", "y@example.org"):
        sandbox.exchange.inject("rcpt", "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found",
                                rcpt=rcpt)
    data = relays.config()
    data["delivery"]["connections_per_mailbox"] = 1
    relay = await relays.start(data)
    await asyncio.to_thread(send, relay.addresses["local"], message("nobody"),
                            rcpts=("x@example.org", "y@example.org"))
    await asyncio.to_thread(send, relay.addresses["local"], message("somebody"))
    got = await sandbox.exchange.wait_for_messages(2)  # the DSN and the second message
    await wait_until(lambda: not list((tmp_path / "spool" / "queue").iterdir()))
    assert sorted(m.rcpt_tos for m in got) == [(SENDER,), ("someone@example.org",)]
    assert relay.delivery.counters.bounced == 2
    assert sandbox.exchange.connections == 1  # the refusal did not cost the connection


async def test_large_message_is_streamed_intact(relays: RelayFactory, sandbox: Sandbox,
                                                tmp_path: Path) -> None:
    sandbox.exchange.record_wire = True
    # Lines that need stuffing everywhere, so some fall on a piece boundary.
    line = b".dotted line \xe2\x82\xac 0123456789\r\n"
    content = b"Subject: large\r\nFrom: <printers@contoso.example>\r\n\r\n" + line * (
        3 * INLINE_LIMIT // len(line))
    spool = Spool(tmp_path / "spool")
    spool.open()
    spool.commit(Envelope(mail_from="printers@contoso.example", rcpt_tos=("big@example.org",),
                          account="printers", app="contoso", mailbox="printers@contoso.example",
                          bounce_to="", client="local", received_at=time.time()),
                 (content[:100], memoryview(content)[100:]))
    relay = await relays.start()
    (got,) = await sandbox.exchange.wait_for_messages(1, timeout=30)
    await wait_until(lambda: not relay.spool.entries())
    assert got.data == content
    assert got.wire is not None and BARE.search(got.wire) is None
    assert got.wire.count(b"\r\n..dotted") == content.count(b"\r\n.dotted")
    assert "BODY=8BITMIME" in mail_options(sandbox, 0)


async def test_damaged_large_message_is_never_sent(relays: RelayFactory, sandbox: Sandbox,
                                                   tmp_path: Path) -> None:
    content = b"Subject: damaged\r\n\r\n" + b"payroll 0123456789\r\n" * 200_000
    spool = Spool(tmp_path / "spool")
    spool.open()
    queue_id = spool.commit(Envelope(
        mail_from="printers@contoso.example", rcpt_tos=("big@example.org",), account="printers",
        app="contoso", mailbox="printers@contoso.example", bounce_to="", client="local",
        received_at=time.time()), content)
    queue_file = tmp_path / "spool" / "queue" / queue_id
    data = bytearray(queue_file.read_bytes())
    data[-3_000_000] ^= 0x01  # far past the first piece that would go out
    queue_file.write_bytes(bytes(data))
    relay = await relays.start()
    # startup's scan checks the header and size only; the checksum is checked at delivery.
    await wait_until((tmp_path / "spool" / "corrupt" / queue_id).exists)
    await relay.delivery.drain(1)
    assert sandbox.exchange.messages == []
    assert sandbox.exchange.pipelined == 0  # not even a MAIL FROM went out


@pytest.mark.parametrize("stage", ["rcpt", "data"])
async def test_a_server_that_stops_answering_times_out_and_the_retry_delivers(
        relays: RelayFactory, sandbox: Sandbox, tmp_path: Path, stage: str) -> None:
    sandbox.exchange.delay(stage, 3.0)  # longer than delivery.timeout; once
    data = relays.config()
    data["delivery"]["timeout"] = 0.5
    relay = await relays.start(data)
    await asyncio.to_thread(send, relay.addresses["local"], message(f"slow {stage}"))
    (got,) = await sandbox.exchange.wait_for_messages(1, timeout=15)
    await wait_until(lambda: not list((tmp_path / "spool" / "queue").iterdir()))
    assert b"Subject: slow" in got.data
    assert relay.delivery.counters.deferred == 1
    [deferred] = [e for e in relay.delivery.events.recent if e.status == "deferred"]
    assert "Timed out waiting" in deferred.detail
