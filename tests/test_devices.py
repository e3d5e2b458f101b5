"""Device quirks (issue 14, item 5), each as a raw transcript against a real listener on port 0.

Bytes on a real socket, as printers, scanners and old applications send them; the message must
then arrive at the sandbox's Exchange Online. Where the strict answer would lose a device's
mail, the relay accepts what Postfix accepts (README, "Device behaviours").
"""

from __future__ import annotations

import asyncio
import base64
import socket
from email import message_from_bytes
from typing import Any

import pytest
from conftest import MAILBOX, PASSWORD, RelayFactory, TLSFiles, wait_until
from rawsmtp import RawSMTP

from relay.sandbox import Sandbox
from relay.service.lifecycle import Relay

USER = "scanner01"
BODY = b"Subject: scan\r\nFrom: <scanner@contoso.example>\r\n\r\nScan attached.\r\n"


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def plain_blob(user: str = USER, password: str = PASSWORD) -> str:
    return b64(f"\0{user}\0{password}")


def auth_config(relays: RelayFactory, **account: Any) -> dict[str, Any]:
    data = relays.config()
    data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]
    data["accounts"][0].update(account)
    return data


async def opened(relay: Relay, listener: str = "local") -> RawSMTP:
    client = await RawSMTP.connect(relay.addresses[listener])
    assert (await client.reply()).startswith("220")
    return client


async def send_body(client: RawSMTP, body: bytes = BODY) -> str:
    """DATA content and the final dot; the reply."""
    await client.send(body + b".\r\n")
    return await client.reply()


async def arrived(sandbox: Sandbox, n: int = 1) -> list[Any]:
    return await sandbox.exchange.wait_for_messages(n, timeout=15)


# -- greetings --------------------------------------------------------------------------------


