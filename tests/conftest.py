"""Shared fixtures: the sandbox (fake Entra + fake Exchange Online) and a real relay on port 0.

Everything talks over real sockets on loopback: msal really calls the fake token endpoint over
HTTPS, the relay really does STARTTLS + XOAUTH2 to the fake Exchange, and tests use real SMTP
clients against the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import smtplib
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pgserver
import pytest
import trustme
from pgserver import PgServer

from relay.config import records as config_mod
from relay.policy.passwords import hash_password
from relay.sandbox import DEMO_APP, Sandbox
from relay.sandbox.rules import MICROSOFT
from relay.service.lifecycle import Relay

PASSWORD = "correct horse battery staple"
MAILBOX = "scanner@contoso.example"


@dataclass
class TLSFiles:
    ca: trustme.CA
    cert: Path
    key: Path
    ca_file: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """In-process CLI commands (`main(["doctor", ...])`) set up logging for a process: the root
    logger's handlers and level. Put them back, so no test inherits another's (a handler left on
    a closed capture stream, or a root level of CRITICAL hiding a later test's warnings)."""
    root = logging.getLogger()
    handlers, level = set(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        # pytest swaps its own capture handlers between phases; it removes those itself.
        if handler not in handlers and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def password_hash() -> str:
    return hash_password(PASSWORD)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A listener certificate for localhost/127.0.0.1 from a throwaway CA."""
    folder = tmp_path_factory.mktemp("listener-tls")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, ca_file = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    server.private_key_and_cert_chain_pem.write_to_path(str(cert))
    server.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return TLSFiles(ca, cert, key, ca_file)


# Microsoft's limits (relay/sandbox/RULES.md) except the 30-a-minute rate: base_config switches
# the relay's pacing off so tests need not wait 2 s a message, and so this switches off the
# limit that pacing keeps (tests/test_pacing.py runs both, scaled to a short window).
SANDBOX_LIMITS = replace(MICROSOFT, messages=0)


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with Sandbox(tmp_path / "sandbox", limits=SANDBOX_LIMITS) as box:
        yield box


def base_config(sandbox: Sandbox, tmp_path: Path, password_hash: str) -> dict[str, Any]:
    """A config as a user would write it, pointing at the sandbox; tests adjust copies."""
    return {
        "listeners": [{"name": "local", "bind": "127.0.0.1:0", "tls": "none"}],
        "apps": {
            "contoso": {
                "tenant": DEMO_APP.tenant,
                "client_id": DEMO_APP.client_id,
                "client_secret": {"file": str(sandbox.directory / "demo-client-secret")},
                "authority": sandbox.authority(DEMO_APP.tenant),
                "smtp_host": sandbox.smtp_host,
                "smtp_port": sandbox.smtp_port,
                "ca_file": str(sandbox.ca_file),
            },
        },
        "accounts": [
            {"name": "scanner", "username": "scanner01", "password_hash": password_hash,
             "app": "contoso", "mailbox": MAILBOX},
            {"name": "printers", "networks": ["127.0.0.0/8"], "app": "contoso",
             "mailbox": "printers@contoso.example"},
        ],
        "spool": {"directory": str(tmp_path / "spool"), "min_free_space": 0},
        # Pacing off: most tests send a few messages and must not wait 2 s between them
        # (tests/test_pacing.py switches it on).
        "delivery": {"min_backoff": 0.2, "max_backoff": 1, "idle_timeout": 5,
                     "pacing": {"messages_per_minute": 0}},
    }


class RelayFactory:
    """Starts relays in the test's event loop and stops them at the end of the test."""

    def __init__(self, sandbox: Sandbox, tmp_path: Path, password_hash: str) -> None:
        self.sandbox = sandbox
        self.tmp_path = tmp_path
        self.password_hash = password_hash
        self.running: list[Relay] = []

    def config(self) -> dict[str, Any]:
        return copy.deepcopy(base_config(self.sandbox, self.tmp_path, self.password_hash))

    async def start(self, data: dict[str, Any] | None = None) -> Relay:
        config = config_mod.parse(data or self.config(), base_dir=self.tmp_path)
        relay = Relay(config)
        await relay.start()
        self.running.append(relay)
        return relay

    async def stop(self, relay: Relay, timeout: float = 5) -> None:
        await relay.stop(timeout=timeout)
        self.running.remove(relay)


@pytest.fixture
async def relays(sandbox: Sandbox, tmp_path: Path, password_hash: str
                 ) -> AsyncIterator[RelayFactory]:
    factory = RelayFactory(sandbox, tmp_path, password_hash)
    yield factory
    for relay in list(factory.running):
        await factory.stop(relay)


def message(subject: str = "hello", body: str = "Scan attached.\r\n",
            sender: str = "device@printers.example", to: str = "someone@example.org") -> bytes:
    return (f"From: Device <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@printers.example>\r\n\r\n{body}"
            ).encode()


@contextlib.contextmanager
def smtp_client(address: tuple[str, int], **kwargs: Any) -> Iterator[smtplib.SMTP]:
    client = smtplib.SMTP(address[0], address[1], timeout=15, **kwargs)
    try:
        yield client
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()


def send(address: tuple[str, int], data: bytes, *, sender: str = "device@printers.example",
         rcpts: tuple[str, ...] = ("someone@example.org",),
         login: tuple[str, str] | None = None, starttls: ssl.SSLContext | None = None
         ) -> tuple[int, bytes]:
    """Send with smtplib (blocking: call through asyncio.to_thread). Returns the DATA reply."""
    with smtp_client(address) as client:
        client.ehlo("device.test")
        if starttls is not None:
            client.starttls(context=starttls)
            client.ehlo("device.test")
        if login is not None:
            client.login(*login)
        client.mail(sender)
        for rcpt in rcpts:
            client.rcpt(rcpt)
        return client.data(data)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition with a deadline (for state that has no event to wait on)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not reached before the deadline")
        await asyncio.sleep(0.02)


# --- PostgreSQL (cluster mode) ---------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One real PostgreSQL server for the session (tests/pgserver.py). Missing PostgreSQL is a
    skip locally and a failure under CI=true, where scripts/setup has installed it."""
    problem = pgserver.available()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> str:
    """A DSN to an empty database of this test's own."""
    return pg_server.dsn(pg_server.new_database())
