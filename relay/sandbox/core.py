"""Sandbox: FakeEntra and FakeExchange behind one throwaway CA, and ``m365relay sandbox``."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import trustme
from cryptography.fernet import Fernet

from relay.sandbox.apps import DEMO_APP, SandboxApp
from relay.sandbox.entra import FakeEntra
from relay.sandbox.exchange import FakeExchange
from relay.sandbox.graph import FakeGraph
from relay.sandbox.rules import MICROSOFT, MailboxLimits

SECRET_FILE = "demo-client-secret"  # noqa: S105 - a file name, not a secret
# A Fernet key for the demo's token_store (delegated sign-ins); kept across restarts so the
# files it encrypted stay readable.
TOKEN_KEY_FILE = "demo-token-key"  # noqa: S105 - a file name, not a secret


class Sandbox:
    """A local Exchange Online + Entra ID pair with real TLS, for admins and for tests."""

    def __init__(self, directory: Path, *, apps: Sequence[SandboxApp] = (DEMO_APP,),
                 entra_port: int = 0, smtp_port: int = 0, token_lifetime: int = 3600,
                 host: str = "127.0.0.1", graph: bool = False,
                 limits: MailboxLimits = MICROSOFT) -> None:
        if not apps:
            raise ValueError("the sandbox needs at least one app registration")
        self.directory = Path(directory)
        self.apps = tuple(apps)
        self.host = host
        self.ca_file = self.directory / "ca.pem"
        self.secret_file = self.directory / SECRET_FILE
        self.smtp_host = "localhost"  # the name the server certificate is issued for
        self.smtp_port = smtp_port
        self.entra_port = entra_port
        self.entra = FakeEntra(self.apps, token_lifetime=token_lifetime)
        # Exchange Online's per-mailbox limits (relay/sandbox/rules.py); tests may scale them.
        self.exchange = FakeExchange(self.entra, mail_dir=self.directory / "mail",
                                     limits=limits)
        # Microsoft Graph (sendMail) only when asked: most setups use SMTP.
        self.graph = FakeGraph(self.entra, mail_dir=self.directory / "graph-mail",
                               limits=limits) if graph else None
        self._running = False

    def authority(self, tenant: str) -> str:
        return f"https://localhost:{self.entra_port}/{tenant}"

    @property
    def graph_url(self) -> str:
        """The fake Graph's base URL, for ``apps.<name>.graph_endpoint``."""
        if self.graph is None:
            raise RuntimeError("this sandbox was started without Graph (Sandbox(graph=True))")
        return f"https://localhost:{self.graph.port}"

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only the sandbox CA (what a relay should build)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def reset(self) -> None:
        self.entra.reset()
        self.exchange.reset()
        if self.graph is not None:
            self.graph.reset()

    async def start(self) -> None:
        if self._running:
            raise RuntimeError("the sandbox is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        tls = await asyncio.to_thread(self._write_credentials)
        try:
            self.entra_port = self.entra.start(self.host, self.entra_port, tls)
        except OSError as exc:
            raise _bind_error("Entra (HTTPS)", self.host, self.entra_port, exc) from exc
        try:
            self.smtp_port = await self.exchange.start(self.host, self.smtp_port, tls)
        except OSError as exc:
            await self.entra.stop()
            raise _bind_error("Exchange (SMTP)", self.host, self.smtp_port, exc) from exc
        if self.graph is not None:
            try:
                self.graph.start(self.host, 0, tls)
            except OSError as exc:
                await self.exchange.stop()
                await self.entra.stop()
                raise _bind_error("Graph (HTTPS)", self.host, 0, exc) from exc
        self._running = True

    async def stop(self) -> None:
        self._running = False
        if self.graph is not None:
            await self.graph.stop()
        await self.exchange.stop()
        await self.entra.stop()

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    def _write_credentials(self) -> ssl.SSLContext:
        """New CA and server certificate each start; write ca.pem and the demo secret."""
        ca = trustme.CA(organization_name="m365relay sandbox")
        names = ["localhost", "127.0.0.1", "::1"]
        if self.host not in ("", "0.0.0.0", "::", *names):  # noqa: S104 - comparing, not binding
            names.append(self.host)
        server_cert = ca.issue_cert(*names)
        self.ca_file.write_bytes(ca.cert_pem.bytes())
        self.ca_file.chmod(0o644)  # a CA certificate is public; devices and relays read it
        secret = next((a.client_secret for a in self.apps if a.client_secret), None)
        if secret is not None:
            _write_private(self.secret_file, secret + "\n")
        key_file = self.directory / TOKEN_KEY_FILE
        if not key_file.exists():
            _write_private(key_file, Fernet.generate_key().decode("ascii") + "\n")
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2  # Exchange Online refuses older TLS
        server_cert.configure_cert(tls)
        return tls


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode does not apply to an existing file
        f.write(text)


def _bind_error(what: str, host: str, port: int, exc: OSError) -> OSError:
    return OSError(exc.errno, f"the sandbox's {what} listener cannot use {host}:{port}: "
                              f"{exc.strerror or exc}. Choose another port, or 0 for any free one.")


async def run_sandbox(directory: Path, *, entra_port: int, smtp_port: int,
                      apps: Sequence[SandboxApp] = (DEMO_APP,),
                      on_ready: Callable[[Sandbox], object] | None = None) -> None:
    """Run the sandbox until cancelled, after printing how to point a relay at it."""
    async with Sandbox(directory, apps=apps, entra_port=entra_port,
                       smtp_port=smtp_port) as sandbox:
        print(describe(sandbox), flush=True)
        if on_ready is not None:
            on_ready(sandbox)
        await asyncio.Event().wait()  # the CLI cancels us on Ctrl+C / SIGTERM


def describe(sandbox: Sandbox) -> str:
    app = sandbox.apps[0]
    secret = (f"in {sandbox.secret_file}" if app.client_secret
              else "none (this app signs in with a certificate)")
    return "\n".join([
        "The m365relay sandbox is running: a local imitation of Exchange Online and Entra ID.",
        "Nothing leaves this machine; mail is only saved to disk.",
        "",
        f"  Entra authority:  {sandbox.authority(app.tenant)}",
        f"  Tenant:           {app.tenant}",
        f"  Client ID:        {app.client_id}",
        f"  Client secret:    {secret}",
        f"  Exchange SMTP:    {sandbox.smtp_host}:{sandbox.smtp_port} (STARTTLS, AUTH XOAUTH2)",
        f"  Device sign-in:   https://localhost:{sandbox.entra_port}/devicelogin (approve a "
        "`m365relay login` code; /revoke revokes a user's sign-ins)",
        f"  Trust this CA:    {sandbox.ca_file}",
        f"  Received mail:    {sandbox.exchange.mail_dir}",
        "",
        "Point the relay's app at these values, and press Ctrl+C to stop.",
    ])
