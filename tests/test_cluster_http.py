"""The HTTP endpoint in cluster mode: the status page, /api/status and /metrics show the
cluster's queue and each node's leases; /readyz fails while the queue database is away, and
the page and /metrics say so instead of answering 500."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import RelayFactory, message, send
from pgserver import PgServer
from test_http import get, metrics, value, with_http

from relay.sandbox import Sandbox

pytest.importorskip("relay.spool.postgres")


async def test_status_metrics_and_readiness_follow_the_database(
        relays: RelayFactory, sandbox: Sandbox, pg_server: PgServer) -> None:
    dsn = pg_server.dsn(pg_server.new_database("http"))
    data = with_http(relays)
    data["spool"] = {"postgres": dsn, "node": "web-a", "lease": "5s"}
    relay = await relays.start(data)
    other_data = relays.config()
    other_data["spool"] = {"postgres": dsn, "node": "web-b", "lease": "5s"}
    other = await relays.start(other_data)

    await asyncio.to_thread(send, relay.addresses["local"], message("via the cluster"))
    await sandbox.exchange.wait_for_messages(1)
    samples = await metrics(relay)
    assert value(samples, "m365relay_spool_up") == 1
    for node in ("web-a", "web-b"):
        assert value(samples, "m365relay_cluster_node_up", node=node) == 1
    status, _, body = await get(relay, "/api/status")
    cluster = {n["node"]: n for n in json.loads(body)["cluster"]}
    assert status == 200 and set(cluster) == {"web-a", "web-b"}
    assert cluster["web-a"]["me"] and not cluster["web-b"]["me"]
    status, _, page = await get(relay, "/")
    assert status == 200 and "<h2>Cluster</h2>" in page and "web-b" in page
    assert (await get(relay, "/readyz"))[0] == 200

    await asyncio.to_thread(pg_server.stop, "fast")
    try:
        status, _, body = await get(relay, "/readyz")
        assert status == 503 and "spool.postgres" in body, body
        samples = await metrics(relay)
        assert value(samples, "m365relay_spool_up") == 0
        assert ("m365relay_queue_messages", frozenset()) not in samples  # not "empty"
        status, _, page = await get(relay, "/")
        assert status == 200 and "The queue cannot be read" in page
    finally:
        await asyncio.to_thread(pg_server.start)

    async with asyncio.timeout(30):  # the pool reconnects by itself
        while (await get(relay, "/readyz"))[0] != 200:
            await asyncio.sleep(0.1)
    await relays.stop(other)
    # The clean stop handed over: web-b is shown gone.
    status, _, body = await get(relay, "/api/status")
    cluster = {n["node"]: n for n in json.loads(body)["cluster"]}
    assert not cluster["web-b"]["alive"]
