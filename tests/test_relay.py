"""End to end: real SMTP clients → relay on port 0 → fake Exchange Online via fake Entra."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email import message_from_bytes
from email.policy import default as default_policy

import aiosmtplib
import pytest
from conftest import MAILBOX, PASSWORD, RelayFactory, TLSFiles, message, send, smtp_client

from relay.sandbox import Sandbox


def mail_from(address: tuple[str, int], sender: str) -> tuple[int, bytes]:
    """EHLO then MAIL FROM; the server's answer to MAIL."""
    with smtp_client(address) as client:
        client.ehlo("x")
        return client.mail(sender)


async def test_network_account_relays_and_rewrites_from(relays: RelayFactory,
                                                        sandbox: Sandbox) -> None:
    relay = await relays.start()
    code, reply = await asyncio.to_thread(send, relay.addresses["local"], message("net"))
    assert code == 250
    assert reply.startswith(b"2.0.0 Ok: queued as ")
    (got,) = await sandbox.exchange.wait_for_messages(1)
    assert got.auth_user == "printers@contoso.example"
    assert got.mail_from == "printers@contoso.example"
    assert got.rcpt_tos == ("someone@example.org",)
    parsed = message_from_bytes(got.data, policy=default_policy)
    assert parsed["From"].addresses[0].addr_spec == "printers@contoso.example"
    assert parsed["From"].addresses[0].display_name == "Device"
    assert parsed["Reply-To"].addresses[0].addr_spec == "device@printers.example"
    assert parsed["Received"].startswith("from device.test ([127.0.0.1])")


async def test_body_arrives_byte_identical(relays: RelayFactory, sandbox: Sandbox) -> None:
    body = (b"caf\xc3\xa9 8-bit line\r\n"
            b".leading dot\r\n"
            b"..two dots\r\n"
            + b"x" * 998 + b"\r\n"            # RFC 5322's limit; longer lines are folded
            + b"\xff\xfe raw bytes\r\n"
            b"last line\r\n")
    original = b"Subject: bytes\r\nMessage-ID: <b@x>\r\nFrom: <printers@contoso.example>\r\n\r\n"
    relay = await relays.start()
    host, port = relay.addresses["local"]
    async with aiosmtplib.SMTP(hostname=host, port=port) as client:
        await client.sendmail("printers@contoso.example", ["a@example.org"], original + body)
    (got,) = await sandbox.exchange.wait_for_messages(1)
    # Only headers are added (Received first, Date last); the rest is untouched.
    head, sent_body = got.data.split(b"\r\n\r\n", 1)
    assert sent_body == body
    assert original.removesuffix(b"\r\n\r\n") in head
    assert head.startswith(b"Received: from ")


async def test_message_id_added_when_missing(relays: RelayFactory, sandbox: Sandbox) -> None:
    relay = await relays.start()
    await asyncio.to_thread(send, relay.addresses["local"], b"Subject: no id\r\n\r\nbody\r\n")
    (got,) = await sandbox.exchange.wait_for_messages(1)
    parsed = message_from_bytes(got.data, policy=default_policy)
    assert parsed["Message-ID"].startswith("<") and parsed["Message-ID"].endswith(">")


async def test_client_outside_listener_networks_is_refused(relays: RelayFactory) -> None:
    data = relays.config()
    data["listeners"][0]["networks"] = ["192.0.2.0/24"]
    relay = await relays.start(data)
    with pytest.raises(smtplib.SMTPConnectError) as info:
        await asyncio.to_thread(smtplib.SMTP, *relay.addresses["local"], timeout=5)
    assert info.value.smtp_code == 554


async def test_unknown_client_cannot_relay(relays: RelayFactory, sandbox: Sandbox) -> None:
    data = relays.config()
    data["accounts"][1]["networks"] = ["192.0.2.0/24"]  # loopback no longer maps to an account
    relay = await relays.start(data)

    code, reply = await asyncio.to_thread(mail_from, relay.addresses["local"],
                                          "device@printers.example")
    assert code == 530
    assert b"5.7.0" in reply
    assert sandbox.exchange.messages == []


