"""The three things a benchmark run talks to, and how each is started.

* ``direct``: no server; the load generator does STARTTLS + XOAUTH2 to the fake Exchange.
* ``m365relay``: ``python -m relay serve`` with a generated config, one account per mailbox
  chosen by the client's loopback source address (127.0.0.10, .11, ...) so devices need no
  AUTH, as printers on a LAN do.
* ``m365relay-pg``: the same relay on the cluster queue (``spool.postgres``), a fresh database
  per run on the bench run's PostgreSQL server (bench/database.py).
* ``m365relay-pg2``: two such relays (nodes ``bench-a`` and ``bench-b``) on one database, the
  load clients split between them (client *c* talks to relay *c* mod 2).
* ``emailproxy``: simonrob/email-oauth2-proxy from PyPI in ``bench/.venv``, in its
  client-credentials mode against the same fakes. Devices log in with the mailbox address and
  any password (emailproxy uses it to encrypt the cached token).

Each run starts a fresh process on a port picked just before, so token counts, peak RSS and
cold start are per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import procstat
from bench.messages import mailbox_name
from relay.config.records import DeliverySettings, Listener

ROOT = Path(__file__).resolve().parent.parent
BENCH_VENV = ROOT / "bench" / ".venv"
BASE_TARGETS = ("direct", "m365relay", "emailproxy")
PG_TARGETS = ("m365relay-pg", "m365relay-pg2")
TARGETS = BASE_TARGETS + PG_TARGETS
NODES = {"m365relay-pg": ("bench-a",), "m365relay-pg2": ("bench-a", "bench-b")}
EMAILPROXY_PASSWORD = "bench-device-password"  # noqa: S105 - emailproxy's local login, any value
RELAY_PASSWORD = "bench relay device password"  # noqa: S105 - the AUTH scenarios' accounts


def is_relay(target: str) -> bool:
    """m365relay, whatever its store: the clients talk to it alike."""
    return target == "m365relay" or target in PG_TARGETS


def relay_username(mailbox: int) -> str:
    return f"device{mailbox}"


@functools.cache
def _relay_password_hash() -> str:
    # argon2 as the relay's own `hash-password` makes it
    from relay.policy.passwords import hash_password

    return hash_password(RELAY_PASSWORD)


def source_address(mailbox: int) -> str:
    """The loopback address a relay client uses to be mapped to mailbox ``mailbox``."""
    return f"127.0.0.{10 + mailbox}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A started relay or emailproxy process."""

    name: str
    proc: asyncio.subprocess.Process
    port: int
    log: Path
    spawned_at: float
    ready_at: float = 0.0
    spool: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def cold_start(self) -> float:
        return self.ready_at - self.spawned_at

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def wait_ready(self, timeout: float = 60) -> None:
        """Poll until a client gets the 220 banner: 'accepting the first connection'."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} during "
                                   f"start:\n{self.log_tail()}")
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.002)  # nothing to wait on: the port is not open yet
                continue
            try:
                line = await asyncio.wait_for(reader.readline(), max(deadline - time.monotonic(),
                                                                     0.1))
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            if line.startswith(b"220"):
                self.ready_at = time.monotonic()
                return
            raise RuntimeError(f"{self.name} answered {line!r} instead of a 220 banner")
        raise TimeoutError(f"{self.name} did not accept connections within {timeout} s:\n"
                           f"{self.log_tail()}")

    def spool_backlog(self) -> int:
        """Messages still in the relay's queue (0 if the layout is unknown)."""
        if self.spool is None:
            return 0
        queue = self.spool / "queue"
        try:
            return sum(1 for p in queue.iterdir() if not p.name.startswith("."))
        except OSError:
            return 0

    async def stop(self, timeout: float = 15) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()


async def _spawn(name: str, command: list[str], *, log: Path, cwd: Path, env: dict[str, str],
                 port: int, cpus: frozenset[int], spool: Path | None = None) -> Server:
    handle = log.open("wb")
    spawned = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *procstat.pinned_command(command, cpus), stdin=asyncio.subprocess.DEVNULL,
        stdout=handle, stderr=asyncio.subprocess.STDOUT, cwd=cwd, env=env)
    handle.close()
    server = Server(name, proc, port, log, spawned, spool=spool)
    try:
        await server.wait_ready()
    except BaseException:
        await server.stop(timeout=5)
        raise
    return server


def _field_names(record: type) -> set[str]:
    """A config record's keys: a dataclass now, a pydantic model in relays before issue 6."""
    fields = getattr(record, "model_fields", None)
    return set(fields) if fields is not None else {f.name for f in dataclasses.fields(record)}


