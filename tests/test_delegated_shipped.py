"""Delegated sign-in as a new user meets it: the sandbox's approval page, a malformed token key,
a token directory the service cannot write, and hints that name the config in use."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml
from conftest import send, wait_until
from test_delegated import ME, box, login, start, write_config

from relay.config import commands
from relay.doctor.command import diagnose
from relay.doctor.report import Status
from relay.sandbox import Sandbox

__all__ = ["box"]  # the sandbox fixture, shared with test_delegated
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


async def _cli(*argv: str, timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *argv, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, env=ENV)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_login_is_approved_on_the_sandbox_page_and_revoked_there(
        box: Sandbox, tmp_path: Path, password_hash: str) -> None:
    path = write_config(box, tmp_path, password_hash)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "login", "personal", "--config", str(path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
        url, code = re.search(r"(https://\S+/devicelogin)\S* and enter the code (\w+)",
                              line).groups()  # type: ignore[union-attr]

        def browser() -> None:  # what a person does with the printed URL
            page = requests.get(url, verify=str(box.ca_file), timeout=10)
            assert page.status_code == 200 and 'name="user_code"' in page.text
            wrong = requests.post(url, data={"user_code": "NOTACODE", "user": ME},
                                  verify=str(box.ca_file), timeout=10)
            assert wrong.status_code == 400 and "not valid" in wrong.text
            done = requests.post(url, data={"user_code": code.lower(), "user": ME},
                                 verify=str(box.ca_file), timeout=10)
            assert done.status_code == 200 and f"Signed in as {ME}" in done.text

        await asyncio.to_thread(browser)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert f"Signed in as {ME}" in out.decode()
    assert box.entra.delegated.refresh_tokens_of(ME) == 1

    revoke_url = url.replace("/devicelogin", "/revoke")
    form = await asyncio.to_thread(requests.get, revoke_url, verify=str(box.ca_file), timeout=10)
    assert 'name="user"' in form.text
    revoked = await asyncio.to_thread(requests.post, revoke_url, data={"user": ME},
                                      verify=str(box.ca_file), timeout=10)
    assert revoked.status_code == 200 and "Revoked 1 refresh token" in revoked.text
    assert box.entra.delegated.refresh_tokens_of(ME) == 0


def _bad_key(path: Path) -> Path:
    key = path.parent / "token.key"
    key.write_text("notakey\n")
    return key


async def test_malformed_token_key_is_a_config_error_everywhere(
        box: Sandbox, tmp_path: Path, password_hash: str) -> None:
    path = write_config(box, tmp_path, password_hash)
    key = _bad_key(path)
    for argv in (("check-config", str(path)), ("serve", "--config", str(path)),
                 ("doctor", "--config", str(path))):
        code, out = await _cli(*argv)
        assert code == 78, out
        assert "token_store.key" in out and str(key) in out and "Fernet key" in out, out
        assert "Traceback" not in out and "bug" not in out, out


async def test_sighup_with_a_malformed_token_key_keeps_the_old_config(
        box: Sandbox, tmp_path: Path, password_hash: str,
        caplog: pytest.LogCaptureFixture) -> None:
    path = write_config(box, tmp_path, password_hash)
    await login(box, path, "personal", ME)
    relay = await start(path)
    try:
        _bad_key(path)
        caplog.set_level(logging.INFO, logger="m365relay")
        # As serve's SIGHUP handler runs it (loop.add_signal_handler): a callback, whose
        # exception would be logged as "Exception in callback Relay.reload()".
        loop = asyncio.get_running_loop()
        failures: list[dict[str, object]] = []
        loop.set_exception_handler(lambda _, context: failures.append(context))
        try:
            loop.call_soon(relay.reload)
            await wait_until(lambda: "new config refused" in caplog.text)
        finally:
            loop.set_exception_handler(None)
        assert failures == []
        assert "token_store.key" in caplog.text and "Fernet key" in caplog.text
        # The old key still decrypts the stored sign-in: mail goes.
        await asyncio.to_thread(send, relay.addresses["local"], b"Subject: after\r\n\r\nx\r\n")
        (got,) = await box.exchange.wait_for_messages(1, timeout=20)
        assert got.auth_user == ME
    finally:
        await relay.stop(timeout=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unshare() -> str:
    found = shutil.which("unshare")
    probe = subprocess.run([found or "unshare", "-m", "true"], capture_output=True,
                           check=False) if found else None
    if probe is None or probe.returncode != 0:
        reason = "needs `unshare -m` (root, util-linux) to mount the token directory read-only"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    assert found is not None
    return found


async def test_refresh_into_a_read_only_token_directory_is_explained(
        box: Sandbox, tmp_path: Path, password_hash: str) -> None:
    unshare = _unshare()
    path = write_config(box, tmp_path, password_hash)
    port = _free_port()
    data = yaml.safe_load(path.read_text())
    data["listeners"][0]["bind"] = f"127.0.0.1:{port}"
    path.write_text(yaml.safe_dump(data))
    await login(box, path, "personal", ME)
    tokens = tmp_path / "tokens"
    # As under ProtectSystem=strict without the directory in ReadWritePaths=: EROFS.
    script = (f"mount --bind {tokens} {tokens} && mount -o remount,bind,ro {tokens} {tokens} "
              f"&& exec {sys.executable} -m relay serve --config {path}")
    proc = await asyncio.create_subprocess_exec(
        unshare, "-m", "sh", "-c", script, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=ENV)
    assert proc.stdout is not None
    log: list[str] = []
    try:
        async def until(needle: str) -> None:
            async with asyncio.timeout(30):
                while not any(needle in line for line in log):
                    line = await proc.stdout.readline()  # type: ignore[union-attr]
                    if not line:
                        raise AssertionError("the relay exited:\n" + "".join(log))
                    log.append(line.decode())

        await until("ready on")
        await asyncio.to_thread(send, ("127.0.0.1", port), b"Subject: ro\r\n\r\nx\r\n")
        await until("cannot save the refreshed sign-in")
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    text = "".join(log)
    assert "Read-only file system" in text
    assert "token_store.directory" in text and "ReadWritePaths=" in text
    assert "/var/lib/m365relay/tokens" in text
    assert "unexpected error" not in text and "Traceback" not in text


async def test_doctor_hints_name_the_config_in_use(
        box: Sandbox, tmp_path: Path, password_hash: str) -> None:
    path = write_config(box, tmp_path, password_hash)
    await login(box, path, "personal", ME)
    report = await diagnose(path, account="personal")
    token = next(c for c in report.accounts[0].checks if c.link == "token")
    assert token.status is Status.OK
    assert f"m365relay login personal --config {path}" in token.detail
    # At the packaged default path the flag is left out: the command reads that file anyway.
    assert commands.command("login", "personal", config=commands.DEFAULT_CONFIG) \
        == "m365relay login personal"
    assert commands.command("doctor", config=path) == f"m365relay doctor --config {path}"
    assert commands.command("queue", "retry", "--all", config=commands.DEFAULT_CONFIG) \
        == f"m365relay queue retry --all --config {commands.DEFAULT_CONFIG}"


async def test_demo_signs_a_person_in_through_the_sandbox_page(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relay.login import run_login
    from relay.sandbox.demo import run_demo

    text = (ROOT / "config" / "demo.yaml").read_text()
    ports = {"18443": _free_port(), "12587": _free_port()}
    for old, new in ports.items():
        text = text.replace(old, str(new))
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "demo.yaml"
    path.write_text(text.replace("127.0.0.1:2525", "127.0.0.1:0"))
    assert await run_demo(path, login=run_login) == 0
    out = capsys.readouterr().out
    assert f"at https://localhost:{ports['18443']}/devicelogin as alice@contoso.example" in out
    assert "and as a person: delivered as alice@contoso.example" in out
    assert (tmp_path / ".demo" / "tokens" / "alice.token").exists()
