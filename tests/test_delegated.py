"""Delegated sign-in (personal Outlook.com and work mailboxes) against the sandbox's fake Entra.

Device-code sign-in, encrypted token store, rotating refresh tokens, revocation (mail waits,
the log names the login command, a new login delivers the queue) and restarts.
"""

from __future__ import annotations

import asyncio
import html
import io
import logging
import os
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PASSWORD, message, send, wait_until
from cryptography.fernet import Fernet

from relay.config import records as config_mod
from relay.config.records import ConfigError
from relay.diagnosis.explain import Context, Verdict, explain_token_error
from relay.doctor.command import diagnose
from relay.doctor.report import Status
from relay.login import LoginError, run_login
from relay.sandbox import Sandbox
from relay.sandbox.apps import DEMO_APP, SandboxApp
from relay.service.lifecycle import Relay

PERSONAL = SandboxApp(tenant="consumers", client_id="9e5f94bc-e8a4-4e73-b8be-63364c29d753",
                      roles=())
WORK = SandboxApp(tenant="work-tenant", client_id="0b4a3c2d-1e2f-4a5b-8c7d-9e0f1a2b3c4d",
                  client_secret="work-delegated-secret", roles=())
ME = "me@outlook.example"
ANN = "ann@contoso.example"
KEY = Fernet.generate_key().decode()


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with Sandbox(tmp_path / "sandbox", apps=(DEMO_APP, PERSONAL, WORK)) as sandbox:
        sandbox.entra.delegated.device_code_interval = 1
        yield sandbox


