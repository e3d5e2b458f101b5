"""Protocol safety: SMTP smuggling both ways, STARTTLS injection, long lines, open relay, size.

Everything is sent raw over a socket to the real relay, and checked on the fake Exchange's
wire (``record_wire``) or in the spool, not in helper functions.
"""

from __future__ import annotations

import asyncio
import base64
import re
from email import message_from_bytes
from email.policy import default as default_policy

import aiosmtplib
import pytest
from conftest import PASSWORD, RelayFactory, TLSFiles, wait_until
from rawsmtp import RawSMTP

from relay.sandbox import Sandbox
from relay.service.lifecycle import Relay

# Published end-of-data confusions (SEC Consult 2023, Postfix/Sendmail/Exchange advisories).
SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n",
             b"\r\n\x00.\r\n", b"\r\n.\r\r\n", b"\r\r\n.\r\r\n", b"\r\n.\x00\r\n"]
SMUGGLED = (b"MAIL FROM:<admin@contoso.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
            b"From: <admin@contoso.example>\r\nSubject: smuggled\r\n\r\nevil\r\n")
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as (\w+)")


def check_wire(wire: bytes | None, data: bytes) -> None:
    """What went to Exchange: CRLF only, one final dot, every leading dot doubled."""
    assert wire is not None
    assert BARE.search(wire) is None
    assert wire.endswith(b"\r\n.\r\n")
    assert wire.count(b"\r\n.\r\n") == 1
    lines = wire[:-3].split(b"\r\n")[:-1]
    assert all(len(line) <= 999 for line in lines)  # 998 plus a stuffing dot
    unstuffed = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n"
                         for line in lines)
    assert unstuffed == data


async def test_smuggling_variants_stay_inside_one_message(relays: RelayFactory,
                                                          sandbox: Sandbox) -> None:
    sandbox.exchange.record_wire = True
    relay = await relays.start()
    for n, variant in enumerate(SMUGGLING):
        async with await RawSMTP.connect(relay.addresses["local"]) as client:
            assert (await client.reply()).startswith("220")
            await client.transaction()
            await client.send(b"Subject: probe %d\r\n\r\nbefore" % n + variant + SMUGGLED
                              + b"\r\n.\r\n")
            assert QUEUED.match(await client.reply()), variant
            # Had the variant ended the message, the smuggled MAIL, RCPT and DATA would have
            # been answered before this NOOP.
            assert (await client.command("NOOP")) == "250 OK\r\n", variant
            assert (await client.command("QUIT")).startswith("221")
    got = await sandbox.exchange.wait_for_messages(len(SMUGGLING))
    await wait_until(lambda: not relay.spool.entries())  # everything queued was delivered
    assert len(sandbox.exchange.messages) == len(SMUGGLING)
    for message in got:
        assert message.rcpt_tos == ("someone@example.org",)
        assert message.mail_from == "printers@contoso.example"
        assert b"MAIL FROM:<admin@contoso.example>" in message.data
        assert BARE.search(message.data) is None
        check_wire(message.wire, message.data)


async def test_bare_line_endings_are_crlf_in_the_spool(relays: RelayFactory,
                                                       sandbox: Sandbox) -> None:
    # Keep the messages queued, to look at exactly what was spooled.
    sandbox.exchange.inject("connect", "421 4.3.2 Service not available", times=1000)
    relay = await relays.start()
    bodies = {
        b"one\ntwo\rthree\r\n": b"one\r\ntwo\r\nthree\r\n",
        # Lines are dot-unstuffed whatever ends them, as Postfix does for bare LF.
        b"a\n..b\r\n.\rc\r\n": b"a\r\n.b\r\n\r\nc\r\n",
        b"x\r\n.\r\r\ny\r\n": b"x\r\n\r\n\r\ny\r\n",
        # A bare-LF device sending more than max_line_length in all: still just lines.
        b"line\n" * 20000 + b"end\r\n": b"line\r\n" * 20000 + b"end\r\n",
    }
    async with await RawSMTP.connect(relay.addresses["local"]) as client:
        assert (await client.reply()).startswith("220")
        for sent, spooled in bodies.items():
            await client.transaction()
            await client.send(b"Subject: bare\n\n" + sent + b".\r\n")
            match = QUEUED.match(await client.reply())
            assert match
            data = await asyncio.to_thread(relay.spool.read, match.group(1))
            assert BARE.search(data) is None
            head, body = data.split(b"\r\n\r\n", 1)
            assert b"Subject: bare" in head  # the headers were found, so were rewritten
            assert body == spooled