async def test_helo_only_client(relays: RelayFactory, sandbox: Sandbox) -> None:
    relay = await relays.start()
    async with await opened(relay) as client:
        assert (await client.command("HELO old-printer")).startswith("250")
        assert (await client.command("MAIL FROM:<device@printers.example>")).startswith("250")
        assert (await client.command("RCPT TO:<someone@example.org>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        assert (await send_body(client)).startswith("250 2.0.0")
    [got] = await arrived(sandbox)
    assert b"from old-printer ([127.0.0.1])" in got.data and b"with SMTP;" in got.data


async def test_mail_without_any_helo(relays: RelayFactory, sandbox: Sandbox) -> None:
    # Postfix: smtpd_helo_required = no. aiosmtpd answered "503 Error: send HELO first".
    relay = await relays.start()
    async with await opened(relay) as client:
        assert (await client.command("MAIL FROM:<device@printers.example>")).startswith("250")
        assert (await client.command("RCPT TO:<someone@example.org>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        assert (await send_body(client)).startswith("250 2.0.0")
    [got] = await arrived(sandbox)
    assert b"from unknown ([127.0.0.1])" in got.data


async def test_ehlo_twice_and_again_after_auth(relays: RelayFactory, sandbox: Sandbox) -> None:
    relay = await relays.start(auth_config(relays))
    async with await opened(relay) as client:
        assert (await client.command("EHLO scanner")).startswith("250")
        assert (await client.command("EHLO scanner")).startswith("250")
        assert (await client.command(f"AUTH PLAIN {plain_blob()}")).startswith("235")
        again = await client.command("EHLO scanner")
        assert again.startswith("250")
        # Still logged in (RFC 4954: the session stays authenticated), so MAIL is accepted.
        assert (await client.command("MAIL FROM:<device@printers.example>")).startswith("250")
        assert (await client.command("RCPT TO:<someone@example.org>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        assert (await send_body(client)).startswith("250 2.0.0")
    [got] = await arrived(sandbox)
    assert got.auth_user == MAILBOX  # as the logged-in account, not the network's


@pytest.fixture
def tls_listener(relays: RelayFactory, tls_files: TLSFiles) -> dict[str, Any]:
    data = relays.config()
    data["listeners"] = [{"name": "submission", "bind": "127.0.0.1:0", "tls": "starttls",
                          "certificate": str(tls_files.cert),
                          "private_key": str(tls_files.key)}]
    return data


async def test_no_ehlo_again_after_starttls(relays: RelayFactory, sandbox: Sandbox,
                                            tls_listener: dict[str, Any],
                                            tls_files: TLSFiles) -> None:
    # RFC 3207 says the client must EHLO again; firmware that does not still gets its mail
    # through Postfix (no HELO required), so here too: AUTH and MAIL right after the handshake.
    relay = await relays.start(tls_listener)
    async with await opened(relay, "submission") as client:
        assert "STARTTLS" in await client.command("EHLO scanner")
        assert (await client.command("STARTTLS")).startswith("220")
        await client.starttls(tls_files.client_context(), server_hostname="localhost")
        assert (await client.command(f"AUTH PLAIN {plain_blob()}")).startswith("235")
        assert (await client.command("MAIL FROM:<device@printers.example>")).startswith("250")
        assert (await client.command("RCPT TO:<someone@example.org>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        assert (await send_body(client)).startswith("250 2.0.0")
    [got] = await arrived(sandbox)
    assert got.auth_user == MAILBOX
    assert b"with ESMTPSA;" in got.data  # TLS and authenticated, said by Received


# -- AUTH -------------------------------------------------------------------------------------


async def test_auth_login_prompts_are_username_and_password(relays: RelayFactory) -> None:
    # aiosmtpd 1.4.6 prompts "User Name\0"; a Xerox quits on it. Exactly RFC-draft LOGIN's.
    relay = await relays.start(auth_config(relays))
    async with await opened(relay) as client:
        await client.command("EHLO xerox")
        first = await client.command("AUTH LOGIN")
        assert first == f"334 {b64('Username:')}\r\n"
        assert base64.b64decode(first[4:]) == b"Username:"  # no NUL
        assert await client.command(b64(USER)) == f"334 {b64('Password:')}\r\n"
        assert (await client.command(b64(PASSWORD))).startswith("235 2.7.0")


async def test_auth_login_with_initial_response(relays: RelayFactory) -> None:
    relay = await relays.start(auth_config(relays))
    async with await opened(relay) as client:
        await client.command("EHLO device")
        assert await client.command(f"AUTH LOGIN {b64(USER)}") == f"334 {b64('Password:')}\r\n"
        assert (await client.command(b64(PASSWORD))).startswith("235")


async def test_auth_plain_on_the_next_line(relays: RelayFactory) -> None:
    relay = await relays.start(auth_config(relays))
    async with await opened(relay) as client:
        await client.command("EHLO device")
        assert await client.command("AUTH PLAIN") == "334 \r\n"
        assert (await client.command(plain_blob())).startswith("235")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_with_empty_initial_response(relays: RelayFactory, mechanism: str) -> None:
    # RFC 4954: "=" is a zero-length initial response. Clients that send it mean "nothing
    # yet": the relay asks, as for no initial response, instead of "501 Can't decode base64".
    relay = await relays.start(auth_config(relays))
    async with await opened(relay) as client:
        await client.command("EHLO device")
        if mechanism == "PLAIN":
            assert await client.command("AUTH PLAIN =") == "334 \r\n"
            assert (await client.command(plain_blob())).startswith("235")
        else:
            assert await client.command("AUTH LOGIN =") == f"334 {b64('Username:')}\r\n"
            assert (await client.command(b64(USER))).startswith("334")
            assert (await client.command(b64(PASSWORD))).startswith("235")


async def test_rset_after_failed_auth_then_login(relays: RelayFactory,
                                                 sandbox: Sandbox) -> None:
    relay = await relays.start(auth_config(relays))
    async with await opened(relay) as client:
        await client.command("EHLO device")
        assert (await client.command(f"AUTH PLAIN {plain_blob(password='old')}")).startswith("535")
        assert (await client.command("RSET")).startswith("250")
        assert (await client.command(f"AUTH PLAIN {plain_blob()}")).startswith("235")
        assert (await client.command("MAIL FROM:<device@printers.example>")).startswith("250")
        assert (await client.command("RCPT TO:<someone@example.org>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        assert (await send_body(client)).startswith("250")
    await arrived(sandbox)


async def test_auth_cancelled_with_star(relays: RelayFactory) -> None:
    relay = await relays.start(auth_config(relays))
    async with await opened(relay) as client:
        await client.command("EHLO device")
        assert (await client.command("AUTH LOGIN")).startswith("334")
        assert (await client.command("*")).startswith("501")  # RFC 4954 4: cancelled
        assert (await client.command(f"AUTH PLAIN {plain_blob()}")).startswith("235")


# -- commands ---------------------------------------------------------------------------------


async def test_lower_case_commands_and_a_space_after_the_colon(relays: RelayFactory,
                                                               sandbox: Sandbox) -> None:
    relay = await relays.start(auth_config(relays))
    async with await opened(relay) as client:
        assert (await client.command("ehlo device")).startswith("250")
        assert (await client.command(f"auth plain {plain_blob()}")).startswith("235")
        assert (await client.command("mail from: <device@printers.example>")).startswith("250")
        assert (await client.command("rcpt to: <someone@example.org>")).startswith("250")
        assert (await client.command("data")).startswith("354")
        assert (await send_body(client)).startswith("250")
        assert (await client.command("quit")).startswith("221")
    [got] = await arrived(sandbox)
    assert got.rcpt_tos == ("someone@example.org",)


async def test_commands_and_content_with_bare_lf(relays: RelayFactory, sandbox: Sandbox) -> None:
    relay = await relays.start()
    async with await opened(relay) as client:
        for line, code in ((b"EHLO device\n", "250"), (b"MAIL FROM:<d@printers.example>\n", "250"),
                           (b"RCPT TO:<someone@example.org>\n", "250"), (b"DATA\n", "354")):
            await client.send(line)
            assert (await client.reply()).startswith(code)
        # Only <CR><LF>.<CR><LF> ends the message, as in Postfix 3.9 (smtpd_forbid_bare_newline
        # = normalize: a bare "\n.\n" inside is content; SMTP smuggling), lines inside may end
        # in a bare LF.
        await client.send(b"Subject: lf\nFrom: <d@printers.example>\n\nbody\n.\nmore\r\n.\r\n")
        assert (await client.reply()).startswith("250")
    [got] = await arrived(sandbox)  # one message: the bare "\n.\n" did not end it
    assert got.data.endswith(b"\r\n\r\nbody\r\n\r\nmore\r\n")  # CRLF; "." unstuffed


@pytest.mark.parametrize(("params", "code"), [
    ("SIZE=2048", "250"), ("size=2048", "250"), ("SIZE=2048 BODY=8BITMIME", "250"),
    ("BODY=7BIT", "250"), ("AUTH=<>", "250"), ("AUTH=<device@printers.example>", "250"),
    ("SIZE=999999999999", "552 5.3.4"), ("SIZE=abc", "501"),
])
async def test_mail_parameters(relays: RelayFactory, params: str, code: str) -> None:
    # AUTH= (RFC 4954 5) is sent by clients that logged in, and by some that did not.
    relay = await relays.start()
    async with await opened(relay) as client:
        await client.command("EHLO device")
        reply = await client.command(f"MAIL FROM:<device@printers.example> {params}")
        assert reply.startswith(code), reply


@pytest.mark.parametrize("policy", ["rewrite", "enforce"])
async def test_null_sender(relays: RelayFactory, sandbox: Sandbox, policy: str) -> None:
    # Devices send their own notifications (job reports, fax confirmations) from <>. With
    # from: enforce the From header still decides, after DATA.
    relay = await relays.start(auth_config(relays, **{"from": policy}))
    async with await opened(relay) as client:
        await client.command("EHLO device")
        assert (await client.command(f"AUTH PLAIN {plain_blob()}")).startswith("235")
        assert (await client.command("MAIL FROM:<>")).startswith("250")
        assert (await client.command("RCPT TO:<someone@example.org>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        body = BODY.replace(b"<scanner@contoso.example>", f"<{MAILBOX}>".encode())
        assert (await send_body(client, body)).startswith("250")
    [got] = await arrived(sandbox)
    assert got.mail_from == MAILBOX  # Exchange gets the mailbox as the envelope sender


async def test_null_sender_with_a_foreign_from_header_is_still_refused_by_enforce(
        relays: RelayFactory) -> None:
    relay = await relays.start(auth_config(relays, **{"from": "enforce"}))
    async with await opened(relay) as client:
        await client.command("EHLO device")
        await client.command(f"AUTH PLAIN {plain_blob()}")
        assert (await client.command("MAIL FROM:<>")).startswith("250")
        assert (await client.command("RCPT TO:<someone@example.org>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        body = BODY.replace(b"<scanner@contoso.example>", b"<ceo@elsewhere.example>")
        assert (await send_body(client, body)).startswith("550 5.7.1 From: header")


# -- content ------------------------------------------------------------------------------------


async def test_8bit_headers_without_body_8bitmime(relays: RelayFactory,
                                                  sandbox: Sandbox) -> None:
    relay = await relays.start()
    subject = "Scan vom Drucker: Büro 2. Stock, Größe A4".encode()
    latin1 = "Numérisé".encode("latin-1")
    async with await opened(relay) as client:
        await client.command("EHLO device")
        assert (await client.command("MAIL FROM:<device@printers.example>")).startswith("250")
        assert (await client.command("RCPT TO:<someone@example.org>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        body = (b"Subject: " + subject + b"\r\nX-Job: " + latin1 +
                b"\r\nFrom: <device@printers.example>\r\n\r\nk\xc3\xb6rper\r\n")
        assert (await send_body(client, body)).startswith("250")
    [got] = await arrived(sandbox)
    assert b"Subject: " + subject + b"\r\n" in got.data
    assert b"X-Job: " + latin1 + b"\r\n" in got.data and b"k\xc3\xb6rper" in got.data


async def test_no_date_and_no_message_id_are_added(relays: RelayFactory,
                                                   sandbox: Sandbox) -> None:
    relay = await relays.start()
    async with await opened(relay) as client:
        await client.command("HELO device")
        await client.command("MAIL FROM:<device@printers.example>")
        await client.command("RCPT TO:<someone@example.org>")
        assert (await client.command("DATA")).startswith("354")
        assert (await send_body(client, b"Subject: bare\r\n\r\nno date\r\n")).startswith("250")
    [got] = await arrived(sandbox)
    parsed = message_from_bytes(got.data)
    assert parsed["Date"] and parsed["Message-ID"]
    assert str(parsed["Message-ID"]).startswith("<") and str(parsed["Message-ID"]).endswith(">")


# -- the end of a session -----------------------------------------------------------------------


async def test_hang_up_right_after_the_final_dot(relays: RelayFactory,
                                                 sandbox: Sandbox) -> None:
    # The whole message arrived, so it is the relay's to deliver (Postfix too): firmware that
    # closes without reading the 250 counts the scan as sent.
    relay = await relays.start()
    address = relay.addresses["local"]

    def dot_and_hang_up(n: int) -> None:
        with socket.create_connection(address, timeout=10) as sock:
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"220")
            sock.sendall(b"HELO printer\r\n")
            assert reader.readline().startswith(b"250")
            for line in (b"MAIL FROM:<device@printers.example>", b"RCPT TO:<someone@example.org>",
                         b"DATA"):
                sock.sendall(line + b"\r\n")
                reader.readline()
            sock.sendall(BODY.replace(b"scan", f"scan {n}".encode()) + b".\r\n")
            sock.shutdown(socket.SHUT_WR)  # EOF at once: the relay sees it with the dot
        # (and the socket closes without reading the reply)

    for n in range(3):
        await asyncio.to_thread(dot_and_hang_up, n)
    got = await arrived(sandbox, 3)
    assert sorted(message_from_bytes(m.data)["Subject"] for m in got) == [
        "scan 0", "scan 1", "scan 2"]
    await asyncio.sleep(0)  # (nothing more may come: each message exactly once)
    assert len(sandbox.exchange.messages) == 3


async def test_quit_pipelined_right_after_the_dot(relays: RelayFactory,
                                                  sandbox: Sandbox) -> None:
    relay = await relays.start()
    async with await opened(relay) as client:
        await client.command("HELO device")
        # MAIL, RCPT, DATA, the message and QUIT in one write, as a client that does not
        # wait (PIPELINING is not offered, and some send it all anyway).
        await client.send(b"MAIL FROM:<device@printers.example>\r\nRCPT TO:<someone@example.org>"
                          b"\r\nDATA\r\n" + BODY + b".\r\nQUIT\r\n")
        replies = [await client.reply() for _ in range(5)]
        assert [r[:3] for r in replies] == ["250", "250", "354", "250", "221"], replies
        assert await client.closed()
    await arrived(sandbox)


async def test_quit_without_waiting_then_hang_up(relays: RelayFactory,
                                                 sandbox: Sandbox) -> None:
    relay = await relays.start()
    address = relay.addresses["local"]

    def fire_and_forget() -> None:
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(b"HELO device\r\nMAIL FROM:<device@printers.example>\r\n"
                         b"RCPT TO:<someone@example.org>\r\nDATA\r\n" + BODY + b".\r\nQUIT\r\n")
            sock.shutdown(socket.SHUT_WR)

    await asyncio.to_thread(fire_and_forget)
    await arrived(sandbox)



async def test_hang_up_in_the_middle_of_the_message(relays: RelayFactory,
                                                    sandbox: Sandbox) -> None:
    relay = await relays.start()
    address = relay.addresses["local"]

    def cut_short() -> None:
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(b"HELO device\r\nMAIL FROM:<device@printers.example>\r\n"
                         b"RCPT TO:<someone@example.org>\r\nDATA\r\n"
                         b"Subject: cut short\r\n\r\nhalf a scan\r\n")
            sock.shutdown(socket.SHUT_WR)

    await asyncio.to_thread(cut_short)
    async with await opened(relay) as client:  # then a whole one, on a new connection
        await client.command("HELO device")
        await client.command("MAIL FROM:<device@printers.example>")
        await client.command("RCPT TO:<someone@example.org>")
        assert (await client.command("DATA")).startswith("354")
        assert (await send_body(client)).startswith("250")
    await arrived(sandbox)
    queue = relay.config.spool.directory / "queue"
    await wait_until(lambda: not any(queue.iterdir()))  # all the relay took is delivered
    [got] = sandbox.exchange.messages
    assert message_from_bytes(got.data)["Subject"] == "scan"
