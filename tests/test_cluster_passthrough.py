"""``delivery: passthrough`` in cluster mode: a transaction the client waits on borrows one of
the cluster's connection slots for its mailbox, so two relays passing mail straight through
never open more connections for a mailbox than ``connections_per_mailbox`` between them."""

from __future__ import annotations

import asyncio

import pytest
from conftest import RelayFactory
from pgserver import PgServer
from test_passthrough import passthrough, send_async

from relay.sandbox import Sandbox

pytest.importorskip("relay.spool.postgres")

MAILBOX = "printers@contoso.example"


async def test_two_passthrough_relays_share_the_mailbox_connection_slots(
        relays: RelayFactory, sandbox: Sandbox, pg_server: PgServer) -> None:
    dsn = pg_server.dsn(pg_server.new_database("pass"))
    sandbox.exchange.delay("data", 0.2, times=100)  # transactions overlap
    started = []
    for node in ("a", "b"):
        data = passthrough(relays.config())
        data["spool"] = {"postgres": dsn, "node": node, "lease": "5s"}
        data["delivery"].update(connections_per_mailbox=1, idle_timeout=0.1)
        started.append(await relays.start(data))
    # Two devices per relay at once, each waiting for Exchange's verdict (in turn: within
    # the 10 s a device waits for the reply to its final dot).
    results = await asyncio.gather(*(send_async(relay) for relay in started for _ in range(2)))
    codes = sorted(code for code, _ in results)
    assert codes == [250] * 4, results
    assert len(sandbox.exchange.messages) == 4
    peak = sandbox.exchange.peak_signed_in[MAILBOX]
    assert peak == 1, f"{peak} connections signed in as {MAILBOX} at once"
