"""The container: the Dockerfile's claims checked against the package (no Docker engine runs
here), and the image's default command, config from M365RELAY_* variables, run for real."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import MAILBOX, message, send

from relay import cli
from relay.config import env as envconfig
from relay.sandbox import DEMO_APP, Sandbox

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = next(iter(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]))


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.base}"
        return found[-1]


def dockerfile() -> list[Stage]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    stages: list[Stage] = [Stage("", "(global)")]  # ARGs before the first FROM
    logical = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        logical += raw.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        if logical.strip():
            keyword, _, args = logical.strip().partition(" ")
            keyword = keyword.upper()
            if keyword == "FROM":
                parts = args.split()
                name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
                stages.append(Stage(parts[0], name))
            else:
                stages[-1].instructions.append((keyword, args.strip()))
        logical = ""
    return stages[1:]


def global_args() -> dict[str, str]:
    """ARG NAME=default lines before the first FROM (usable in FROM lines)."""
    found = {}
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.startswith("FROM "):
            break
        if raw.startswith("ARG "):
            name, _, value = raw[4:].strip().partition("=")
            found[name] = value
    return found


def exec_form(args: str) -> list[str]:
    argv = json.loads(args)
    assert isinstance(argv, list), f"not the exec (JSON) form: {args}"
    return argv


def test_multi_stage_build_into_a_slim_runtime() -> None:
    build, runtime = dockerfile()
    # The official slim image unless BASE says otherwise (tests build on a Debian-made one).
    assert global_args()["BASE"] == "python:3.11-slim"
    assert build.base == runtime.base == "${BASE}"
    assert any("pip wheel" in run for run in build.all("RUN"))
    copied = [c for c in runtime.all("COPY") if c.startswith("--from=")]
    assert copied and all(c.startswith(f"--from={build.name} ") for c in copied)
    # The runtime gets no compiler toolchain and no pip.
    assert not any("apt-get" in run or "pip install" in run for run in runtime.all("RUN"))


def test_the_image_has_the_postgres_extra_unless_built_lean() -> None:
    """Cluster mode (spool.postgres) needs asyncpg; `--build-arg EXTRAS=` leaves it out."""
    build = dockerfile()[0]
    extras = dict(arg.partition("=")[::2] for arg in build.all("ARG") if "=" in arg)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert extras["EXTRAS"] == "postgres"
    assert extras["EXTRAS"] in pyproject["project"]["optional-dependencies"]
    (install,) = [run for run in build.all("RUN") if "pip install" in run]
    # The extra only when EXTRAS is not empty: `wheel[]` would be a pip error.
    assert '"${wheel}${EXTRAS:+[$EXTRAS]}"' in install
    assert "/dist/*.whl" in install


def test_runs_as_an_unprivileged_user() -> None:
    runtime = dockerfile()[-1]
    user = runtime.last("USER")
    uid = user.split(":")[0]
    assert uid not in {"0", "root"}
    # Numeric, so Kubernetes' runAsNonRoot can verify it; the same uid the image creates.
    assert uid.isdigit()
    assert any(f"--uid {uid}" in run for run in runtime.all("RUN"))


def test_entrypoint_and_cmd_run_the_console_script() -> None:
    runtime = dockerfile()[-1]
    argv = exec_form(runtime.last("ENTRYPOINT")) + exec_form(runtime.last("CMD"))
    assert argv[0] == SCRIPT
    args = cli.build_parser().parse_args(argv[1:])
    assert args.func is cli.cmd_serve
    assert str(args.config) == "/etc/m365relay/m365relay.yaml"
    assert args.config_from_env
    # `docker stop` sends SIGKILL 10 s after SIGTERM; the drain must end before that.
    assert args.shutdown_timeout < 10


def test_healthcheck_is_a_real_subcommand_with_the_same_config_source() -> None:
    runtime = dockerfile()[-1]
    options, _, command = runtime.last("HEALTHCHECK").partition("CMD ")
    argv = exec_form(command)
    assert argv[0] == SCRIPT
    args = cli.build_parser().parse_args(argv[1:])
    assert args.func is cli.cmd_healthcheck
    serve = cli.build_parser().parse_args(exec_form(runtime.last("CMD")))
    assert (args.config, args.config_from_env) == (serve.config, serve.config_from_env)
    interval = dict(opt.removeprefix("--").split("=") for opt in options.split())
    assert args.timeout * len(envconfig.DEFAULT_LISTEN) <= float(interval["timeout"].rstrip("s"))


def test_exposes_the_env_config_listener_ports() -> None:
    runtime = dockerfile()[-1]
    exposed = {int(p.split("/")[0]) for e in runtime.all("EXPOSE") for p in e.split()}
    assert exposed == {int(b.rsplit(":", 1)[1]) for b in envconfig.DEFAULT_LISTEN} == {2525, 587}


def test_spool_is_a_volume_owned_by_the_relay_user() -> None:
    runtime = dockerfile()[-1]
    volumes = [v for args in runtime.all("VOLUME") for v in json.loads(args)]
    assert envconfig.DEFAULT_SPOOL in volumes
    assert any(f"-o m365relay -g m365relay -m 0750 {envconfig.DEFAULT_SPOOL}" in run
               for run in runtime.all("RUN"))


def test_dockerignore_lets_through_what_the_build_copies() -> None:
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert "*" in (ROOT / ".dockerignore").read_text().splitlines()
    sources = [src.rstrip("/") for copy in dockerfile()[0].all("COPY")
               for src in shlex.split(copy)[:-1]]
    assert set(sources) <= allowed


def test_the_build_context_makes_a_complete_wheel(tmp_path: Path) -> None:
    """What `pip wheel .` in the build stage gets: exactly the files the Dockerfile copies."""
    context = tmp_path / "src"
    for copy in dockerfile()[0].all("COPY"):
        for src in shlex.split(copy)[:-1]:
            path = ROOT / src
            if path.is_dir():
                shutil.copytree(path, context / src,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                context.mkdir(exist_ok=True)
                shutil.copy(path, context / src)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
         "--wheel-dir", str(tmp_path / "dist"), str(context)],
        capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names
                            if n.endswith("entry_points.txt"))
    assert f"{SCRIPT} = relay.cli:main" in entry_points
    # Every file of the package, templates and data included, ends up in the image.
    package = {str(p.relative_to(ROOT)) for p in (ROOT / "relay").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert package <= names, f"missing from the wheel: {sorted(package - names)}"


def test_compose_example_is_a_valid_env_config(tmp_path: Path) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.example.yml").read_text())
    relay = compose["services"]["m365relay"]
    env = {k: str(v) for k, v in relay["environment"].items()}
    assert set(env) <= set(envconfig.KEYS)
    assert f"m365relay-spool:{envconfig.DEFAULT_SPOOL}" in relay["volumes"]
    # The app reaches the relay by service name on a port the relay listens on by default.
    app = next(s for name, s in compose["services"].items() if name != "m365relay")
    assert app["depends_on"]["m365relay"]["condition"] == "service_healthy"
    subnet = compose["networks"]["mail"]["ipam"]["config"][0]["subnet"]
    assert env["M365RELAY_NETWORKS"] == subnet
    secret = tmp_path / "client-secret"
    secret.write_text("example")
    env["M365RELAY_CLIENT_SECRET_FILE"] = str(secret)
    env["M365RELAY_SPOOL"] = str(tmp_path / "spool")
    config = envconfig.from_env(env)
    assert {lis.port for lis in config.listeners} == {2525, 587}


# --- the image's default command, run for real -------------------------------------------


def sandbox_env(sandbox: Sandbox, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(envconfig.PREFIX)}
    return env | {
        "PYTHONUNBUFFERED": "1",
        "M365RELAY_TENANT": DEMO_APP.tenant,
        "M365RELAY_CLIENT_ID": DEMO_APP.client_id,
        "M365RELAY_CLIENT_SECRET_FILE": str(sandbox.directory / "demo-client-secret"),
        "M365RELAY_AUTHORITY": sandbox.authority(DEMO_APP.tenant),
        "M365RELAY_SMTP_HOST": sandbox.smtp_host,
        "M365RELAY_SMTP_PORT": str(sandbox.smtp_port),
        "M365RELAY_CA_FILE": str(sandbox.ca_file),
        "M365RELAY_MAILBOX": MAILBOX,
        "M365RELAY_NETWORKS": "127.0.0.0/8",
        "M365RELAY_LISTEN": "127.0.0.1:0, 127.0.0.1:0",
        "M365RELAY_SPOOL": str(tmp_path / "spool"),
    } | extra


def image_command(subcommand: str) -> list[str]:
    """The Dockerfile's CMD or HEALTHCHECK argv, run with this Python."""
    runtime = dockerfile()[-1]
    if subcommand == "serve":
        argv = exec_form(runtime.last("ENTRYPOINT")) + exec_form(runtime.last("CMD"))
    else:
        argv = exec_form(runtime.last("HEALTHCHECK").partition("CMD ")[2])
    assert argv[0] == SCRIPT
    return [sys.executable, "-m", "relay", *argv[1:]]


