"""Cluster mode: a mailbox's connection slots are shared fairly between nodes. A node with a
backlog for a mailbox (an ERP's invoice run through relay A) must not keep every slot while a
scan accepted by relay B for the same mailbox waits for that whole backlog and then for A's
idle connections to time out."""

from __future__ import annotations

import asyncio

import pytest
from conftest import RelayFactory, message, send
from pgserver import PgServer

from relay.sandbox import Sandbox

pytest.importorskip("relay.spool.postgres")

BACKLOG = 20


def _subject(data: bytes) -> str:
    return data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()


async def test_a_node_waiting_for_a_busy_mailbox_gets_its_share_of_the_slots(
        relays: RelayFactory, sandbox: Sandbox, pg_server: PgServer) -> None:
    dsn = pg_server.dsn(pg_server.new_database("fair"))
    sandbox.exchange.delay("data", 0.25, times=1000)  # Exchange takes its time: a backlog
    started = []
    for node in ("a", "b"):
        data = relays.config()
        data["spool"] = {"postgres": dsn, "node": node, "lease": "5s"}
        data["delivery"].update(connections_per_mailbox=1, idle_timeout=30)
        started.append(await relays.start(data))
    a, b = started
    for n in range(BACKLOG):
        code, _ = await asyncio.to_thread(send, a.addresses["local"], message(f"invoice {n}"))
        assert code == 250
    await sandbox.exchange.wait_for_messages(1, timeout=20)  # A holds the only slot now
    code, _ = await asyncio.to_thread(send, b.addresses["local"], message("scan"))
    assert code == 250
    got = await sandbox.exchange.wait_for_messages(BACKLOG + 1, timeout=60)
    order = [_subject(m.data) for m in got]
    # B waited for about a second and a message, not for A's 20 x 0.25 s and its idle 30 s.
    assert order.index("scan") < BACKLOG // 2, order
    assert sandbox.exchange.peak_signed_in["printers@contoso.example"] == 1
