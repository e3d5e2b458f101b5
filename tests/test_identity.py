"""Sending identity (from: rewrite | enforce | allow, allowed_from, send_as) and recipient policy,
end to end: real SMTP client -> relay -> sandbox Exchange Online."""

from __future__ import annotations

import asyncio
import dataclasses
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from conftest import MAILBOX, PASSWORD, RelayFactory, message, send, smtp_client, wait_until

from relay.config import records as config_mod
from relay.policy import identity
from relay.sandbox import DEMO_APP, Sandbox
from relay.service.lifecycle import Relay

LOGIN = ("scanner01", PASSWORD)


def scanner(data: dict[str, Any], **fields: Any) -> dict[str, Any]:
    data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]
    data["accounts"][0].update(fields)
    return data


def header_from(data: bytes) -> str:
    return str(message_from_bytes(data)["From"])


def test_patterns_match_addresses_and_whole_domains_only() -> None:
    patterns = ("Billing@Contoso.example", "*@fabrikam.example")
    assert identity.matches("billing@contoso.example", patterns)
    assert identity.matches("anyone@FABRIKAM.example", patterns)
    assert not identity.matches("anyone@sub.fabrikam.example", patterns)
    assert not identity.matches("other@contoso.example", patterns)


def test_config_checks_patterns_and_allow_needs_a_list(relays: RelayFactory) -> None:
    with pytest.raises(config_mod.ConfigError) as bad:
        config_mod.parse(scanner(relays.config(), allowed_from=["not an address"]))
    assert "allowed_from" in str(bad.value) and "*@domain" in str(bad.value)
    with pytest.raises(config_mod.ConfigError) as missing:
        config_mod.parse(scanner(relays.config(), **{"from": "allow"}))
    assert "allowed_from" in str(missing.value)


async def test_enforce_with_list_checks_envelope_and_header(relays: RelayFactory,
                                                            sandbox: Sandbox) -> None:
    relay = await relays.start(scanner(relays.config(), **{"from": "enforce"},
                                       allowed_from=["*@billing.contoso.example"]))
    address = relay.addresses["local"]

    def refused_at_mail() -> tuple[int, bytes]:
        with smtp_client(address) as client:
            client.login(*LOGIN)
            return client.mail("intruder@elsewhere.example")

    code, text = await asyncio.to_thread(refused_at_mail)
    assert code == 550 and b"accounts[].allowed_from" in text and b"from: enforce" in text
    code, text = await asyncio.to_thread(
        send, address, message(sender="intruder@elsewhere.example"),
        sender="invoices@billing.contoso.example", login=LOGIN)
    assert code == 550 and b"From: header <intruder@elsewhere.example> refused" in text
    code, _ = await asyncio.to_thread(
        send, address, message(sender="Invoices@billing.contoso.example"),
        sender="invoices@billing.contoso.example", login=LOGIN)
    assert code == 250
    [got] = await sandbox.exchange.wait_for_messages(1)
    # send_as: authenticate (default): signed in as the sender itself, its own lane.
    assert got.auth_user.casefold() == "invoices@billing.contoso.example"
    assert got.mail_from.casefold() == "invoices@billing.contoso.example"
    assert "Invoices@billing.contoso.example" in header_from(got.data)


async def test_allow_lets_any_listed_sender_through(relays: RelayFactory,
                                                    sandbox: Sandbox) -> None:
    relay = await relays.start(scanner(relays.config(), **{"from": "allow"},
                                       allowed_from=["hr@contoso.example"]))
    address = relay.addresses["local"]

    def refused_at_mail() -> tuple[int, bytes]:
        with smtp_client(address) as client:
            client.login(*LOGIN)
            return client.mail("x@contoso.example")

    code, text = await asyncio.to_thread(refused_at_mail)
    assert code == 550 and b"from: allow" in text
    for sender in ("hr@contoso.example", MAILBOX):
        code, _ = await asyncio.to_thread(send, address, message(sender=sender),
                                          sender=sender, login=LOGIN)
        assert code == 250
    got = await sandbox.exchange.wait_for_messages(2)
    assert sorted(m.auth_user for m in got) == ["hr@contoso.example", MAILBOX]


