"""What running the image as an admin found (issue 13), each checked without a Docker engine
too: tests/test_image.py sees the same in the real container."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MAILBOX, RelayFactory, message, send, wait_until

from relay import cli
from relay.config import env as envconfig
from relay.delivery.pacing import RecipientLedger
from relay.sandbox import DEMO_APP, Sandbox
from relay.service import healthcheck
from relay.spool.store import _open_error
from relay.tokens.provider import TokenProvider


def env_config(sandbox: Sandbox, spool: Path) -> dict[str, str]:
    return {
        "M365RELAY_TENANT": DEMO_APP.tenant, "M365RELAY_CLIENT_ID": DEMO_APP.client_id,
        "M365RELAY_CLIENT_SECRET_FILE": str(sandbox.secret_file),
        "M365RELAY_AUTHORITY": sandbox.authority(DEMO_APP.tenant),
        "M365RELAY_SMTP_HOST": sandbox.smtp_host, "M365RELAY_SMTP_PORT": str(sandbox.smtp_port),
        "M365RELAY_MAILBOX": MAILBOX, "M365RELAY_NETWORKS": "127.0.0.0/8",
        "M365RELAY_LISTEN": "127.0.0.1:0", "M365RELAY_SPOOL": str(spool),
    }


@pytest.fixture
def no_tmp(tmp_path: Path) -> Iterator[None]:
    """No usable temporary directory, as on `docker run --read-only` without a tmpfs."""
    saved = tempfile.tempdir
    tempfile.tempdir = str(tmp_path / "no-such-dir")
    try:
        yield
    finally:
        tempfile.tempdir = saved


def test_tokens_need_no_temporary_directory_without_ca_file(
        sandbox: Sandbox, tmp_path: Path, no_tmp: None) -> None:
    config = envconfig.from_env(env_config(sandbox, tmp_path / "spool"))
    assert next(iter(config.apps.values())).ca_file is None
    provider = TokenProvider(config.apps)  # FileNotFoundError here before the fix
    provider.close()
    with pytest.raises(FileNotFoundError):  # what the fix avoids: there really is none
        tempfile.mkdtemp()


def _queue(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(envconfig.PREFIX)}
    return subprocess.run([sys.executable, "-m", "relay", "queue", *args],
                          env=clean | env, capture_output=True, text=True, timeout=60,
                          check=False)


async def test_queue_defaults_to_the_variables_as_the_image_runs_it(
        sandbox: Sandbox, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (spool / "queue").mkdir(parents=True)
    env = env_config(sandbox, spool)
    for args in (("list",), ("list", "--config-from-env"),
                 ("list", "--config", str(tmp_path / "absent.yaml"), "--config-from-env")):
        result = await asyncio.to_thread(_queue, env, *args)
        assert result.returncode == 0, (args, result.stderr)
        assert "Queue is empty" in result.stdout
    # Without variables and without a config file, it still says what to give.
    result = await asyncio.to_thread(_queue, {}, "list")
    assert result.returncode == 2
    assert "--config-from-env" in result.stderr and "--spool DIR" in result.stderr


def test_a_spool_owned_by_another_user_says_whose_and_how_to_fix(tmp_path: Path) -> None:
    """The words; tests/test_image.py runs the image on a root-owned bind mount for real."""
    spool = tmp_path / "spool"
    spool.mkdir()
    other = os.geteuid() + 1000
    if os.geteuid() == 0:
        os.chown(spool, other, other)
    else:
        other = spool.stat().st_uid  # cannot give it away: only the fallback is checked
    text = _open_error(spool, PermissionError(errno.EACCES, "Permission denied", str(spool)))
    if other == os.geteuid():
        assert text.startswith(f"cannot create the spool directory {spool}")
        return
    uid, gid = os.geteuid(), os.getegid()
    assert text.startswith(f"the spool directory {spool} exists but is owned by uid {other} "
                           f"and is not writable by uid {uid}, the relay's user")
    assert f"`chown -R {uid}:{gid} DIR`" in text
    assert f"`docker run --user {other}`" in text


def test_json_log_lines_have_rfc3339_times_and_numbers(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        cli.setup_logging("info", "json")
        log = logging.getLogger("m365relay.test")
        log.info("%s: client=%s, account=%s, from=<%s>, size=%d, nrcpt=%d", "0123456789ABCDE",
                 "127.0.0.1", "printers", "a@b.example", 341, 2)
        log.info("%s: to=<%s>, relay=%s, delay=%.1f, status=sent (250 ok)", "0123456789ABCDE",
                 "x@y.example", "h:587", 0.4)
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    accepted, sent = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    for line in (accepted, sent):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", line["time"])
    assert (accepted["size"], accepted["nrcpt"]) == (341, 2)
    assert sent["delay"] == 0.4 and sent["status"] == "sent"


async def test_stop_counts_only_real_deliveries_in_flight(
        relays: RelayFactory, sandbox: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    relay = await relays.start()
    address = relay.servers[0].sockets[0].getsockname()[:2]
    for i in range(3):
        code, _ = await asyncio.to_thread(send, address, message(f"m{i}"))
        assert code == 250
    await sandbox.exchange.wait_for_messages(3, timeout=30)
    # The worker keeps its connection open for the next message: idle, not in flight.
    await wait_until(lambda: relay.delivery.workers() > 0 and relay.delivery.inflight() == 0)
    sandbox.exchange.delay("data", 3)
    code, _ = await asyncio.to_thread(send, address, message("slow"))
    await wait_until(lambda: sandbox.exchange.delays_started == 1)
    caplog.set_level(logging.DEBUG, "m365relay")
    await relays.stop(relay, timeout=0.5)
    (warning,) = [r.getMessage() for r in caplog.records if "in flight" in r.getMessage()]
    assert warning.startswith("shutdown: 1 delivery attempt(s) in flight after 0.5s")


async def test_an_idle_stop_reports_no_delivery_in_flight(
        relays: RelayFactory, sandbox: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    relay = await relays.start()
    address = relay.servers[0].sockets[0].getsockname()[:2]
    code, _ = await asyncio.to_thread(send, address, message("one"))
    assert code == 250
    await sandbox.exchange.wait_for_messages(1, timeout=30)
    await wait_until(lambda: relay.delivery.workers() > 0 and relay.delivery.inflight() == 0)
    caplog.set_level(logging.DEBUG, "m365relay")
    await relays.stop(relay, timeout=0)
    assert not [r for r in caplog.records if "in flight" in r.getMessage()]


async def test_health_probes_log_at_debug_devices_at_info(
        relays: RelayFactory, caplog: pytest.LogCaptureFixture) -> None:
    data = relays.config()
    data["listeners"][0]["networks"] = ["127.0.0.0/8"]
    relay = await relays.start(data)
    host, port = relay.servers[0].sockets[0].getsockname()[:2]
    caplog.set_level(logging.DEBUG, "m365relay")
    found = [healthcheck.Target("local", host, port)]
    healthy, lines = await asyncio.to_thread(healthcheck.check, found, 5)
    assert healthy, lines
    await asyncio.sleep(0)  # let the session see the QUIT (the reply came already)
    connects = [r for r in caplog.records if r.getMessage().startswith("connect from")]
    assert connects and all(r.levelno == logging.DEBUG for r in connects)
    caplog.clear()
    code, _ = await asyncio.to_thread(send, (host, port), message("device"))
    assert code == 250
    connects = [r for r in caplog.records if r.getMessage().startswith("connect from")]
    assert [r.levelno for r in connects] == [logging.INFO]


def test_pacing_counts_are_saved_0600(tmp_path: Path) -> None:
    path = tmp_path / "pacing.json"
    ledger = RecipientLedger(path)
    old = os.umask(0o022)
    try:
        ledger.save('{"recipients": {}}')
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_doctor_from_env_names_the_variables_not_a_missing_file(
        sandbox: Sandbox, tmp_path: Path) -> None:
    env = env_config(sandbox, tmp_path / "spool") | {"M365RELAY_CA_FILE": str(sandbox.ca_file)}
    clean = {k: v for k, v in os.environ.items() if not k.startswith(envconfig.PREFIX)}
    # Plain `m365relay doctor`, as `docker exec c m365relay doctor` runs it: no file at the
    # default path, so the variables.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "doctor", env=clean | env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 0, text + err.decode()
    header = text.splitlines()[0]
    assert header == f"m365relay doctor: {envconfig.SOURCE}"
    assert "m365relay.yaml" not in text
