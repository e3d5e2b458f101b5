"""The PostgreSQL store's own promises, beyond the seam's contract (test_store_contract.py):
a 35 MB scan is written and read back in pieces, never held in memory twice, and a database
that turned read-only answers 451, never 250, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc

import pytest
from conftest import RelayFactory, message, send
from pgserver import PgServer
from test_store_contract import envelope

from relay.config import records as config_mod
from relay.message import READ_CHUNK
from relay.sandbox import Sandbox

pytest.importorskip("asyncpg")
from relay.spool.postgres import PgStore

SCAN = 35 * 1024 * 1024
# What a second copy of the scan would cost, against what the pieces in flight may: a
# statement's batch of chunks on the way in, one piece on the way out, and the driver's buffers.
BOUND = 12 * 1024 * 1024


async def test_a_35_mb_scan_goes_in_and_out_in_pieces(pg_server: PgServer) -> None:
    dsn = pg_server.dsn(pg_server.new_database("scan"))
    store = PgStore(config_mod.SpoolSettings.model_validate({"postgres": dsn, "node": "a"}))
    await store.open()
    # As ingress hands it over: the DATA in pieces, already in memory once.
    piece = bytes(range(256)) * (READ_CHUNK // 256)
    parts = [piece] * (SCAN // READ_CHUNK)
    digest = hashlib.sha256(b"".join(parts)).hexdigest()
    try:
        tracemalloc.start()
        queue_id = await store.commit(envelope(), parts)
        _, peak_in = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        out = await store.checkout(queue_id)
        message = out.message
        assert message is not None and message.size == SCAN
        read = hashlib.sha256()
        for start in range(0, SCAN, READ_CHUNK):
            read.update(await asyncio.to_thread(message.read_at, start, READ_CHUNK))
        _, peak_out = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        await store.checkin(out)
    finally:
        tracemalloc.stop()
        await store.close()
    assert read.hexdigest() == digest
    assert peak_in < BOUND, f"commit held {peak_in / 2**20:.1f} MiB at once"
    assert peak_out < BOUND, f"reading held {peak_out / 2**20:.1f} MiB at once"
    chunks = pg_server.psql("SELECT count(*), max(length(data)) FROM m365relay.chunks",
                            dsn.rsplit("/", 1)[1])
    print(f"\ncommit peak {peak_in / 2**20:.1f} MiB, read peak {peak_out / 2**20:.1f} MiB; "
          f"chunks (count|largest): {chunks}")


async def test_a_read_only_database_is_451_never_250_and_mail_flows_after(
        relays: RelayFactory, sandbox: Sandbox, pg_server: PgServer) -> None:
    """As after a failover that left the relay on a standby: every write refused."""
    db = pg_server.new_database("ro")
    data = relays.config()
    data["spool"] = {"postgres": pg_server.dsn(db), "node": "a", "lease": "5s"}
    relay = await relays.start(data)
    address = relay.addresses["local"]

    def read_only(on: bool) -> None:
        setting = "SET default_transaction_read_only = on" if on else \
            "RESET default_transaction_read_only"
        pg_server.psql(f'ALTER DATABASE "{db}" {setting}')
        # The pool's sessions took the old default: end them, as a failover does.
        pg_server.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "  # noqa: S608 -- our own name
                       f"WHERE datname = '{db}'")

    await asyncio.to_thread(read_only, True)
    for n in range(3):
        code, reply = await asyncio.to_thread(send, address, message(f"read-only {n}"))
        assert (code, reply[:5]) == (451, b"4.3.0"), reply
    await asyncio.to_thread(read_only, False)
    async with asyncio.timeout(30):  # the pool reconnects by itself
        while (await asyncio.to_thread(send, address, message("writable")))[0] != 250:
            await asyncio.sleep(0.2)
    got = await sandbox.exchange.wait_for_messages(1)
    assert [m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in got] == [b"writable"]


@pytest.mark.slow
async def test_a_delivery_the_database_could_not_record_is_not_sent_twice(
        relays: RelayFactory, sandbox: Sandbox, pg_server: PgServer) -> None:
    """Exchange said 250, then the database was away for longer than a lease before the
    DELETE that records it: the node keeps the claim and keeps trying, and nobody sends it
    again (a copy is sent twice only when a node dies, at most once per message in flight)."""
    db = pg_server.new_database("late")
    data = relays.config()
    data["spool"] = {"postgres": pg_server.dsn(db), "node": "a", "lease": "5s"}
    relay = await relays.start(data)
    sandbox.exchange.delay("data", 2.0)  # Exchange thinks; the database goes meanwhile
    code, _ = await asyncio.to_thread(send, relay.addresses["local"], message("once"))
    assert code == 250
    async with asyncio.timeout(10):
        while not sandbox.exchange.delays_started:
            await asyncio.sleep(0.02)
    await asyncio.to_thread(pg_server.stop, "fast")
    try:
        await sandbox.exchange.wait_for_messages(1, timeout=10)
        await asyncio.sleep(7)  # longer than the lease: the DELETE's own retries give up
    finally:
        await asyncio.to_thread(pg_server.start)
    async with asyncio.timeout(30):
        while pg_server.psql("SELECT count(*) FROM m365relay.messages", db) != "0":
            await asyncio.sleep(0.2)
    # Past another lease and a heartbeat: still the one copy.
    await asyncio.sleep(6)
    assert len(sandbox.exchange.messages) == 1