async def test_auth_not_offered_in_clear_by_default(relays: RelayFactory) -> None:
    relay = await relays.start()

    def attempt() -> tuple[bool, tuple[int, bytes]]:
        with smtp_client(relay.addresses["local"]) as client:
            client.ehlo("x")
            return client.has_extn("auth"), client.docmd("AUTH", "PLAIN AHNjYW5uZXIwMQBwdw==")

    offered, (code, _) = await asyncio.to_thread(attempt)
    assert not offered
    assert code == 538


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_in_clear_for_listed_networks(relays: RelayFactory, sandbox: Sandbox,
                                                 mechanism: str) -> None:
    data = relays.config()
    data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]
    relay = await relays.start(data)

    def attempt() -> tuple[int, bytes]:
        with smtp_client(relay.addresses["local"]) as client:
            client.ehlo("x")
            client.user, client.password = "scanner01", PASSWORD
            auth = client.auth_plain if mechanism == "PLAIN" else client.auth_login
            client.auth(mechanism, auth, initial_response_ok=mechanism == "PLAIN")
            client.mail("device@printers.example")
            client.rcpt("a@example.org")
            return client.data(message("auth"))

    code, _ = await asyncio.to_thread(attempt)
    assert code == 250
    (got,) = await sandbox.exchange.wait_for_messages(1)
    assert got.auth_user == MAILBOX  # the authenticated account's mailbox, not the network one


async def test_auth_login_challenges_have_no_nul(relays: RelayFactory) -> None:
    data = relays.config()
    data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]
    relay = await relays.start(data)

    def attempt() -> tuple[int, bytes]:
        with smtp_client(relay.addresses["local"]) as client:
            client.ehlo("x")
            return client.docmd("AUTH", "LOGIN")

    code, challenge = await asyncio.to_thread(attempt)
    assert code == 334
    assert challenge == b"VXNlcm5hbWU6"  # "Username:", not aiosmtpd's "User Name\0"


async def test_wrong_password_is_refused(relays: RelayFactory) -> None:
    data = relays.config()
    data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]
    relay = await relays.start(data)

    def attempt() -> None:
        with smtp_client(relay.addresses["local"]) as client:
            client.ehlo("x")
            client.login("scanner01", "wrong")

    with pytest.raises(smtplib.SMTPAuthenticationError) as info:
        await asyncio.to_thread(attempt)
    assert info.value.smtp_code == 535


async def test_starttls_then_auth(relays: RelayFactory, sandbox: Sandbox,
                                  tls_files: TLSFiles) -> None:
    data = relays.config()
    data["listeners"][0].update(tls="starttls", certificate=str(tls_files.cert),
                                private_key=str(tls_files.key), require_tls=True)
    relay = await relays.start(data)
    address = relay.addresses["local"]

    code, _ = await asyncio.to_thread(mail_from, address, "device@printers.example")
    assert code == 530  # require_tls: no mail in clear

    code, _ = await asyncio.to_thread(
        send, address, message("tls"), login=("scanner01", PASSWORD),
        starttls=tls_files.client_context())
    assert code == 250
    (got,) = await sandbox.exchange.wait_for_messages(1)
    assert b"with ESMTPSA" in got.data.split(b"\r\n", 1)[0]


async def test_implicit_tls_offers_auth(relays: RelayFactory, sandbox: Sandbox,
                                        tls_files: TLSFiles) -> None:
    data = relays.config()
    data["listeners"][0].update(tls="implicit", certificate=str(tls_files.cert),
                                private_key=str(tls_files.key))
    relay = await relays.start(data)
    port = relay.addresses["local"][1]
    async with aiosmtplib.SMTP(hostname="localhost", port=port, use_tls=True,
                               tls_context=tls_files.client_context()) as client:
        await client.ehlo()
        assert "plain" in client.server_auth_methods  # aiosmtpd alone would not offer AUTH
        await client.login("scanner01", PASSWORD)
        await client.sendmail(MAILBOX, ["a@example.org"], message("implicit", sender=MAILBOX))
    (got,) = await sandbox.exchange.wait_for_messages(1)
    assert got.auth_user == MAILBOX


