"""``m365relay demo``: the whole pipeline on one machine, against the sandbox.

It starts the sandbox where the demo config's app points (authority port, SMTP port, and the
folder of its ``ca_file``), starts the relay with that config, sends one message through the
first listener as a device would, and shows where it landed.
"""

from __future__ import annotations

import asyncio
import smtplib
import sys
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from relay.config import records as config_mod
from relay.sandbox import Sandbox
from relay.service.lifecycle import Relay


def _sandbox_settings(path: Path) -> tuple[Path, int, int]:
    """Sandbox folder and ports, read from the demo config's first app."""
    data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    app = next(iter(data["apps"].values()))
    folder = (path.resolve().parent / app["ca_file"]).resolve().parent
    port = urlsplit(app["authority"]).port or 443
    return folder, port, int(app["smtp_port"])


def _send(host: str, port: int, sender: str, to: str) -> str:
    msg = EmailMessage()
    msg["From"] = f"Scanner on floor 2 <{sender}>"
    msg["To"] = to
    msg["Subject"] = "Scan from the demo device"
    msg.set_content("This message went device -> m365relay -> sandbox Exchange Online.\n")
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.send_message(msg)
        return str(client.noop())


def _relative(path: Path) -> Path:
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


async def run_demo(path: Path) -> int:
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
            await asyncio.to_thread(_send, host, port, "scanner@printers.example",
                                    "someone@contoso.example")
            received = await sandbox.exchange.wait_for_messages(1, timeout=30)
        finally:
            await relay.stop(timeout=10)
    message = received[0]
    shown = _relative(folder)
    head = message.data.split(b"\r\n\r\n", 1)[0].decode("utf-8", errors="replace")
    print(f"\n== delivered to the sandbox's Exchange Online as {message.auth_user}, using "
          f"{sandbox.entra.token_request_count} token request(s)", file=out)
    print(f"== saved as {_relative(message.path) if message.path else '?'}\n\n{head}\n",
          file=out)
    print("Next: run the pieces yourself in two terminals --\n"
          f"  m365relay sandbox --dir {shown} --entra-port {entra_port} --smtp-port {smtp_port}\n"
          f"  m365relay serve --config {path}\n"
          f"and point a device (or: swaks --server {host}:{port} --to you@contoso.example) "
          "at the relay.", file=out)
    return 0