async def test_bare_line_endings_can_be_refused(relays: RelayFactory, sandbox: Sandbox) -> None:
    data = relays.config()
    data["listeners"][0]["bare_line_endings"] = "reject"
    relay = await relays.start(data)
    async with await RawSMTP.connect(relay.addresses["local"]) as client:
        assert (await client.reply()).startswith("220")
        for variant in (b"\n.\n", b"\r.\r\n", b"\r\n.\r"):
            await client.transaction()
            await client.send(b"Subject: x\r\n\r\nbefore" + variant + b"after\r\n.\r\n")
            reply = await client.reply()
            assert reply.startswith("550 5.5.2 ")
            assert "bare_line_endings" in reply
        await client.transaction()
        await client.send(b"Subject: clean\r\n\r\nfine\r\n.\r\n")
        assert QUEUED.match(await client.reply())
    (got,) = await sandbox.exchange.wait_for_messages(1)
    assert b"Subject: clean" in got.data


async def test_starttls_pipelined_commands_are_discarded(relays: RelayFactory, sandbox: Sandbox,
                                                         tls_files: TLSFiles) -> None:
    data = relays.config()
    data["listeners"][0].update(tls="starttls", certificate=str(tls_files.cert),
                                private_key=str(tls_files.key))
    relay = await relays.start(data)
    async with await RawSMTP.connect(relay.addresses["local"]) as client:
        assert (await client.reply()).startswith("220")
        assert "STARTTLS" in await client.command("EHLO device.test")
        # One write: a man in the middle appends commands to run inside the TLS session.
        await client.send(b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\n"
                          b"RCPT TO:<victim@example.org>\r\n")
        assert (await client.reply()).startswith("220")
        await client.starttls(tls_files.client_context(), "localhost")
        ehlo = await client.command("EHLO device.test")
        assert ehlo.startswith("250-")  # the first reply over TLS is EHLO's
        # Only the mechanisms there are (aiosmtpd took RelayHandler.auth_failures for one).
        assert "250-AUTH LOGIN PLAIN\r\n" in ehlo
        assert (await client.command("RCPT TO:<x@example.org>")).startswith("503")
        assert (await client.command("DATA")).startswith("503")
    assert sandbox.exchange.messages == []


async def test_long_lines_are_folded_for_upstream(relays: RelayFactory, sandbox: Sandbox) -> None:
    sandbox.exchange.record_wire = True
    relay = await relays.start()
    subject = " ".join(f"word{i}" for i in range(300))  # ~2,400 octets
    solid = b"x" * 5000
    spaced = b" ".join(b"<td>cell %d</td>" % i for i in range(250))  # HTML on one line
    accents = "é".encode() * 1500  # 3,000 octets of two-byte characters
    body = solid + b"\r\n" + spaced + b"\r\n" + accents + b"\r\n.starts with a dot\r\n"
    original = (f"Subject: {subject}\r\nFrom: <printers@contoso.example>\r\n\r\n".encode()
                + body)
    host, port = relay.addresses["local"]
    async with aiosmtplib.SMTP(hostname=host, port=port) as client:
        await client.sendmail("printers@contoso.example", ["a@example.org"], original)
    (got,) = await sandbox.exchange.wait_for_messages(1)
    check_wire(got.wire, got.data)
    assert max(len(line) for line in got.data.split(b"\r\n")) <= 998
    parsed = message_from_bytes(got.data, policy=default_policy)
    assert parsed["Subject"] == subject  # folded at white space: the value is unchanged
    sent_body = got.data.split(b"\r\n\r\n", 1)[1]
    first, rest = sent_body.split(b"\r\n", 1)
    assert first == solid[:998]
    solid_part, rest = sent_body.split(b"\r\n<td>", 1)
    assert solid_part.replace(b"\r\n ", b"") == solid  # no white space: CRLF SPACE inserted
    spaced_part, rest = (b"<td>" + rest).split(b"\r\n\xc3", 1)
    assert spaced_part.replace(b"\r\n", b"") == spaced  # broken before existing spaces
    accents_part, tail = (b"\xc3" + rest).split(b"\r\n.", 1)
    for line in accents_part.split(b"\r\n"):
        line.decode("utf-8")  # never cut inside a character
    assert accents_part.replace(b"\r\n ", b"") == accents
    assert tail == b"starts with a dot\r\n"