async def test_rewrite_keeps_allowed_senders_and_rewrites_the_rest(
        relays: RelayFactory, sandbox: Sandbox) -> None:
    relay = await relays.start(scanner(relays.config(), allowed_from=["*@shop.example"]))
    address = relay.addresses["local"]
    for sender in ("orders@shop.example", "device@printers.example"):
        code, _ = await asyncio.to_thread(send, address, message(sender=sender, subject=sender),
                                          sender=sender, login=LOGIN)
        assert code == 250
    got = {str(message_from_bytes(m.data)["Subject"]): m
           for m in await sandbox.exchange.wait_for_messages(2)}
    kept, rewritten = got["orders@shop.example"], got["device@printers.example"]
    assert kept.auth_user == "orders@shop.example" and "orders@shop.example" in header_from(
        kept.data)
    assert rewritten.auth_user == MAILBOX and MAILBOX in header_from(rewritten.data)


async def test_allowed_recipients_refused_at_rcpt(relays: RelayFactory,
                                                  sandbox: Sandbox) -> None:
    allowed = ["boss@example.org", "*@contoso.example"]
    relay = await relays.start(scanner(relays.config(), allowed_recipients=allowed))

    def session() -> tuple[tuple[int, bytes], ...]:
        with smtp_client(relay.addresses["local"]) as client:
            client.login(*LOGIN)
            client.mail(MAILBOX)
            results = (client.rcpt("outsider@gmail.example"), client.rcpt("boss@example.org"),
                       client.rcpt("Desk@CONTOSO.example"))
            client.data(message())
            return results

    outsider, boss, desk = await asyncio.to_thread(session)
    assert outsider == (550, b"5.7.1 Recipient <outsider@gmail.example> not allowed for account "
                             b"scanner (accounts[].allowed_recipients)")
    assert boss[0] == 250 and desk[0] == 250
    [got] = await sandbox.exchange.wait_for_messages(1)
    assert list(got.rcpt_tos) == ["boss@example.org", "Desk@CONTOSO.example"]


async def test_sendas_signs_in_as_the_mailbox_and_keeps_from(relays: RelayFactory,
                                                             sandbox: Sandbox) -> None:
    sandbox.exchange.check_from_header = True
    sandbox.exchange.send_as[MAILBOX] = {"reception@contoso.example"}
    relay = await relays.start(scanner(relays.config(), send_as="sendas",
                                       allowed_from=["reception@contoso.example",
                                                     "lobby@contoso.example"]))
    address = relay.addresses["local"]
    code, _ = await asyncio.to_thread(send, address, message(sender="reception@contoso.example"),
                                      sender="reception@contoso.example", login=LOGIN)
    assert code == 250
    [got] = await sandbox.exchange.wait_for_messages(1)
    assert got.auth_user == MAILBOX and got.mail_from == MAILBOX
    assert "reception@contoso.example" in header_from(got.data)

    # No SendAs grant for lobby@: Exchange says 5.2.252; the bounce explains both fixes.
    code, _ = await asyncio.to_thread(send, address, message(sender="lobby@contoso.example"),
                                      sender="lobby@contoso.example", login=LOGIN)
    assert code == 250
    failed = Path(relay.config.spool.directory) / "failed"
    await wait_until(lambda: failed.exists() and any(failed.iterdir()))
    reasons = " ".join(p.read_text(errors="replace") for p in failed.rglob("*") if p.is_file())
    assert "5.2.252" in reasons
    for needle in ("accounts[].send_as", "accounts[].allowed_from", "Add-RecipientPermission",
                   "FullAccess"):
        assert needle in reasons


async def test_authenticate_as_sender_without_fullaccess_gets_535_explained(
        tmp_path: Path, password_hash: str) -> None:
    limited = dataclasses.replace(DEMO_APP, mailboxes=frozenset({MAILBOX}))
    async with Sandbox(tmp_path / "limited", apps=(limited,)) as box:
        factory = RelayFactory(box, tmp_path, password_hash)
        relay: Relay = await factory.start(scanner(factory.config(),
                                                   allowed_from=["ceo@contoso.example"]))
        try:
            code, _ = await asyncio.to_thread(
                send, relay.addresses["local"], message(sender="ceo@contoso.example"),
                sender="ceo@contoso.example", login=LOGIN)
            assert code == 250  # spooled; the upstream sign-in as ceo@ then fails
            await wait_until(lambda: box.exchange.auth_failures >= 1)
            assert "no FullAccess on mailbox ceo@contoso.example" in \
                box.exchange.auth_failure_reasons[0]

            def last_error() -> str:
                entries = relay.spool.entries()
                return entries[0].state.last_error if entries else ""

            await wait_until(lambda: "535" in last_error())
            assert "ceo@contoso.example" in last_error()
            assert "Fix:" in last_error()
        finally:
            await factory.stop(relay, timeout=1)
