"""A relay as an admin watches it: mail delivered, deferred and failed, a delegated account
that must sign in, a TLS listener and an app certificate. Shared by the dashboard/alert
metric check and the status page browser test, so both look at the same state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import trustme
from conftest import PASSWORD, RelayFactory, TLSFiles, message, send, wait_until
from cryptography.fernet import Fernet

from relay.sandbox import DEMO_APP, Sandbox, SandboxApp
from relay.service.lifecycle import Relay

# A personal Outlook.com app registration (public client, delegated sign-in).
PERSONAL = SandboxApp(tenant="consumers", client_id="9e5f94bc-e8a4-4e73-b8be-63364c29d753",
                      roles=())
SANDBOX_APPS = (DEMO_APP, PERSONAL)  # a test module's `sandbox` fixture passes these
BUSY = "busy@example.org"  # Exchange keeps answering "server busy" for this recipient
GONE = "gone@example.org"  # and "no such recipient" for this one


@dataclass
class Watched:
    relay: Relay
    delivered_id: str
    bounced_id: str
    deferred_id: str
    signin_id: str


def watched_config(relays: RelayFactory, tls_files: TLSFiles, **http: Any) -> dict[str, Any]:
    data = relays.config()
    sandbox, tmp = relays.sandbox, relays.tmp_path
    data["http"] = {"bind": "127.0.0.1:0", **http}
    data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]
    data["listeners"].append({"name": "lan", "bind": "127.0.0.1:0", "tls": "starttls",
                              "certificate": str(tls_files.cert),
                              "private_key": str(tls_files.key)})
    # Retries far enough apart that the deferred messages stay deferred while we look.
    # Pacing on (m365relay_mailbox_pacing_rate has lanes then), fast enough not to wait.
    data["delivery"].update(min_backoff=300, max_backoff=600,
                            pacing={"messages_per_minute": 600})
    issued = trustme.CA().issue_cert("m365relay-app.example")
    data["apps"]["certapp"] = {**{k: v for k, v in data["apps"]["contoso"].items()
                                  if k != "client_secret"},
                               "certificate": {
                                   "private_key": issued.private_key_pem.bytes().decode(),
                                   "certificate": issued.cert_chain_pems[0].bytes().decode()}}
    data["apps"]["outlook"] = {"flow": "delegated", "tenant": "consumers",
                               "client_id": PERSONAL.client_id,
                               "authority": sandbox.authority("consumers"),
                               "smtp_host": sandbox.smtp_host, "smtp_port": sandbox.smtp_port,
                               "ca_file": str(sandbox.ca_file)}
    data["accounts"].append({"name": "personal", "username": "personal01",
                             "password_hash": relays.password_hash, "app": "outlook",
                             "mailbox": "me@outlook.example"})
    key = tmp / "token.key"
    key.write_text(Fernet.generate_key().decode() + "\n")
    data["token_store"] = {"directory": str(tmp / "tokens"), "key": {"file": str(key)}}
    return data


async def start_watched(relays: RelayFactory, sandbox: Sandbox, tls_files: TLSFiles,
                        **http: Any) -> Watched:
    sandbox.exchange.inject("rcpt", "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found",
                            rcpt=GONE)
    sandbox.exchange.inject("rcpt", "451 4.7.500 Server busy. Please try again later",
                            times=1000, rcpt=BUSY)
    relay = await relays.start(watched_config(relays, tls_files, **http))
    address = relay.addresses["local"]

    async def one(to: str, **kwargs: Any) -> str:
        code, reply = await asyncio.to_thread(send, address, message(f"to {to}"),
                                              rcpts=(to,), **kwargs)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]

    delivered = await one("ok@example.org")
    bounced = await one(GONE)
    deferred = await one(BUSY)
    signin = await one("friend@example.org", login=("personal01", PASSWORD))
    counters = relay.delivery.counters
    # ok@ and the DSN for gone@ delivered; busy@ and the personal account's message deferred.
    await wait_until(lambda: counters.delivered >= 2 and counters.deferred >= 2, timeout=20)
    await wait_until(lambda: relay.tokens.delegated is not None and any(
        s.needs_login for s in relay.tokens.delegated.statuses()))
    return Watched(relay, delivered, bounced, deferred, signin)