async def test_line_beyond_max_line_length_is_refused_clearly(relays: RelayFactory,
                                                              sandbox: Sandbox) -> None:
    data = relays.config()
    data["listeners"][0]["max_line_length"] = 2000
    relay = await relays.start(data)
    async with await RawSMTP.connect(relay.addresses["local"]) as client:
        assert (await client.reply()).startswith("220")
        await client.transaction()
        await client.send(b"Subject: long\r\n\r\n" + b"y" * 2001 + b"\r\nmore\r\n.\r\n")
        assert (await client.reply()) == ("500 5.5.2 Line too long (limit 2000 bytes; raise "
                                          "listeners[].max_line_length)\r\n")
        await client.transaction()  # the session goes on
        await client.send(b"Subject: at the limit\r\n\r\n" + b"y" * 2000 + b"\r\n.\r\n")
        assert QUEUED.match(await client.reply())
    (got,) = await sandbox.exchange.wait_for_messages(1)
    assert got.data.split(b"\r\n\r\n", 1)[1].replace(b"\r\n ", b"") == b"y" * 2000 + b"\r\n"


async def test_size_limit_has_an_enhanced_code(relays: RelayFactory) -> None:
    data = relays.config()
    data["listeners"][0]["max_message_size"] = 10_000
    relay = await relays.start(data)
    async with await RawSMTP.connect(relay.addresses["local"]) as client:
        assert (await client.reply()).startswith("220")
        assert "SIZE 10000" in await client.command("EHLO device.test")
        reply = await client.command("MAIL FROM:<d@printers.example> SIZE=20000")
        assert reply.startswith("552 5.3.4 ") and "max_message_size" in reply
        await client.transaction()
        await client.send(b"Subject: big\r\n\r\n" + (b"z" * 100 + b"\r\n") * 200 + b".\r\n")
        reply = await client.reply()
        assert reply.startswith("552 5.3.4 ") and "limit 10000 bytes" in reply
        assert (await client.command("NOOP")).startswith("250")
        assert relay.spool.entries() == []


# -- open relay ------------------------------------------------------------------------------

RECIPIENTS = {  # as sent in RCPT TO: -> what Exchange Online must be asked for
    "<someone@example.org>": "someone@example.org",
    "<user%other.example@example.org>": "user%other.example@example.org",  # not interpreted
    "<other.example!user@example.org>": "other.example!user@example.org",  # not interpreted
    "<@relay1.example,@relay2.example:user@example.org>": "user@example.org",  # route dropped
    '<"a@b.example"@example.org>': '"a@b.example"@example.org',  # domain is example.org
}


async def _attempt(relay: Relay, source: str, login: str | None, subject: str
                   ) -> tuple[str, list[str], str]:
    async with await RawSMTP.connect(relay.addresses["local"], source=source) as client:
        assert (await client.reply()).startswith("220")
        assert (await client.command("EHLO device.test")).startswith("250")
        if login is not None:
            blob = base64.b64encode(f"\0scanner01\0{login}".encode()).decode()
            await client.command(f"AUTH PLAIN {blob}")
        mail = await client.command("MAIL FROM:<device@printers.example>")
        rcpts = [await client.command(f"RCPT TO:{rcpt}") for rcpt in RECIPIENTS]
        data = await client.command("DATA")
        if data.startswith("354"):
            await client.send(f"Subject: {subject}\r\n\r\nhi\r\n.\r\n".encode())
            data = await client.reply()
        return mail, rcpts, data


@pytest.mark.parametrize("network", ["trusted", "unknown"])
@pytest.mark.parametrize("login", [None, "wrong password", PASSWORD])
async def test_nothing_relays_outside_policy(relays: RelayFactory, sandbox: Sandbox,
                                             network: str, login: str | None) -> None:
    data = relays.config()
    data["listeners"][0]["networks"] = ["127.0.0.0/8"]
    data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]
    data["accounts"][1]["networks"] = ["127.0.0.2/32"]  # the trusted device
    relay = await relays.start(data)
    source = "127.0.0.2" if network == "trusted" else "127.0.0.3"
    mail, rcpts, reply = await _attempt(relay, source, login, f"{network} {login}")
    if network == "trusted" or login == PASSWORD:
        assert mail.startswith("250") and all(r.startswith("250") for r in rcpts)
        assert QUEUED.match(reply)
        (got,) = await sandbox.exchange.wait_for_messages(1)
        assert got.rcpt_tos == tuple(RECIPIENTS.values())
    else:
        assert mail.startswith("530 5.7.0")
        assert all(r.startswith("503") for r in rcpts)
        assert reply.startswith("503")
        assert relay.spool.entries() == []
        assert sandbox.exchange.messages == []
