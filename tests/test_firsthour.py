"""The first hour of a newcomer: the demo, its hints, --help, and the first mistakes.

Each command runs as the user runs it (the installed ``m365relay`` as a subprocess, or
``main()`` with real arguments) and the test reads what they would read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import base_config

from relay.cli import main
from relay.config import progname
from relay.config.records import DEFAULT_PATH
from relay.diagnosis.explain import Context, explain_connection_error
from relay.sandbox import Sandbox

ROOT = Path(__file__).resolve().parent.parent
M365RELAY = Path(sys.executable).parent / "m365relay"  # the venv's console script


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def run(*args: str, cwd: Path | None = None, stdin: int | None = subprocess.DEVNULL,
        **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    return subprocess.run([str(M365RELAY), *args], cwd=cwd, stdin=stdin, capture_output=True,
                          text=True, timeout=120, env=env, check=False, **kwargs)


def demo_config(folder: Path) -> Path:
    """config/demo.yaml as shipped, on free ports, in a folder of its own."""
    data = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    entra, smtp = free_port(), free_port()
    for app in data["apps"].values():  # the device app and the delegated one
        app["authority"] = app["authority"].replace(":18443/", f":{entra}/")
        if "smtp_port" in app:
            app["smtp_port"] = smtp
    data["listeners"][0]["bind"] = f"127.0.0.1:{free_port()}"
    (folder / "config").mkdir(parents=True, exist_ok=True)
    path = folder / "config" / "demo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Background:
    """A command from a hint, running until the test ends."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, argv: list[str], cwd: Path, ready: str) -> list[str]:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        self.procs.append(proc)
        assert proc.stdout is not None
        seen: list[str] = []
        async with asyncio.timeout(60):
            while ready not in (seen[-1] if seen else ""):
                line = await proc.stdout.readline()
                if not line:
                    raise AssertionError(f"{argv} ended before {ready!r}:\n" + "".join(seen))
                seen.append(line.decode())
        return seen

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.terminate()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 20)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@pytest.fixture
async def background() -> AsyncIterator[Background]:
    procs = Background()
    yield procs
    await procs.stop()


# -- the demo and its closing hint ---------------------------------------------------------------


