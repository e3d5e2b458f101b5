"""Exchange's per-mailbox limits held by a cluster: two real relay processes on one real
PostgreSQL queue, both sending as one mailbox, against the sandbox's fake Exchange Online,
which refuses a fourth signed-in connection and a message over the minute's limit with
``432 4.3.2`` as Exchange does.

The pacing is scaled (600 messages a minute instead of 30) so the run takes a minute, not
fourteen. Each relay alone would keep the limits; what is checked is that the two together do:
unshared, they would open up to 6 connections and send twice the configured rate.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml
from conftest import PASSWORD, base_config, message, wait_until
from pgserver import PgServer
from relayproc import RelayProcess

from relay.sandbox import Sandbox

pytest.importorskip("asyncpg")
pytestmark = pytest.mark.slow

MAILBOX = "printers@contoso.example"
PER_RELAY = 200
PER_MINUTE = 600  # delivery.pacing.messages_per_minute, scaled from Exchange's 30
CONNECTIONS = 3  # Exchange's concurrent connections per mailbox
STREAMS = 3  # per relay: an app server's pool, no AUTH, many messages per connection
PRINTERS = 2  # per relay: AUTH on every connection, one message each


def _config(sandbox: Sandbox, tmp_path: Path, password_hash: str, dsn: str, node: str) -> Path:
    data: dict[str, Any] = base_config(sandbox, tmp_path, password_hash)
    for account in data["accounts"]:  # the login and the network both send as MAILBOX
        account["mailbox"] = MAILBOX
    data["spool"] = {"postgres": dsn, "node": node, "lease": "5s"}
    data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]
    data["delivery"]["connections_per_mailbox"] = CONNECTIONS
    data["delivery"]["pacing"] = {"messages_per_minute": PER_MINUTE}
    path = tmp_path / f"relay-{node}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def _send(port: int, tag: str, subjects: list[str]) -> None:
    """One relay's share: the app server's streams and the printers, all from 127.0.0.1."""
    todo = list(subjects)

    async def stream() -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30) as client:
            while todo:
                subject = todo.pop()
                await client.sendmail("app@contoso.example", ["a@example.org"],
                                      message(subject, body="invoice " * 500))

    async def printer() -> None:
        while todo:
            subject = todo.pop()
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30) as client:
                await client.login("scanner01", PASSWORD)
                await client.sendmail("scanner01@printers.example", ["b@example.org"],
                                      message(subject, body="scan " * 200))

    await asyncio.gather(*(stream() for _ in range(STREAMS)),
                         *(printer() for _ in range(PRINTERS)))


def _most_in(times: list[float], span: float) -> int:
    """The most of ``times`` (sorted) within any ``span`` seconds."""
    most, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] > span:
            first += 1
        most = max(most, last - first + 1)
    return most


async def test_two_relays_sending_as_one_mailbox_stay_within_exchanges_limits(
        sandbox: Sandbox, tmp_path: Path, password_hash: str, pg_server: PgServer) -> None:
    db = pg_server.new_database("limits")
    dsn = pg_server.dsn(db)
    exchange = sandbox.exchange
    exchange.mail_dir = None
    exchange.rate_limit(PER_MINUTE, 60.0)
    assert exchange.limits.connections == CONNECTIONS
    relays = [await RelayProcess.start(_config(sandbox, tmp_path, password_hash, dsn, node))
              for node in ("a", "b")]
    subjects = {r: [f"{r}-{n}" for n in range(PER_RELAY)] for r in ("a", "b")}
    try:
        began = time.monotonic()
        await asyncio.gather(*(_send(relay.port, tag, subjects[tag])
                               for relay, tag in zip(relays, ("a", "b"), strict=True)))
        await exchange.wait_for_messages(2 * PER_RELAY, timeout=180)
        took = time.monotonic() - began
        await wait_until(lambda: pg_server.psql(
            "SELECT count(*) FROM m365relay.messages", db) == "0", timeout=30)
        # The rolling day's recipients, counted for the cluster (each node adds its own).
        await wait_until(lambda: pg_server.psql(
            "SELECT coalesce(sum(recipients), 0) FROM m365relay.mailbox_sends", db)
            == str(2 * PER_RELAY), timeout=15)
        by_node = pg_server.psql("SELECT node || '=' || count(*) FROM m365relay.mailbox_sends "
                                 "GROUP BY node ORDER BY node", db).split()
    finally:
        for relay in relays:
            await relay.kill()

    delivered = sorted(m.seq for m in exchange.messages)
    assert len(delivered) == 2 * PER_RELAY, "a message was delivered twice"
    assert exchange.refused_for_limits == [], exchange.refused_for_limits[:3]
    peak = exchange.peak_signed_in[MAILBOX]
    assert peak <= CONNECTIONS, f"{peak} connections signed in as {MAILBOX} at once"
    # Both nodes sent (each delivers what it accepted), and together no faster than one relay:
    # 60 / PER_MINUTE seconds apart, so any closed tenth of a minute holds a tenth of the limit
    # and one (plus what was already on its way on the connections, one each). Unshared, the
    # two would send twice that.
    assert [n.split("=")[0] for n in by_node] == ["a", "b"], by_node
    answered = sorted(exchange.answered_at.values())
    assert _most_in(answered, 60.0) <= PER_MINUTE
    most = _most_in(answered, 6.0)
    assert most <= PER_MINUTE // 10 + 1 + CONNECTIONS, f"{most} messages in 6 s"
    print(f"\n{len(delivered)} delivered in {took:.1f} s by {by_node}; peak {peak} "
          f"connections for the mailbox; at most {most} messages in any 6 s")