def relay_config(fakes: dict[str, Any], port: int, run_dir: Path, mailboxes: int,
                 auth: bool = False, *, postgres: str | None = None, node: str = ""
                 ) -> dict[str, Any]:
    listener: dict[str, Any] = {"name": "bench", "bind": f"127.0.0.1:{port}", "tls": "none",
                                "networks": ["127.0.0.0/8"]}
    if auth:  # AUTH over plain SMTP on loopback, as a listener allows it for listed networks
        listener["cleartext_auth_networks"] = ["127.0.0.0/8"]
    # The idle scenario measures memory per connection, so the connection limits (defaults 100
    # and 20 per address) must not refuse its 1,000 clients; set only if this relay has them.
    fields = _field_names(Listener)
    listener.update({key: 5000 for key in ("max_connections", "max_connections_per_ip")
                     if key in fields})
    # Retries in the fault scenario should come within the run, not after 5 minutes.
    delivery: dict[str, Any] = {"min_backoff": 0.2, "max_backoff": 2, "idle_timeout": 30}
    # Pacing keeps to Exchange's 30 messages a minute per mailbox; the fakes have no limit and
    # the benchmark measures the relay's own cost (issue 6), so it is off.
    if "pacing" in _field_names(DeliverySettings):
        delivery["pacing"] = {"messages_per_minute": 0}
    return {
        "hostname": "bench-relay.example",
        "listeners": [listener],
        "apps": {"bench": {
            "tenant": fakes["tenant"], "client_id": fakes["client_id"],
            "client_secret": {"file": fakes["secret_file"]},
            "authority": fakes["authority"], "smtp_host": fakes["smtp_host"],
            "smtp_port": fakes["smtp_port"], "ca_file": fakes["ca_file"]}},
        "accounts": [{"name": f"mailbox{k}", "app": "bench", "mailbox": mailbox_name(k),
                      **({"username": relay_username(k), "password_hash": _relay_password_hash()}
                         if auth else {"networks": [f"{source_address(k)}/32"]})}
                     for k in range(mailboxes)],
        "spool": ({"postgres": postgres, "node": node} if postgres else
                  {"directory": str(run_dir / "spool"), "min_free_space": 0}),
        "delivery": delivery,
    }


async def start_relay(fakes: dict[str, Any], run_dir: Path, mailboxes: int,
                      cpus: frozenset[int], *, auth: bool = False, postgres: str | None = None,
                      node: str = "") -> Server:
    port = free_port()
    suffix = f"-{node}" if node else ""
    config = run_dir / f"relay{suffix}.yaml"
    data = await asyncio.to_thread(relay_config, fakes, port, run_dir, mailboxes, auth,
                                   postgres=postgres, node=node)
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    command = [sys.executable, "-m", "relay", "serve", "--config", str(config),
               "--shutdown-timeout", "5"]
    # Keep a caller's PYTHONPATH after ours: it is how a patched module can be tried out.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    # Cached bytecode, as an installed relay has (pip compiles it): without it every start
    # compiles relay/ again, ~0.1 s and ~1 MB. emailproxy's wheel ships its bytecode too.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return await _spawn(f"m365relay{suffix}", command, log=run_dir / f"relay{suffix}.log",
                        cwd=ROOT, env=env, port=port, cpus=cpus,
                        spool=None if postgres else run_dir / "spool")


def emailproxy_config(fakes: dict[str, Any], port: int, mailboxes: int) -> str:
    secret = Path(fakes["secret_file"]).read_text(encoding="utf-8").strip()
    lines = [
        f"[SMTP-{port}]",
        "local_address = 127.0.0.1",
        f"server_address = {fakes['smtp_host']}",
        f"server_port = {fakes['smtp_port']}",
        "server_starttls = True",
        "",
    ]
    for k in range(mailboxes):
        lines += [
            f"[{mailbox_name(k)}]",
            # No permission_url: with one, emailproxy switches to the interactive
            # authorization-code flow; client credentials needs only the token endpoint.
            f"token_url = {fakes['token_url']}",
            f"oauth2_scope = {fakes['scope']}",
            "oauth2_flow = client_credentials",
            f"client_id = {fakes['client_id']}",
            f"client_secret = {secret}",
            "",
        ]
    return "\n".join(lines)


async def start_emailproxy(fakes: dict[str, Any], run_dir: Path, mailboxes: int,
                           cpus: frozenset[int]) -> Server:
    executable = BENCH_VENV / "bin" / "emailproxy"
    if not executable.exists():
        raise RuntimeError(f"{executable} is missing; run the benchmark without --no-install "
                           "once to create bench/.venv")
    port = free_port()
    config = run_dir / "emailproxy.config"
    config.write_text(emailproxy_config(fakes, port, mailboxes), encoding="utf-8")
    command = [str(executable), "--no-gui", "--config-file", str(config),
               "--log-file", str(run_dir / "emailproxy-own.log")]
    # emailproxy verifies with Python's default context for both urllib (token endpoint) and
    # its upstream STARTTLS; OpenSSL reads the trust store from SSL_CERT_FILE.
    env = {**os.environ, "SSL_CERT_FILE": fakes["ca_file"]}
    return await _spawn("emailproxy", command, log=run_dir / "emailproxy.log", cwd=run_dir,
                        env=env, port=port, cpus=cpus)


async def start(target: str, fakes: dict[str, Any], run_dir: Path, mailboxes: int,
                cpus: frozenset[int], *, auth: bool = False, postgres: str | None = None,
                cpus2: frozenset[int] = frozenset()) -> list[Server]:
    """The target's processes (none for direct); ``postgres``: the run's database, for the
    PostgreSQL targets. The relays of a cluster start at once, as a deployment's pods do (the
    schema is created under a lock by whichever comes first)."""
    await asyncio.to_thread(run_dir.mkdir, parents=True, exist_ok=True)
    if target == "direct":
        return []
    if target == "m365relay":
        return [await start_relay(fakes, run_dir, mailboxes, cpus, auth=auth)]
    if target == "emailproxy":
        return [await start_emailproxy(fakes, run_dir, mailboxes, cpus)]
    if target in PG_TARGETS:
        if postgres is None:
            raise ValueError(f"{target} needs the bench run's PostgreSQL server")
        starts = [start_relay(fakes, run_dir, mailboxes, cpus if i == 0 else cpus2 or cpus,
                              auth=auth, postgres=postgres, node=node)
                  for i, node in enumerate(NODES[target])]
        started = await asyncio.gather(*starts, return_exceptions=True)
        servers = [s for s in started if isinstance(s, Server)]
        failed = [s for s in started if isinstance(s, BaseException)]
        if failed:
            for server in servers:
                await server.stop(timeout=5)
            raise failed[0]
        return servers
    raise ValueError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
