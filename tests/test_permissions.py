"""Owner-only spool files whatever the umask, and warnings for secrets other users can read."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import RelayFactory, base_config, message, send, wait_until

from relay.cli import main
from relay.sandbox import DEMO_APP, Sandbox


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 000: whatever the relay does not restrict itself ends up world-readable."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root.parent)): f"{stat.S_IMODE(p.stat().st_mode):04o}"
            for p in [root, *root.rglob("*")]}


async def test_spool_is_owner_only_under_an_open_umask(
        relays: RelayFactory, sandbox: Sandbox, tmp_path: Path, open_umask: None) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o755)  # as an admin might have created it
    sandbox.exchange.inject("rcpt", "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found",
                            rcpt="gone@example.org")
    sandbox.exchange.inject("rcpt", "451 4.3.0 try later", rcpt="later@example.org", times=1000)
    relay = await relays.start()
    address = relay.addresses["local"]
    await asyncio.to_thread(send, address, message("bounces"), rcpts=("gone@example.org",))
    await asyncio.to_thread(send, address, message("waits"), rcpts=("later@example.org",))
    # A bounce kept in failed/ with its reason, a deferred message with its retry state.
    await wait_until(lambda: any((spool / "failed").glob("*.reason"))
                     and any((spool / "state").iterdir()))
    found = modes(spool)
    assert any(path.startswith("spool/queue/") for path in found)
    loose = {path: mode for path, mode in found.items()
             if mode != ("0700" if (tmp_path / path).is_dir() else "0600")}
    assert not loose, f"spool entries readable by others: {loose}"


def write_config(tmp_path: Path, sandbox: Sandbox, password_hash: str, mode: int,
                 **app: Any) -> Path:
    data = base_config(sandbox, tmp_path, password_hash)
    data["apps"]["contoso"].update(app)
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(data))
    path.chmod(mode)
    return path


async def test_check_config_warns_about_an_inline_secret_others_can_read(
        sandbox: Sandbox, tmp_path: Path, password_hash: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, sandbox, password_hash, 0o644,
                        client_secret=DEMO_APP.client_secret)
    assert main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "apps.contoso.client_secret" in err and "every user (mode 0644)" in err
    assert f"chmod 600 {path}" in err
    assert str(DEMO_APP.client_secret) not in err

    path.chmod(0o600)
    assert main(["check-config", str(path)]) == 0
    assert "warning" not in capsys.readouterr().err


async def test_check_config_warns_about_a_secret_file_others_can_read(
        sandbox: Sandbox, tmp_path: Path, password_hash: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "client-secret"
    secret.write_text(f"{DEMO_APP.client_secret}\n")
    secret.chmod(0o604)
    # The config itself holds no inline secret, so its 0644 is fine.
    path = write_config(tmp_path, sandbox, password_hash, 0o644,
                        client_secret={"file": str(secret)})
    assert main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"{secret} (apps.contoso.client_secret)" in err and f"chmod 600 {secret}" in err
    assert f"chmod 600 {path}" not in err


async def test_serve_warns_at_startup(sandbox: Sandbox, tmp_path: Path,
                                      password_hash: str) -> None:
    path = write_config(tmp_path, sandbox, password_hash, 0o644,
                        client_secret=DEMO_APP.client_secret)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(path),
        stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    lines = []
    try:
        async with asyncio.timeout(30):
            while not lines or "ready on" not in lines[-1]:
                raw = await proc.stderr.readline()
                assert raw, "relay exited:\n" + "\n".join(lines)
                lines.append(raw.decode())
    finally:
        proc.terminate()
        await proc.wait()
    warning = next(line for line in lines if "WARNING" in line and "chmod 600" in line)
    assert "apps.contoso.client_secret" in warning