async def test_demo_closing_hint_runs_as_printed(tmp_path: Path, background: Background) -> None:
    config = demo_config(tmp_path)
    demo = run("demo", str(config.relative_to(tmp_path)), cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    hint = demo.stdout.split("Next:", 1)[1]
    commands = [shlex.split(line) for line in hint.splitlines() if line.startswith("  ")]
    sandbox, serve, swaks, login = commands  # login: the demo config's delegated account
    # The program as it can be run from here: the venv's script is not on PATH.
    assert Path(tmp_path, sandbox[0]).resolve() == M365RELAY.resolve()
    assert sandbox[1] == "sandbox" and serve[:2] == [sandbox[0], "serve"]
    assert swaks[0] == "swaks" and "--from" in swaks and "--to" in swaks
    assert login[:3] == [sandbox[0], "login", "alice"] and "--config" in login

    await background.start(sandbox, tmp_path, ready="press Ctrl+C")
    await background.start(serve, tmp_path, ready="ready on")
    sent = await asyncio.to_thread(subprocess.run, swaks, cwd=tmp_path, capture_output=True,
                                   text=True, timeout=60, check=False)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    mail = tmp_path / ".demo" / "sandbox" / "mail"

    def delivered() -> bool:
        return any(b"X-Mailer: swaks" in p.read_bytes() for p in mail.glob("*.eml"))

    async with asyncio.timeout(60):
        while not delivered():  # written by another process: nothing to wait on but the file
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("taken", ["sandbox", "relay"])
def test_demo_on_ports_in_use_says_what_to_stop(tmp_path: Path, taken: str) -> None:
    config = demo_config(tmp_path)
    data = yaml.safe_load(config.read_text())
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        if taken == "sandbox":
            data["apps"]["sandbox"]["smtp_port"] = port
        else:
            data["listeners"][0]["bind"] = f"127.0.0.1:{port}"
        config.write_text(yaml.safe_dump(data))
        result = run("demo", str(config), cwd=tmp_path)
    assert result.returncode == 69, result.stderr
    assert "cannot start the demo" in result.stderr and str(port) in result.stderr
    assert "Traceback" not in result.stderr and "bug" not in result.stderr


def test_program_name_is_what_can_be_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    shown = progname.command(str(M365RELAY))
    assert Path(ROOT, shown).resolve() == M365RELAY.resolve()
    assert shown != "m365relay"
    monkeypatch.setenv("PATH", f"{M365RELAY.parent}:/usr/bin:/bin")
    assert progname.command(str(M365RELAY)) == "m365relay"
    assert progname.command("/somewhere/relay/__main__.py").endswith(" -m relay")


# -- mistakes of the first hour ------------------------------------------------------------------


def test_serve_before_the_sandbox_says_to_start_it(tmp_path: Path) -> None:
    config = demo_config(tmp_path)
    result = run("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 78
    assert "apps.sandbox.client_secret" in result.stderr
    assert "start the sandbox first" in result.stderr
    # The command it gives is one that works from here, for the folder the config names.
    match = re.search(r"`([^`]*) sandbox --dir ([^`]*)`", result.stderr)
    assert match is not None, result.stderr
    assert Path(tmp_path, match.group(1)).resolve() == M365RELAY.resolve()
    assert Path(tmp_path, match.group(2)).resolve() == (tmp_path / ".demo" / "sandbox")
    assert "Traceback" not in result.stderr


async def test_doctor_with_the_token_endpoint_down_names_its_port_and_key(
        sandbox: Sandbox, tmp_path: Path, password_hash: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = base_config(sandbox, tmp_path, password_hash)
    port = free_port()  # nothing listens there
    data["apps"]["contoso"]["authority"] = f"https://localhost:{port}/demo-tenant"
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(data))

    code = await asyncio.to_thread(main, ["doctor", "--config", str(path), "--timeout", "10"])

    out = capsys.readouterr().out
    assert code == 1, out
    assert f"localhost refused the connection on port {port} (HTTPS)" in out
    assert "port 443" not in out
    fix = out.split("localhost refused the connection", 1)[1].split("\n\n", 1)[0]
    assert fix.count("`apps.contoso.authority`") == 1, fix
    assert "smtp" not in fix.lower()  # an HTTPS failure: no SMTP hint
    assert "start it first" in fix


def test_hash_password_without_a_terminal_says_to_use_stdin() -> None:
    # A new session has no controlling terminal, as under cron, CI or `docker exec` without -t.
    result = run("hash-password", start_new_session=True)
    assert result.returncode == 2
    assert "--stdin" in result.stderr
    assert "Traceback" not in result.stderr and "bug" not in result.stderr

    piped = run("hash-password", "--stdin", stdin=None, input="s3cret printer\n",
                start_new_session=True)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith("$argon2id$")


# -- --help ---------------------------------------------------------------------------------------


def test_one_default_config_path_everywhere() -> None:
    unit = (ROOT / "systemd" / "m365relay.service").read_text()
    assert f"--config {DEFAULT_PATH} " in unit
    readme = (ROOT / "README.md").read_text()
    others = set(re.findall(r"/etc/m365relay/[\w.-]+\.ya?ml", readme)) - {str(DEFAULT_PATH)}
    assert not others, f"the README names other config paths: {others}"
    for command in ("doctor", "login", "check-config", "serve", "healthcheck", "queue"):
        shown = run(command, "--help").stdout
        assert str(DEFAULT_PATH) in " ".join(shown.split()), f"{command} --help:\n{shown}"


def test_serve_without_config_reads_the_default_path() -> None:
    if DEFAULT_PATH.exists():
        pytest.skip(f"{DEFAULT_PATH} exists on this machine")
    result = run("serve")
    assert result.returncode == 78
    assert str(DEFAULT_PATH) in result.stderr and "config file" in result.stderr


def test_sandbox_help_shows_the_defaults_the_demo_config_uses() -> None:
    data = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    app = data["apps"]["sandbox"]
    entra = re.search(r":(\d+)/", app["authority"])
    assert entra is not None
    folder = os.path.normpath(Path("config", app["ca_file"]).parent)  # .demo/sandbox
    shown = " ".join(run("sandbox", "--help").stdout.split())
    assert f"(default {entra.group(1)})" in shown
    assert f"(default {app['smtp_port']})" in shown
    assert f"(default {folder})" in shown
    assert folder in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("command", ["serve", "healthcheck", "check-config", "hash-password",
                                     "sandbox", "demo", "doctor", "login", "queue"])
def test_every_option_in_help_says_what_it_does(command: str) -> None:
    shown = run(command, "--help").stdout
    assert shown.startswith("usage:")
    options = shown.split("options:", 1)[1]
    # argparse prints an option with no help text as a bare line; upper-case metavars that
    # only repeat the option's name (SHUTDOWN_TIMEOUT) say nothing either.
    for line in options.splitlines():
        flag = line.strip()
        if flag.startswith("-") and "  " not in flag and not flag.endswith(","):
            following = options.split(line, 1)[1].splitlines()[1:2]
            assert following and following[0].startswith(" " * 20), \
                f"{command}: {flag} has no help text"
    assert not re.search(r"--[\w-]+ [A-Z_]{2,}_[A-Z_]+", options), options


@pytest.mark.parametrize(("ctx", "stage", "where", "key", "default"), [
    (Context(app="a", authority_host="localhost:18443"), "token",
     "localhost refused the connection on port 18443 (HTTPS)", "`apps.a.authority`",
     "login.microsoftonline.com"),
    (Context(app="a", authority_host="login.microsoftonline.com"), "token",
     "login.microsoftonline.com refused the connection on port 443 (HTTPS)",
     "`apps.a.authority`", "login.microsoftonline.com"),
    (Context(app="a", smtp_host="graph.microsoft.com", graph=True), "connect",
     "graph.microsoft.com refused the connection on port 443 (HTTPS)",
     "`apps.a.graph_endpoint`", "graph.microsoft.com"),
    (Context(app="a", smtp_host="smtp.office365.com", smtp_port=587), "connect",
     "smtp.office365.com refused the connection on port 587", "`apps.a.smtp_port`",
     "smtp.office365.com and 587"),
])
def test_a_refused_connection_names_the_endpoint_its_port_and_keys(
        ctx: Context, stage: str, where: str, key: str, default: str) -> None:
    explained = explain_connection_error(ConnectionRefusedError(111, "Connect call failed"),
                                         stage=stage, ctx=ctx)
    assert explained.summary.startswith(where)
    assert explained.fix.count(key) == 1, explained.fix
    assert default in explained.fix
    https = "HTTPS" in where
    assert ("SMTP" in explained.fix or "smtp" in explained.fix) is not https, explained.fix
    local = ctx.authority_host.startswith("localhost")
    assert ("start it first" in explained.fix) is local


def test_doctor_on_a_bad_config_gives_a_command_that_runs_from_here(tmp_path: Path) -> None:
    (tmp_path / "relay.yaml").write_text("accounts:\n  - password_hash: plain-text\n")
    result = run("doctor", "--config", "relay.yaml", cwd=tmp_path)
    assert result.returncode == 78
    hinted = re.findall(r"`(\S+) (?:check-config|hash-password)", result.stdout)
    assert hinted, result.stdout
    assert all(Path(tmp_path, h).resolve() == M365RELAY.resolve() for h in hinted), hinted