def write_config(box: Sandbox, tmp_path: Path, password_hash: str) -> Path:
    def app(registration: SandboxApp) -> dict[str, Any]:
        data: dict[str, Any] = {
            "flow": "delegated", "tenant": registration.tenant,
            "client_id": registration.client_id,
            "authority": box.authority(registration.tenant),
            "smtp_host": box.smtp_host, "smtp_port": box.smtp_port,
            "ca_file": str(box.ca_file)}
        if registration.client_secret:
            data["client_secret"] = registration.client_secret
        return data

    (tmp_path / "token.key").write_text(KEY + "\n")
    data = {
        "listeners": [{"name": "local", "bind": "127.0.0.1:0", "tls": "none",
                       "cleartext_auth_networks": ["127.0.0.0/8"]}],
        "apps": {"outlook": app(PERSONAL), "work": app(WORK)},
        "accounts": [
            {"name": "personal", "networks": ["127.0.0.0/8"], "app": "outlook", "mailbox": ME},
            {"name": "ann", "username": "ann01", "password_hash": password_hash,
             "app": "work", "mailbox": ANN},
        ],
        "spool": {"directory": str(tmp_path / "spool"), "min_free_space": 0},
        "delivery": {"min_backoff": 0.2, "max_backoff": 0.5, "idle_timeout": 0.1,
                     "token_refresh_margin": 0.5},
        "token_store": {"directory": str(tmp_path / "tokens"),
                        "key": {"file": str(tmp_path / "token.key")}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def approving(box: Sandbox, user: str, *, after: int = 1) -> tuple[Callable[[float], None],
                                                                    list[float]]:
    """A fake sleep for the login's polling loop: the person approves on the ``after``-th wait."""
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == after:
            code, = box.entra.delegated.pending_user_codes()
            box.entra.approve_device_code(code, user=user)

    return sleep, waits


async def login(box: Sandbox, path: Path, account: str, user: str) -> str:
    sleep, _ = approving(box, user)
    config = config_mod.load(path)
    return await asyncio.to_thread(run_login, config, path, account, out=io.StringIO(),
                                   sleep=sleep)


async def start(path: Path) -> Relay:
    relay = Relay(config_mod.load(path), config_path=path)
    await relay.start()
    return relay


async def test_device_code_pending_slow_down_then_success(
        box: Sandbox, tmp_path: Path, password_hash: str) -> None:
    path = write_config(box, tmp_path, password_hash)
    box.entra.inject(400, {"error": "slow_down", "error_description": "AADSTS70016: slow down"})
    sleep, waits = approving(box, ME, after=2)
    out = io.StringIO()
    user = await asyncio.to_thread(run_login, config_mod.load(path), path, "personal",
                                   out=out, sleep=sleep)
    assert user == ME
    # slow_down adds 5 s to the 1 s interval (RFC 8628 §3.5); pending keeps the new interval.
    assert waits == [6, 6]
    assert "devicelogin" in out.getvalue() and "enter the code" in out.getvalue()
    assert (tmp_path / "tokens" / "personal.token").exists()


async def test_device_code_expired(box: Sandbox, tmp_path: Path, password_hash: str) -> None:
    path = write_config(box, tmp_path, password_hash)

    def sleep(_seconds: float) -> None:
        code, = box.entra.delegated.pending_user_codes()
        box.entra.delegated.expire(code)

    with pytest.raises(LoginError, match="expired"):
        await asyncio.to_thread(run_login, config_mod.load(path), path, "personal",
                                out=io.StringIO(), sleep=sleep)
    assert not (tmp_path / "tokens" / "personal.token").exists()


async def test_login_as_another_user_is_refused(box: Sandbox, tmp_path: Path,
                                                password_hash: str) -> None:
    path = write_config(box, tmp_path, password_hash)
    with pytest.raises(LoginError, match=r"signed in as someone@outlook\.example"):
        await login(box, path, "personal", "someone@outlook.example")


async def test_cache_file_is_private_and_encrypted(box: Sandbox, tmp_path: Path,
                                                   password_hash: str) -> None:
    path = write_config(box, tmp_path, password_hash)
    await login(box, path, "personal", ME)
    file = tmp_path / "tokens" / "personal.token"
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    blob = file.read_bytes()
    refresh_tokens = list(box.entra.delegated._refresh)
    assert refresh_tokens and not any(rt.encode() in blob for rt in refresh_tokens)
    assert b"refresh_token" not in blob.lower() and ME.encode() not in blob
    assert b"SANDBOX-RT" in Fernet(KEY.encode()).decrypt(blob)
    assert not [p for p in file.parent.iterdir() if p.name.startswith(".tmp")]


async def test_refresh_rotation_revocation_and_new_login(
        box: Sandbox, tmp_path: Path, password_hash: str,
        caplog: pytest.LogCaptureFixture) -> None:
    box.entra.token_lifetime = 1  # refresh every half second: many refreshes, real expiry
    path = write_config(box, tmp_path, password_hash)
    await login(box, path, "personal", ME)
    relay = await start(path)
    try:
        address = relay.addresses["local"]
        for i in range(3):
            await asyncio.to_thread(send, address, message(f"rotate {i}"))
            await box.exchange.wait_for_messages(i + 1)
            # Let the 1 s access token run out, so the next message needs a refresh.
            expires = relay.tokens.status("outlook").expires_at
            await wait_until(lambda e=expires: time.time() > e, timeout=3)
        assert box.entra.delegated.refresh_requests >= 3
        # Rotation: each refresh retired the old refresh token; exactly the newest is live.
        assert box.entra.delegated.refresh_tokens_of(ME) == 1
        assert all(m.auth_user == ME for m in box.exchange.messages)

        caplog.set_level(logging.ERROR, logger="m365relay")
        box.entra.revoke_refresh_tokens(ME)
        await asyncio.to_thread(send, address, message("while revoked"))
        await asyncio.to_thread(send, address, message("also queued"))
        command = f"m365relay login personal --config {path}"
        await wait_until(lambda: command in caplog.text, timeout=10)
        assert "AADSTS50173" in caplog.text
        status = relay.tokens.status("outlook")
        assert command in status.error and status.failures == 1
        assert relay.delivery.counters.bounced == 0 and len(box.exchange.messages) == 3

        # No restart: the relay sees the new file; login makes the deferred mail due now.
        sleep, _ = approving(box, ME)
        out = io.StringIO()
        await asyncio.to_thread(run_login, config_mod.load(path), path, "personal", out=out,
                                sleep=sleep)
        assert "2 queued message(s) for me@outlook.example are due now" in out.getvalue()
        await box.exchange.wait_for_messages(5)
        assert relay.tokens.status("outlook").error == ""
        assert relay.delivery.counters.bounced == 0
    finally:
        await relay.stop(timeout=5)


async def test_restart_uses_stored_sign_in(box: Sandbox, tmp_path: Path,
                                           password_hash: str) -> None:
    path = write_config(box, tmp_path, password_hash)
    await login(box, path, "personal", ME)
    for i in range(2):
        relay = await start(path)
        try:
            await asyncio.to_thread(send, relay.addresses["local"], message(f"run {i}"))
            await box.exchange.wait_for_messages(i + 1)
        finally:
            await relay.stop(timeout=5)
    assert box.entra.delegated.pending_user_codes() == []
    assert box.entra.delegated.refresh_requests == 2  # one per process, no person involved


async def test_two_accounts_at_once(box: Sandbox, tmp_path: Path, password_hash: str) -> None:
    path = write_config(box, tmp_path, password_hash)
    await login(box, path, "personal", ME)
    await login(box, path, "ann", ANN)
    relay = await start(path)
    try:
        address = relay.addresses["local"]
        await asyncio.gather(
            asyncio.to_thread(send, address, message("from personal")),
            asyncio.to_thread(send, address, message("from ann"), login=("ann01", PASSWORD)))
        received = await box.exchange.wait_for_messages(2)
        assert {(m.auth_user, m.client_id) for m in received} == {
            (ME, PERSONAL.client_id), (ANN, WORK.client_id)}
        assert relay.tokens.delegated is not None
        statuses = {s.account: s for s in relay.tokens.delegated.statuses()}
        assert statuses.keys() == {"personal", "ann"}
        assert not any(s.needs_login for s in statuses.values())
        # One refresh each: the two sign-ins are separate files and separate single-flights.
        assert box.entra.delegated.refresh_requests == 2
    finally:
        await relay.stop(timeout=5)


async def test_not_signed_in_defers_and_names_command(
        box: Sandbox, tmp_path: Path, password_hash: str,
        caplog: pytest.LogCaptureFixture) -> None:
    path = write_config(box, tmp_path, password_hash)
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "http": {"bind": "127.0.0.1:0"}}))
    command = f"m365relay login personal --config {path}"
    report = await diagnose(path, account="personal")
    token = next(c for c in report.accounts[0].checks if c.link == "token")
    assert token.status is Status.FAIL and command in token.fix
    caplog.set_level(logging.ERROR, logger="m365relay")
    relay = await start(path)
    try:
        await asyncio.to_thread(send, relay.addresses["local"], message("early"))
        await wait_until(lambda: "has not signed in yet" in caplog.text)
        assert command in caplog.text
        assert relay.http_address is not None
        page = await asyncio.to_thread(_get, relay.http_address, "/")
        assert "needs sign-in" in page and html.escape(command) in page
        assert 'm365relay_signin_needed{account="personal"} 1.0' in await asyncio.to_thread(
            _get, relay.http_address, "/metrics")
        await login(box, path, "personal", ME)
        await box.exchange.wait_for_messages(1)
        assert 'm365relay_signin_needed{account="personal"} 0.0' in await asyncio.to_thread(
            _get, relay.http_address, "/metrics")
    finally:
        await relay.stop(timeout=5)
    report = await diagnose(path, account="personal")
    assert [c.status for c in report.accounts[0].checks if c.link in ("token", "xoauth2")] == [
        Status.OK, Status.OK]


