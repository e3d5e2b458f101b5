"""delivery: passthrough -- the client waits for Exchange Online and gets its verdict."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from conftest import PASSWORD, RelayFactory, message, send, wait_until

from relay.sandbox import Sandbox
from relay.service.lifecycle import Relay


def passthrough(data: dict[str, Any]) -> dict[str, Any]:
    data["listeners"][0]["delivery"] = "passthrough"
    return data


async def send_async(relay: Relay, **kwargs: Any) -> tuple[int, bytes]:
    return await asyncio.to_thread(send, relay.addresses["local"], message(), **kwargs)


async def test_accepted_upstream_is_250_and_nothing_stays_queued(relays: RelayFactory,
                                                                 sandbox: Sandbox) -> None:
    relay = await relays.start(passthrough(relays.config()))
    code, text = await send_async(relay)
    # The message is already at Exchange when the client hears 250, not merely queued.
    assert len(sandbox.exchange.messages) == 1
    assert code == 250 and b"delivered" in text and b"Queued mail for delivery" in text
    assert relay.spool.entries() == []
    assert sandbox.exchange.messages[0].auth_user == "printers@contoso.example"


async def test_upstream_4xx_stays_4xx(relays: RelayFactory, sandbox: Sandbox) -> None:
    relay = await relays.start(passthrough(relays.config()))
    sandbox.exchange.inject("data", "452 4.3.1 Insufficient system resources (TSF)")
    code, text = await send_async(relay)
    assert code == 452 and b"4.3.1 Insufficient system resources" in text
    assert relay.spool.entries() == []  # the client keeps its copy and retries
    code, _ = await send_async(relay)
    assert code == 250


async def test_upstream_5xx_stays_5xx_with_its_text(relays: RelayFactory,
                                                    sandbox: Sandbox) -> None:
    relay = await relays.start(passthrough(relays.config()))
    sandbox.exchange.inject("rcpt", "550 5.1.10 RESOLVER.ADR.RecipientNotFound; not found")
    code, text = await send_async(relay)
    assert code == 550 and b"5.1.10 RESOLVER.ADR.RecipientNotFound" in text
    assert relay.spool.entries() == [] and sandbox.exchange.messages == []


async def test_upstream_unreachable_is_4xx(relays: RelayFactory) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = passthrough(relays.config())
    data["apps"]["contoso"]["smtp_port"] = port
    relay = await relays.start(data)
    code, text = await send_async(relay)
    assert code == 451 and b"4." in text
    assert relay.spool.entries() == []


async def test_partial_refusal_is_250_and_the_rest_bounces_through_the_spool(
        relays: RelayFactory, sandbox: Sandbox) -> None:
    relay = await relays.start(passthrough(relays.config()))
    sandbox.exchange.inject("rcpt", "550 5.1.10 RESOLVER.ADR.RecipientNotFound",
                            rcpt="gone@example.org")
    code, text = await send_async(relay, rcpts=("gone@example.org", "here@example.org"),
                                  sender="device@printers.example")
    assert code == 250 and b"1 refused upstream" in text
    # The non-delivery report for gone@ reaches the device's sender address.
    got = await sandbox.exchange.wait_for_messages(2)
    assert list(got[0].rcpt_tos) == ["here@example.org"]
    assert list(got[1].rcpt_tos) == ["device@printers.example"]
    assert b"gone@example.org" in got[1].data
    await wait_until(lambda: relay.spool.entries() == [])


async def test_account_setting_wins_over_the_listener(relays: RelayFactory,
                                                      sandbox: Sandbox) -> None:
    data = passthrough(relays.config())
    data["accounts"][1]["delivery"] = "spool"
    relay = await relays.start(data)
    code, text = await send_async(relay)
    assert code == 250 and b"queued as" in text
    await sandbox.exchange.wait_for_messages(1)


async def test_passthrough_shares_the_mailbox_connection_limit(relays: RelayFactory,
                                                               sandbox: Sandbox) -> None:
    """The spooled lane's idle worker gives its slot to the passthrough transaction: with
    connections_per_mailbox 1, Exchange never sees two connections for the mailbox."""
    data = relays.config()
    data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]
    data["delivery"].update(connections_per_mailbox=1, idle_timeout=60)
    data["accounts"][0]["mailbox"] = data["accounts"][1]["mailbox"]  # spool, same mailbox
    data["accounts"][1]["delivery"] = "passthrough"
    relay = await relays.start(data)
    code, _ = await send_async(relay, login=("scanner01", PASSWORD))
    assert code == 250
    await sandbox.exchange.wait_for_messages(1)
    assert relay.delivery.workers() == 1  # idle, holding the mailbox's only connection
    code, text = await send_async(relay)
    assert code == 250 and b"delivered" in text
    assert len(sandbox.exchange.messages) == 2
    assert sandbox.exchange.peak_open_connections == 1


async def test_passthrough_keeps_the_mailbox_pace(relays: RelayFactory,
                                                  sandbox: Sandbox) -> None:
    data = passthrough(relays.config())
    data["delivery"]["pacing"] = {"messages_per_minute": 600}  # one start every 0.1 s
    relay = await relays.start(data)
    loop = asyncio.get_running_loop()
    started = loop.time()
    # Four blocking clients at once: the default thread pool (6 threads on 2 cores) must keep
    # room for the relay's own worker-thread calls (token, spool), which share it here.
    results = await asyncio.gather(*(send_async(relay) for _ in range(4)))
    elapsed = loop.time() - started
    assert [code for code, _ in results] == [250] * 4
    assert elapsed >= 0.28  # four starts need at least three intervals of 0.1 s
    # Recipients sent in passthrough count toward the mailbox's 24-hour total too.
    assert relay.delivery.pacer.ledger.total("printers@contoso.example", time.time()) == 4


async def test_large_message_goes_through_in_pieces_intact(relays: RelayFactory,
                                                           sandbox: Sandbox) -> None:
    sandbox.exchange.record_wire = True
    relay = await relays.start(passthrough(relays.config()))
    body = ".dotted line, caf\u00e9 0123456789\r\nplain line\r\n" * 60_000  # ~2.6 MB
    code, _ = await asyncio.to_thread(send, relay.addresses["local"],
                                      message("large", body=body))
    assert code == 250
    (got,) = sandbox.exchange.messages
    assert got.data.endswith(body.encode())
    assert got.wire is not None
    assert got.wire.count(b"\r\n..dotted") == got.data.count(b"\r\n.dotted")
    assert got.wire.endswith(b"\r\n.\r\n") and got.wire.count(b"\r\n.\r\n") == 1
    assert relay.spool.entries() == []