@pytest.fixture
async def env_relay(sandbox: Sandbox, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    env = sandbox_env(sandbox, tmp_path)
    proc = await asyncio.create_subprocess_exec(
        *image_command("serve"), stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path)
    assert proc.stderr is not None
    ports, lines = [], []
    async with asyncio.timeout(30):
        while len(ports) < 2:
            line = (await proc.stderr.readline()).decode()
            assert line, "relay exited during start:\n" + "".join(lines)
            lines.append(line)
            if "ready on " in line:
                ports.append(int(line.split("ready on ")[1].split()[0].rsplit(":", 1)[1]))

    async def drain() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            lines.append(line.decode())

    reader = asyncio.create_task(drain())
    yield {"proc": proc, "ports": ports, "env": env, "lines": lines}
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
    await reader


async def healthcheck(env: dict[str, str], cwd: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *image_command("healthcheck"), env=env, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_env_config_relays_a_message_and_passes_the_healthcheck(
        env_relay: dict[str, Any], sandbox: Sandbox, tmp_path: Path) -> None:
    assert not (tmp_path / "etc").exists()  # no mounted file: the variables are the config
    for port in env_relay["ports"]:
        code, _ = await asyncio.to_thread(send, ("127.0.0.1", port),
                                          message(f"via {port}"))
        assert code == 250
    received = await sandbox.exchange.wait_for_messages(2, timeout=30)
    assert {m.auth_user for m in received} == {MAILBOX}
    assert all(m.client_id == DEMO_APP.client_id for m in received)

    # The HEALTHCHECK as the image runs it; the listeners' real ports, since we bound port 0.
    listen = ",".join(f"127.0.0.1:{port}" for port in env_relay["ports"])
    env = env_relay["env"] | {"M365RELAY_LISTEN": listen}
    code, out = await healthcheck(env, tmp_path)
    assert code == 0, out
    assert out.count(": ok: 220 ") == 2

    env_relay["proc"].send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        assert await env_relay["proc"].wait() == 0
    code, out = await healthcheck(env, tmp_path)
    assert code == 1
    assert "nothing listens there" in out


async def test_bad_variables_exit_78_naming_them(sandbox: Sandbox, tmp_path: Path) -> None:
    env = sandbox_env(sandbox, tmp_path, M365RELAY_CLIENT_ID="not-a-guid",
                      M365RELAY_MAILBOXX="typo@contoso.example")
    del env["M365RELAY_MAILBOX"]
    proc = await asyncio.create_subprocess_exec(
        *image_command("serve"), env=env, cwd=tmp_path, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    assert proc.returncode == cli.EX_CONFIG
    text = err.decode()
    assert "M365RELAY_CLIENT_ID: 'not-a-guid' is not a GUID" in text
    assert "M365RELAY_MAILBOX is not set" in text
    assert "M365RELAY_MAILBOXX: unknown variable (did you mean M365RELAY_MAILBOX?)" in text
    # The healthcheck says the same and exits 1, never 78 (Docker knows only 0 and 1).
    code, out = await healthcheck(env, tmp_path)
    assert code == 1
    assert "M365RELAY_CLIENT_ID" in out
