"""The image, built and run on a real Docker engine, as an admin runs it.

Every container uses the host's network (`--network host`) and only loopback addresses: it
relays to the sandbox this test process runs on free ports. The engine is the one DOCKER_HOST
points to, or a dockerd started for the session (tests/dockerengine.py); the base is made
from Debian's packages, as Docker Hub is out of reach here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dockerengine
import pytest
import yaml
from conftest import MAILBOX, message, send
from dockerengine import Engine, EngineUnavailable

from relay.sandbox import DEMO_APP, Sandbox

pytestmark = pytest.mark.slow

UID = 10025
STOP_TIMEOUT = 10  # docker stop's default before SIGKILL


@pytest.fixture(scope="session")
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    try:
        found = dockerengine.find_or_start()
    except EngineUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no Docker engine in CI: {exc}")
        pytest.skip(f"no Docker engine: {exc}")
    yield found
    found.stop()  # only a dockerd this session started


@pytest.fixture(scope="session")
def image(engine: Engine, request: pytest.FixtureRequest) -> str:
    base = dockerengine.ensure_base(engine)
    tag = dockerengine.build_image(engine, base)
    size, base_size = (dockerengine.image_size(engine, t) for t in (tag, base))
    times = ", ".join(f"{step} {seconds:.0f}s" for step, seconds in engine.built.items())
    report = (f"image {tag}: {size / 1e6:.0f} MB ({(size - base_size) / 1e6:.0f} MB over "
              f"{base}); built: {times or 'cached'}")
    # Past pytest's capture, so every run shows it (it is a figure the README quotes).
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n{report}")
    else:
        print(report)
    return tag


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Run:
    """Containers of one test, removed at its end; files they mount, readable by uid 10025."""

    engine: Engine
    image: str
    sandbox: Sandbox
    folder: Path
    names: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder.mkdir(mode=0o755)
        for src, name in ((self.sandbox.ca_file, "ca.pem"),
                          (self.sandbox.secret_file, "client-secret")):
            shutil.copy(src, self.folder / name)
            (self.folder / name).chmod(0o644)

    def env(self, ports: tuple[int, ...], **extra: str) -> dict[str, str]:
        return {
            "M365RELAY_TENANT": DEMO_APP.tenant,
            "M365RELAY_CLIENT_ID": DEMO_APP.client_id,
            "M365RELAY_CLIENT_SECRET_FILE": "/run/test/client-secret",
            "M365RELAY_AUTHORITY": self.sandbox.authority(DEMO_APP.tenant),
            "M365RELAY_SMTP_HOST": self.sandbox.smtp_host,
            "M365RELAY_SMTP_PORT": str(self.sandbox.smtp_port),
            "M365RELAY_CA_FILE": "/run/test/ca.pem",
            "M365RELAY_MAILBOX": MAILBOX,
            "M365RELAY_NETWORKS": "127.0.0.0/8",
            "M365RELAY_LISTEN": ",".join(f"127.0.0.1:{p}" for p in ports),
        } | extra

    def volume(self) -> str:
        name = f"m365relay-test-{os.getpid()}-{len(self.volumes)}-{time.monotonic_ns()}"
        self.engine.run("volume", "create", name)
        self.volumes.append(name)
        return name

    def start(self, *options: str, env: dict[str, str] | None = None,
              command: tuple[str, ...] = ()) -> str:
        name = f"m365relay-test-{os.getpid()}-{len(self.names)}"
        args = ["run", "-d", "--name", name, "--network", "host",
                "-v", f"{self.folder}:/run/test:ro", *options]
        for key, value in (env or {}).items():
            args += ["-e", f"{key}={value}"]
        self.names.append(name)
        self.engine.run(*args, self.image, *command)
        return name

    def logs(self, name: str) -> str:
        result = self.engine.run("logs", name, check=False)
        return result.stdout + result.stderr

    def state(self, name: str) -> dict[str, Any]:
        state = dockerengine.inspect(self.engine, name)["State"]
        assert isinstance(state, dict)
        return state

    async def wait_log(self, name: str, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = await asyncio.to_thread(self.logs, name)
            if re.search(pattern, text):
                return text
            state = await asyncio.to_thread(self.state, name)
            if not state["Running"] and not re.search(pattern, self.logs(name)):
                raise AssertionError(f"{name} exited {state['ExitCode']}:\n{text}")
            assert time.monotonic() < deadline, f"no {pattern!r} in {name}'s log:\n{text}"
            await asyncio.sleep(0.2)

    async def ready(self, name: str) -> None:
        await self.wait_log(name, "ready on ")

    async def exec(self, name: str, *argv: str) -> tuple[int, str]:
        # In a thread: the sandbox answers from this test's event loop meanwhile.
        result = await asyncio.to_thread(self.engine.run, "exec", name, *argv, check=False,
                                         timeout=60)
        return result.returncode, result.stdout + result.stderr

    def remove(self) -> None:
        for name in self.names:
            self.engine.run("rm", "-f", "-v", name, check=False)
        for volume in self.volumes:
            self.engine.run("volume", "rm", "-f", volume, check=False)


@pytest.fixture
async def run(engine: Engine, image: str, sandbox: Sandbox, tmp_path: Path
              ) -> AsyncIterator[Run]:
    found = Run(engine, image, sandbox, tmp_path / "mounted")
    yield found
    await asyncio.to_thread(found.remove)


async def relay(address: tuple[str, int], subject: str) -> None:
    code, reply = await asyncio.to_thread(send, address, message(subject))
    assert code == 250, reply


def test_the_postgres_driver_is_in_the_image(engine: Engine, image: str) -> None:
    """The default build (EXTRAS=postgres) runs cluster mode without another image."""
    found = engine.run("run", "--rm", "--network", "none", "--entrypoint", "python3", image,
                       "-c", "import asyncpg; print(asyncpg.__version__)", check=False)
    assert found.returncode == 0, found.stderr


async def test_env_config_delivers_as_uid_10025_healthy_soon_doctor_and_queue(
        run: Run, sandbox: Sandbox) -> None:
    port = free_port()
    started = time.monotonic()
    name = run.start(env=run.env((port,)))
    await run.ready(name)
    code, status = await run.exec(name, "cat", "/proc/1/status")
    assert re.search(rf"(?m)^Uid:\s+{UID}\s+{UID}\s+{UID}\s+{UID}$", status), status
    await relay(("127.0.0.1", port), "from the image")
    (received,) = await sandbox.exchange.wait_for_messages(1, timeout=30)
    assert received.auth_user == MAILBOX

    # HEALTHCHECK: healthy within seconds of the start, not after the first 30 s interval.
    while (health := run.state(name)["Health"]["Status"]) != "healthy":
        assert health == "starting", run.state(name)["Health"]
        assert time.monotonic() - started < 20, "not healthy 20 s after `docker run`"
        await asyncio.sleep(0.5)
    # ... and the probe adds no INFO line for each of its connections.
    assert "connect from 127.0.0.1" not in run.logs(name).replace(
        "connect from 127.0.0.1 on smtp-", "x", 1)  # the message sent above: one line

    code, out = await run.exec(name, "m365relay", "doctor")
    assert code == 0, out
    assert "environment (M365RELAY_* variables)" in out
    assert "/etc/m365relay/m365relay.yaml" not in out  # no file there: not named
    code, out = await run.exec(name, "m365relay", "queue", "list")
    assert code == 0, out
    assert "Queue is empty" in out


async def test_mounted_config_file_delivers(run: Run, sandbox: Sandbox) -> None:
    port = free_port()
    config = {
        "listeners": [{"name": "lan", "bind": f"127.0.0.1:{port}", "networks": ["127.0.0.0/8"]}],
        "apps": {"m365": {"tenant": DEMO_APP.tenant, "client_id": DEMO_APP.client_id,
                          "client_secret": {"file": "/run/test/client-secret"},
                          "authority": sandbox.authority(DEMO_APP.tenant),
                          "smtp_host": sandbox.smtp_host, "smtp_port": sandbox.smtp_port,
                          "ca_file": "/run/test/ca.pem"}},
        "accounts": [{"name": "printers", "networks": ["127.0.0.0/8"], "app": "m365",
                      "mailbox": MAILBOX}],
        "spool": {"directory": "/var/spool/m365relay"},
    }
    path = run.folder / "m365relay.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o644)
    name = run.start("-v", f"{path}:/etc/m365relay/m365relay.yaml:ro")
    await run.ready(name)
    await relay(("127.0.0.1", port), "with a mounted config")
    await sandbox.exchange.wait_for_messages(1, timeout=30)
    code, out = await run.exec(name, "m365relay", "queue", "list")
    assert code == 0, out
    code, out = await run.exec(name, "m365relay", "doctor")
    assert code == 0, out
    assert "/etc/m365relay/m365relay.yaml" in out


async def test_docker_stop_drains_a_delivery_in_flight(run: Run, sandbox: Sandbox) -> None:
    port = free_port()
    name = run.start(env=run.env((port,)))
    await run.ready(name)
    sandbox.exchange.delay("data", 3)
    await relay(("127.0.0.1", port), "in flight at stop")
    deadline = time.monotonic() + 30
    while sandbox.exchange.delays_started == 0:
        assert time.monotonic() < deadline, run.logs(name)
        await asyncio.sleep(0.1)
    started = time.monotonic()
    await asyncio.to_thread(run.engine.run, "stop", "-t", str(STOP_TIMEOUT), name, timeout=60)
    took = time.monotonic() - started
    state = run.state(name)
    assert state["ExitCode"] == 0, run.logs(name)  # 137 would be docker's SIGKILL
    assert took < STOP_TIMEOUT
    (received,) = await sandbox.exchange.wait_for_messages(1, timeout=5)
    assert b"in flight at stop" in received.data
    assert "in flight" not in run.logs(name)


async def test_an_idle_stop_reports_no_delivery_in_flight(run: Run) -> None:
    port = free_port()
    name = run.start(env=run.env((port,)))
    await run.ready(name)
    await asyncio.to_thread(run.engine.run, "stop", name, timeout=60)
    logs = run.logs(name)
    assert run.state(name)["ExitCode"] == 0, logs
    assert "in flight" not in logs
    assert "stopped" in logs


async def test_mail_queued_on_a_named_volume_is_delivered_by_a_new_container(
        run: Run, sandbox: Sandbox) -> None:
    volume = run.volume()
    port = free_port()
    # The first container cannot reach Exchange (nothing listens on that port): mail stays.
    first = run.start("-v", f"{volume}:/var/spool/m365relay",
                      env=run.env((port,), M365RELAY_SMTP_PORT=str(free_port())))
    await run.ready(first)
    await relay(("127.0.0.1", port), "survives the container")
    await run.wait_log(first, "deferred")
    code, out = await run.exec(first, "m365relay", "queue", "list")
    assert code == 0 and "1 message(s)" in out, out
    await asyncio.to_thread(run.engine.run, "rm", "-f", first, timeout=60)
    second = run.start("-v", f"{volume}:/var/spool/m365relay", env=run.env((port,)))
    await run.ready(second)
    # It keeps the first one's schedule (the retry is minutes away): the admin says "now".
    code, out = await run.exec(second, "m365relay", "queue", "list")
    assert code == 0 and "deferred" in out, out
    code, out = await run.exec(second, "m365relay", "queue", "retry", "--all")
    assert code == 0, out
    (received,) = await sandbox.exchange.wait_for_messages(1, timeout=60)
    assert b"survives the container" in received.data
    await run.wait_log(second, "status=sent")


@pytest.mark.parametrize("options", [("--read-only",), ("--read-only", "--tmpfs", "/tmp")],
                         ids=["read-only", "read-only+tmpfs"])
async def test_read_only_root_and_no_capabilities(run: Run, sandbox: Sandbox,
                                                  options: tuple[str, ...]) -> None:
    port = free_port()
    # The sandbox CA as the trust store rather than `ca_file`, as behind a TLS-inspecting
    # proxy (`ca_file` needs no temporary file either: relay/tokens/httpsession.py).
    env = run.env((port,), REQUESTS_CA_BUNDLE="/run/test/ca.pem", SSL_CERT_FILE="/run/test/ca.pem")
    del env["M365RELAY_CA_FILE"]
    name = run.start(*options, "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                     env=env)
    await run.ready(name)
    await relay(("127.0.0.1", port), "read-only")
    await sandbox.exchange.wait_for_messages(1, timeout=30)
    code, out = await run.exec(name, "touch", "/opt/m365relay/x")
    assert code != 0 and "Read-only file system" in out
    await run.wait_log(name, "status=sent")
    deadline = time.monotonic() + 30  # the counts are saved a few seconds after a delivery
    while (found := await run.exec(name, "stat", "-c", "%a", "/var/spool/m365relay/pacing.json")
           )[0] != 0:
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.5)
    assert found[1].strip() == "600"


async def test_cluster_mode_from_the_variables(run: Run, sandbox: Sandbox, pg_dsn: str) -> None:
    """As overlays/cluster runs it: `db upgrade` in a container of its own first, then the
    relay on the database; no spool volume, read-only root, no capabilities."""
    url = run.folder / "database-url"
    url.write_text(pg_dsn)
    url.chmod(0o644)
    port = free_port()
    env = run.env((port,), M365RELAY_DATABASE_URL_FILE="/run/test/database-url",
                  M365RELAY_NODE="relay-a")
    locked = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")
    variables = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    upgrade = await asyncio.to_thread(
        run.engine.run, "run", "--rm", "--network", "host", "-v", f"{run.folder}:/run/test:ro",
        *locked, *variables, run.image, "db", "upgrade", check=False)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert "applied schema version(s)" in upgrade.stdout
    name = run.start(*locked, env=env)
    await run.ready(name)
    await relay(("127.0.0.1", port), "through the database")
    (received,) = await sandbox.exchange.wait_for_messages(1, timeout=30)
    assert b"through the database" in received.data
    code, out = await run.exec(name, "m365relay", "db", "status")
    assert code == 0, out
    assert "relay-a (alive)" in out
    code, out = await run.exec(name, "m365relay", "queue", "list")
    assert code == 0, out


async def test_a_root_owned_bind_mounted_spool_is_explained(run: Run, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o755)
    name = run.start("-v", f"{spool}:/var/spool/m365relay", env=run.env((free_port(),)))
    deadline = time.monotonic() + 30
    while run.state(name)["Running"]:
        assert time.monotonic() < deadline, run.logs(name)
        await asyncio.sleep(0.2)
    logs = run.logs(name)
    assert run.state(name)["ExitCode"] == 69, logs
    assert f"not writable by uid {UID}" in logs
    assert f"chown -R {UID}:{UID}" in logs


async def test_json_logs_have_rfc3339_times_and_typed_fields(run: Run, sandbox: Sandbox) -> None:
    port = free_port()
    name = run.start(env=run.env((port,)), command=(
        "serve", "--config", "/etc/m365relay/m365relay.yaml", "--config-from-env",
        "--shutdown-timeout", "8", "--log-format", "json"))
    await run.ready(name)
    await relay(("127.0.0.1", port), "json")
    await run.wait_log(name, "status=sent")
    lines = [json.loads(line) for line in run.logs(name).splitlines() if line.startswith("{")]
    assert lines
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d)",
                            line["time"]), line
    accepted = next(line for line in lines if "nrcpt" in line)
    assert isinstance(accepted["size"], int) and accepted["nrcpt"] == 1
    sent = next(line for line in lines if line.get("status") == "sent")
    assert isinstance(sent["delay"], float)
