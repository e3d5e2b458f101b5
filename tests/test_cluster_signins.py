"""Delegated sign-ins in cluster mode: one copy in the queue's database for every node.

The sandbox's fake Entra retires a refresh token the moment it is used (rotation at its
strictest), so two relays each refreshing a copy of their own would lock each other out with
``invalid_grant`` within a minute. Here two relays on one real PostgreSQL send as one
Outlook.com mailbox with access tokens of one second, refreshing many times, at once.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from conftest import message, send, wait_until
from cryptography.fernet import Fernet
from pgserver import PgServer

from relay.config import records as config_mod
from relay.login import run_login
from relay.sandbox import Sandbox
from relay.sandbox.apps import DEMO_APP, SandboxApp
from relay.service.lifecycle import Relay

pytest.importorskip("relay.spool.postgres")

PERSONAL = SandboxApp(tenant="consumers", client_id="9e5f94bc-e8a4-4e73-b8be-63364c29d753",
                      roles=())
ME = "me@outlook.example"


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with Sandbox(tmp_path / "sandbox", apps=(DEMO_APP, PERSONAL)) as sandbox:
        sandbox.entra.delegated.device_code_interval = 1
        yield sandbox


def _config(box: Sandbox, tmp_path: Path, dsn: str, node: str) -> Path:
    key = tmp_path / "token.key"
    if not key.exists():
        key.write_text(Fernet.generate_key().decode() + "\n")
    data: dict[str, Any] = {
        "listeners": [{"name": "local", "bind": "127.0.0.1:0", "tls": "none"}],
        "apps": {"outlook": {
            "flow": "delegated", "tenant": PERSONAL.tenant, "client_id": PERSONAL.client_id,
            "authority": box.authority(PERSONAL.tenant), "smtp_host": box.smtp_host,
            "smtp_port": box.smtp_port, "ca_file": str(box.ca_file)}},
        "accounts": [{"name": "personal", "networks": ["127.0.0.0/8"], "app": "outlook",
                      "mailbox": ME}],
        "spool": {"postgres": dsn, "node": node, "lease": "5s"},
        "delivery": {"min_backoff": 0.2, "max_backoff": 0.5, "idle_timeout": 0.1,
                     "token_refresh_margin": 0.5, "pacing": {"messages_per_minute": 0}},
        # No directory: in cluster mode the sign-ins are rows of the database.
        "token_store": {"key": {"file": str(key)}},
    }
    path = tmp_path / f"relay-{node}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def _login(box: Sandbox, path: Path) -> str:
    def sleep(_seconds: float) -> None:
        code, = box.entra.delegated.pending_user_codes()
        box.entra.approve_device_code(code, user=ME)

    out = io.StringIO()
    await asyncio.to_thread(run_login, config_mod.load(path), path, "personal", out=out,
                            sleep=sleep)
    return out.getvalue()


async def test_two_relays_share_one_rotating_sign_in(
        box: Sandbox, tmp_path: Path, pg_server: PgServer) -> None:
    db = pg_server.new_database("signin")
    dsn = pg_server.dsn(db)
    box.entra.token_lifetime = 1  # a refresh for nearly every message, on both nodes
    box.entra.delegated.refresh_delay = 0.3  # both nodes' refreshes overlap
    paths = [_config(box, tmp_path, dsn, node) for node in ("a", "b")]
    relays = [Relay(config_mod.load(p), config_path=p) for p in paths]
    for relay in relays:
        await relay.start()
    try:
        said = await _login(box, paths[0])
        assert "stored in the queue database" in said, said
        rounds = 6
        for i in range(rounds):
            # Both nodes at once, after the access token ran out: both want a refresh now.
            await asyncio.gather(*(asyncio.to_thread(send, relay.addresses["local"],
                                                     message(f"round {i} via {n}"))
                                   for n, relay in enumerate(relays)))
            await box.exchange.wait_for_messages(2 * (i + 1), timeout=20)
            expires = max(r.tokens.status("outlook").expires_at for r in relays)
            await wait_until(lambda e=expires: time.time() > e, timeout=5)
        statuses = [r.tokens.status("outlook") for r in relays]
    finally:
        for relay in relays:
            await relay.stop(timeout=5)

    assert [s.error for s in statuses] == ["", ""], statuses
    assert len(box.exchange.messages) == 2 * rounds
    assert all(m.auth_user == ME for m in box.exchange.messages)
    # Every refresh used the newest refresh token: none was refused, one is live.
    assert box.entra.delegated.refused_refreshes == 0
    assert box.entra.delegated.refresh_tokens_of(ME) == 1
    assert box.entra.delegated.refresh_requests >= rounds
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT data, generation, refreshing_by "
                                  "FROM m365relay.signins WHERE account = 'personal'")
    finally:
        await conn.close()
    assert row["generation"] > rounds  # each rotation written back
    assert row["refreshing_by"] is None  # no lease left behind
    assert b"SANDBOX-RT" not in bytes(row["data"])  # encrypted, as the files are