def _get(address: tuple[str, int], path: str) -> str:
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}{path}",
                                timeout=10) as response:
        return str(response.read().decode())


async def test_login_cli_subprocess(box: Sandbox, tmp_path: Path, password_hash: str) -> None:
    path = write_config(box, tmp_path, password_hash)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "login", "personal", "--config", str(path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        assert b"enter the code" in line
        code, = box.entra.delegated.pending_user_codes()
        assert code.encode() in line
        box.entra.approve_device_code(code, user=ME)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert b"Signed in as me@outlook.example" in out
    assert (tmp_path / "tokens" / "personal.token").exists()


def test_config_defaults_and_checks(tmp_path: Path, password_hash: str) -> None:
    base: dict[str, Any] = {
        "listeners": [{"name": "l", "bind": "127.0.0.1:0", "tls": "none"}],
        "apps": {"outlook": {"flow": "delegated", "tenant": "consumers",
                             "client_id": PERSONAL.client_id}},
        "accounts": [{"name": "p", "networks": ["127.0.0.1/32"], "app": "outlook",
                      "mailbox": ME}],
        "spool": {"directory": str(tmp_path / "spool")},
    }
    with pytest.raises(ConfigError, match="token_store"):
        config_mod.parse(base, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="never inline"):
        config_mod.parse({**base, "token_store": {"directory": "t", "key": KEY}},
                         base_dir=tmp_path)
    os.environ["M365RELAY_TEST_TOKEN_KEY"] = KEY
    try:
        config = config_mod.parse({**base, "token_store": {
            "directory": "t", "key": {"env": "M365RELAY_TEST_TOKEN_KEY"}}}, base_dir=tmp_path)
    finally:
        del os.environ["M365RELAY_TEST_TOKEN_KEY"]
    app = config.apps["outlook"]
    assert (app.smtp_host, app.smtp_port) == ("smtp-mail.outlook.com", 587)
    assert app.scope == "https://outlook.office.com/SMTP.Send"
    assert app.authority_url == "https://login.microsoftonline.com/consumers"


def test_revoked_refresh_token_is_explained_as_sign_in_again() -> None:
    for code in ("AADSTS50173", "AADSTS700082", "AADSTS70000"):
        explanation = explain_token_error("invalid_grant", f"{code}: The grant has expired.",
                                          status=400, ctx=Context(app="outlook", mailbox=ME))
        assert explanation.verdict is Verdict.DEFER_ADMIN
        assert "m365relay login" in explanation.fix and ME in explanation.summary


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("M365RELAY_TOKEN_KEY", KEY)
    example = Path(__file__).parent.parent / "config" / "outlook-personal.example.yaml"
    config = config_mod.load(example)
    assert config.apps["outlook"].flow == "delegated"
    assert config.token_store is not None


def test_delegated_app_rejects_app_only_credentials(tmp_path: Path) -> None:
    data = {"flow": "delegated", "tenant": "consumers", "client_id": PERSONAL.client_id,
            "transport": "graph"}
    with pytest.raises(ValueError, match="SMTP only"):
        config_mod.App.model_validate(data, context={"base_dir": str(tmp_path)})
