"""``m365relay demo``: the whole pipeline on one machine, against the sandbox.

It starts the sandbox where the demo config's app points (authority port, SMTP port, and the
folder of its ``ca_file``), starts the relay with that config, sends one message through the
first listener as a device would, and shows where it landed.
"""

from __future__ import annotations

import asyncio
import smtplib
import sys
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from relay.config import progname
from relay.config import records as config_mod
from relay.sandbox import Sandbox
from relay.service.lifecycle import Relay

# The password of the demo config's person account (its argon2 hash is in config/demo.yaml).
DEMO_PASSWORD = "demo-password"  # noqa: S105 - published; only the demo's loopback listener
DEVICE_SENDER = "scanner@printers.example"  # what a scanner on the LAN would send as
DEMO_RECIPIENT = "you@contoso.example"


def _sandbox_settings(path: Path) -> tuple[Path, int, int]:
    """Sandbox folder and ports, read from the demo config's first app."""
    data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    app = next(iter(data["apps"].values()))
    folder = (path.resolve().parent / app["ca_file"]).resolve().parent
    port = urlsplit(app["authority"]).port or 443
    return folder, port, int(app["smtp_port"])


def _send(host: str, port: int, sender: str, to: str,
          login: tuple[str, str] | None = None) -> str:
    msg = EmailMessage()
    msg["From"] = f"Scanner on floor 2 <{sender}>"
    msg["To"] = to
    msg["Subject"] = "Scan from the demo device"
    msg.set_content("This message went device -> m365relay -> sandbox Exchange Online.\n")
    with smtplib.SMTP(host, port, timeout=30) as client:
        if login is not None:
            client.login(*login)
        client.send_message(msg)
        return str(client.noop())


# `m365relay login`'s sign-in (relay.login.run_login: config, config path, account -> address);
# cli.py passes it in, since the sandbox sits below the commands.
Login = Callable[[config_mod.Config, Path, str], str]


async def _delegated(sandbox: Sandbox, config: config_mod.Config, path: Path,
                     address: tuple[str, int], run_login: Login | None) -> str | None:
    """The delegated flow, if the demo config has an account for it: `m365relay login`, the
    person approving the code on the sandbox's /devicelogin page (done here over HTTPS, as a
    browser would), then a message sent with AUTH as that account."""
    account = next((a for a in config.accounts if a.username
                    and config.apps[a.app].flow == "delegated"), None)
    if account is None or run_login is None:
        return None
    print(f"\n== signing in {account.mailbox} for account {account.name}: "
          f"m365relay login {account.name} --config {path}", file=sys.stdout, flush=True)
    login = asyncio.create_task(asyncio.to_thread(run_login, config, path, account.name))
    url = ""
    while not url and not login.done():
        codes = sandbox.entra.delegated.pending_user_codes()
        if codes:
            url = f"https://localhost:{sandbox.entra_port}/devicelogin"
            print(f"== the demo approves code {codes[0]} at {url} as {account.mailbox} "
                  "(by hand: open that page in a browser)", flush=True)
            await asyncio.to_thread(_approve, url, sandbox.ca_file, codes[0], account.mailbox)
        else:
            await asyncio.sleep(0.1)
    await login
    await asyncio.to_thread(_send, *address, account.mailbox, "someone@contoso.example",
                            login=(account.username or "", DEMO_PASSWORD))
    got = await sandbox.exchange.wait_for_messages(2, timeout=30)
    return (f"delivered as {got[-1].auth_user} with the person's own token (AUTH "
            f"{account.username} / {DEMO_PASSWORD} on the listener)")


def _approve(url: str, ca_file: Path, code: str, user: str) -> None:
    import requests  # only the demo needs it here; msal brings it

    response = requests.post(url, data={"user_code": code, "user": user},
                             verify=str(ca_file), timeout=10)
    response.raise_for_status()


def _relative(path: Path) -> Path:
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


async def run_demo(path: Path, login: Login | None = None) -> int:
    """``login``: how to sign the demo's person in (``relay.login.run_login``); without it
    the delegated part is left out."""
    out = sys.stdout
    folder, entra_port, smtp_port = _sandbox_settings(path)
    async with Sandbox(folder, entra_port=entra_port, smtp_port=smtp_port) as sandbox:
        try:
            config = config_mod.load(path)
        except config_mod.ConfigError as exc:
            print(exc, file=sys.stderr)
            return 78
        relay = Relay(config, config_path=path)
        await relay.start()
        try:
            name, (host, port) = next(iter(relay.addresses.items()))
            print(f"\n== relay listening on {host}:{port} ({name}); sending a test message",
                  file=out)
            await asyncio.to_thread(_send, host, port, DEVICE_SENDER, DEMO_RECIPIENT)
            received = await sandbox.exchange.wait_for_messages(1, timeout=30)
            person = await _delegated(sandbox, config, path, (host, port), login)
        finally:
            await relay.stop(timeout=10)
    message = received[0]
    shown = _relative(folder)
    head = message.data.split(b"\r\n\r\n", 1)[0].decode("utf-8", errors="replace")
    print(f"\n== delivered to the sandbox's Exchange Online as {message.auth_user}, using "
          f"{sandbox.entra.token_request_count} token request(s)", file=out)
    print(f"== saved as {_relative(message.path) if message.path else '?'}\n\n{head}\n",
          file=out)
    if person is not None:
        print(f"== and as a person: {person}\n", file=out)
    program = progname.command()
    print("Next: run the pieces yourself, the sandbox in one terminal and the relay in another:"
          f"\n  {program} sandbox --dir {shown} --entra-port {entra_port} "
          f"--smtp-port {smtp_port}\n"
          f"  {program} serve --config {path}\n"
          "then point a device at the relay, or send as one from a third terminal:\n"
          f"  swaks --server {host}:{port} --from {DEVICE_SENDER} --to {DEMO_RECIPIENT}\n"
          f"and sign the person in (approve the code at "
          f"https://localhost:{entra_port}/devicelogin; /revoke revokes):\n"
          f"  {program} login alice --config {path}", file=out)
    return 0