async def test_enforce_rejects_other_senders(relays: RelayFactory, sandbox: Sandbox) -> None:
    data = relays.config()
    data["accounts"][1]["from"] = "enforce"
    relay = await relays.start(data)
    address = relay.addresses["local"]

    code, reply = await asyncio.to_thread(mail_from, address, "device@printers.example")
    assert code == 550
    assert b"5.7.1" in reply and b"printers@contoso.example" in reply

    code, reply = await asyncio.to_thread(send, address, message("hdr"),
                                          sender="printers@contoso.example")
    assert code == 550  # envelope fine, but the From: header is someone else
    assert b"From: header" in reply

    code, _ = await asyncio.to_thread(
        send, address, message("ok", sender="printers@contoso.example"),
        sender="printers@contoso.example")
    assert code == 250
    (got,) = await sandbox.exchange.wait_for_messages(1)
    assert b"Reply-To" not in got.data


async def test_swaks_message_arrives(relays: RelayFactory, sandbox: Sandbox) -> None:
    relay = await relays.start()
    host, port = relay.addresses["local"]
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", f"{host}:{port}", "--from", "device@printers.example",
        "--to", "someone@example.org", "--header", "Subject: via swaks",
        "--body", "line one\n.dot line\nline three", "--helo", "swaks.test",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode()
    (got,) = await sandbox.exchange.wait_for_messages(1)
    parsed = message_from_bytes(got.data, policy=default_policy)
    assert parsed["Subject"] == "via swaks"
    body = got.data.split(b"\r\n\r\n", 1)[1]
    assert body.startswith(b"line one\r\n.dot line\r\nline three\r\n")


async def test_one_token_for_many_messages(relays: RelayFactory, sandbox: Sandbox) -> None:
    relay = await relays.start()
    host, port = relay.addresses["local"]

    async def client(n: int) -> None:
        async with aiosmtplib.SMTP(hostname=host, port=port) as smtp:
            for i in range(10):
                await smtp.sendmail("device@printers.example", ["a@example.org"],
                                    message(f"m{n}-{i}"))

    await asyncio.gather(*(client(n) for n in range(10)))
    got = await sandbox.exchange.wait_for_messages(100, timeout=60)
    assert len(got) == 100
    assert sandbox.entra.token_request_count == 1
    # Connections are reused: at most 3 per mailbox (Exchange's limit), not one per message.
    assert sandbox.exchange.connections <= 3


async def test_too_many_recipients(relays: RelayFactory) -> None:
    data = relays.config()
    data["listeners"][0]["max_recipients"] = 2
    relay = await relays.start(data)

    def attempt() -> tuple[int, bytes]:
        with smtp_client(relay.addresses["local"]) as client:
            client.ehlo("x")
            client.mail("device@printers.example")
            client.rcpt("a@example.org")
            client.rcpt("b@example.org")
            return client.rcpt("c@example.org")

    code, reply = await asyncio.to_thread(attempt)
    assert (code, reply[:5]) == (452, b"4.5.3")


async def test_addresses_the_parser_trips_on_are_malformed(relays: RelayFactory) -> None:
    """The stdlib header parser raises IndexError/AttributeError on these; aiosmtpd answered
    "500 Error: (IndexError) ...". They are malformed addresses."""
    relay = await relays.start()

    def attempt() -> list[tuple[int, bytes]]:
        with smtp_client(relay.addresses["local"]) as client:
            client.ehlo("x")
            replies = [client.docmd(f"MAIL FROM:{arg}") for arg in ("a@", "<a@[>", '"')]
            replies.append(client.docmd("MAIL FROM:<device@printers.example> SIZE=10"))
            replies.append(client.docmd("RCPT TO:a@["))
            return replies

    replies = await asyncio.to_thread(attempt)
    assert [code for code, _ in replies] == [553, 553, 553, 250, 553]


def test_tls_context_never_skips_verification() -> None:
    from relay.config.records import parse
    from relay.upstream.smtp import tls_context

    config = parse({
        "listeners": [{"name": "x"}],
        "apps": {"a": {"tenant": "t", "client_id": "11111111-2222-3333-4444-555555555555",
                       "client_secret": "s"}},
        "accounts": [{"name": "n", "networks": ["127.0.0.1"], "app": "a", "mailbox": "a@b.cd"}],
        "spool": {"directory": "/tmp/x"},
    })
    context = tls_context(config.apps["a"])
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
