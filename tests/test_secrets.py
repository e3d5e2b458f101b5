"""No secret reaches a log line, a traceback or the spool, with every logger at DEBUG.

The relay runs in-process with a capturing handler on the root logger and aiosmtpd
("mail.log"), aiosmtplib, msal and urllib3 all at DEBUG, as an admin chasing a problem would
set them. Devices log in with AUTH PLAIN and LOGIN in every form (initial response or not, a
wrong password, a password sent without base64, a base64 password sent as a stray command);
the relay logs in upstream with XOAUTH2, gets a 535, and a second app's token request fails
for a wrong client secret. Then nothing secret may appear anywhere.
"""

from __future__ import annotations

import asyncio
import logging
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MAILBOX, PASSWORD, RelayFactory, message, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import logsafe
from relay.sandbox import DEMO_APP, Sandbox

WRONG_PASSWORD = "Tr0ub4dor&3 not the password"
WRONG_SECRET = "wrong-client-secret-Q8~abcdefghijklmnop"
LIBRARY_LOGGERS = ("mail.log", "aiosmtplib", "msal", "urllib3", "asyncio", "m365relay")


def b64(data: bytes | str) -> str:
    return b64encode(data.encode() if isinstance(data, str) else data).decode()


def plain_blob(user: str, password: str) -> str:
    return b64(f"\0{user}\0{password}")


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def all_logs() -> Iterator[Capture]:
    capture = Capture()
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    saved_root = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(saved_root)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


class Session:
    """A raw SMTP client, so each AUTH form is sent exactly as written here."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, address: tuple[str, int]) -> Session:
        session = cls(*await asyncio.open_connection(*address))
        assert (await session.reply()).startswith("220")
        assert (await session.cmd("EHLO device.test")).startswith("250")
        return session

    async def reply(self) -> str:
        lines = []
        async with asyncio.timeout(10):
            while True:
                line = (await self.reader.readline()).decode()
                lines.append(line)
                if line[3:4] != "-":
                    return "".join(lines)

    async def cmd(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply()

    async def send_mail(self, subject: str) -> None:
        assert (await self.cmd(f"MAIL FROM:<{MAILBOX}>")).startswith("250")
        assert (await self.cmd("RCPT TO:<someone@example.org>")).startswith("250")
        assert (await self.cmd("DATA")).startswith("354")
        self.writer.write(message(subject) + b"\r\n.\r\n")
        assert (await self.reply()).startswith("250")

    async def close(self) -> None:
        self.writer.write(b"QUIT\r\n")
        self.writer.close()


async def log_in_every_way(address: tuple[str, int]) -> int:
    """Every AUTH form a device may use; returns how many messages were sent."""
    plain = plain_blob("scanner01", PASSWORD)
    sent = 0
    for steps in (
        [(f"AUTH PLAIN {plain}", "235")],
        [("AUTH PLAIN", "334"), (plain, "235")],
        [("AUTH LOGIN", "334"), (b64("scanner01"), "334"), (b64(PASSWORD), "235")],
        [(f"AUTH LOGIN {b64('scanner01')}", "334"), (b64(PASSWORD), "235")],
    ):
        session = await Session.open(address)
        for line, expected in steps:
            assert (await session.cmd(line)).startswith(expected), line
        await session.send_mail(f"secret test {sent}")
        sent += 1
        await session.close()

    session = await Session.open(address)
    # A wrong password, a password typed where base64 belongs, and an aborted LOGIN whose
    # base64 password then arrives as a command line.
    assert (await session.cmd(f"AUTH PLAIN {plain_blob('scanner01', WRONG_PASSWORD)}")
            ).startswith("535")
    assert (await session.cmd("AUTH LOGIN")).startswith("334")
    assert (await session.cmd("scanner01")).startswith("501")
    assert (await session.cmd("AUTH LOGIN")).startswith("334")
    assert (await session.cmd(b64("scanner01"))).startswith("334")
    assert (await session.cmd(PASSWORD)).startswith("501")
    assert (await session.cmd("AUTH LOGIN")).startswith("334")
    assert (await session.cmd("*")).startswith("501")
    assert (await session.cmd(b64(PASSWORD)))[:1] == "5"
    await session.close()
    return sent


def spool_text(spool: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in spool.rglob("*") if p.is_file())


def forbidden(sandbox: Sandbox) -> dict[str, str]:
    """Every secret of the run, by what it is."""
    found = {
        "device password": PASSWORD,
        "wrong device password": WRONG_PASSWORD,
        "PLAIN blob": plain_blob("scanner01", PASSWORD),
        "PLAIN blob (wrong password)": plain_blob("scanner01", WRONG_PASSWORD),
        "LOGIN username": b64("scanner01"),
        "LOGIN password": b64(PASSWORD),
        "client secret": str(DEMO_APP.client_secret),
        "wrong client secret": WRONG_SECRET,
    }
    for i, token in enumerate(sandbox.entra.issued_tokens):
        found[f"access token {i}"] = token
        found[f"access token {i} signature"] = token.rsplit(".", 1)[1]
        found[f"XOAUTH2 blob {i}"] = b64(f"user={MAILBOX}\x01auth=Bearer {token}\x01\x01")
    return found


async def test_no_secret_in_any_log_line_or_spool_file(
        relays: RelayFactory, sandbox: Sandbox, tmp_path: Path, all_logs: Capture) -> None:
    data = relays.config()
    data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]
    data["apps"]["wrong"] = {**data["apps"]["contoso"], "client_secret": WRONG_SECRET}
    data["accounts"].append({"name": "wrong", "username": "wrong01",
                             "password_hash": relays.password_hash, "app": "wrong",
                             "mailbox": MAILBOX})
    # Two 535s: the fresh-token retry fails too, so the lane pauses and tries again later.
    sandbox.exchange.inject("auth", "535 5.7.3 Authentication unsuccessful [SANDBOX]", times=2)
    relay = await relays.start(data)
    address = relay.addresses["local"]

    sent = await log_in_every_way(address)
    session = await Session.open(address)
    assert (await session.cmd(f"AUTH PLAIN {plain_blob('wrong01', PASSWORD)}")).startswith("235")
    await session.send_mail("waits for a good secret")
    await session.close()

    await sandbox.exchange.wait_for_messages(sent, timeout=30)
    await wait_until(lambda: relay.tokens.stats("wrong")[1] >= 1)
    await relays.stop(relay)

    # The capture saw the protocol trace and the libraries, so a leak would have shown.
    text = all_logs.text
    assert "mail.log: " in text and "AUTH PLAIN ********" in text
    assert "msal." in text and "urllib3." in text
    assert "AADSTS7000215" in text  # the wrong secret's refusal is explained...
    assert "535 5.7.3" in text  # ...and so is the upstream 535
    assert len(sandbox.entra.issued_tokens) >= 2
    spooled = spool_text(tmp_path / "spool")
    assert "waits for a good secret" in spooled  # still queued, never bounced
    leaks = {what: where for what, secret in forbidden(sandbox).items()
             for where, haystack in (("log", text), ("spool", spooled)) if secret in haystack}
    assert not leaks, f"secrets found: {leaks}"
    assert "\r" not in text


def fail(text: str) -> None:
    raise RuntimeError(text)


async def test_a_traceback_carrying_a_token_is_redacted(
        relays: RelayFactory, sandbox: Sandbox, all_logs: Capture) -> None:
    relay = await relays.start()
    token = await relay.tokens.token("contoso")
    secret = str(DEMO_APP.client_secret)
    try:
        fail(f"upstream said: bad token {token} (secret {secret})")
    except RuntimeError:
        # Any logger, even one the relay never configured, and a handler added by someone else.
        logging.getLogger("some.library").exception("request failed with %s", token)
    text = all_logs.text
    assert "RuntimeError: upstream said: bad token [redacted] (secret [redacted])" in text
    assert "request failed with [redacted]" in text
    assert token not in text and secret not in text


def test_client_text_is_escaped_and_cut() -> None:
    logsafe.install()
    capture = Capture()
    logger = logging.getLogger("m365relay.test")
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    try:
        logger.info("from=<%s>", "evil\rINFO m365relay: forged line\x1b[2J" + "x" * 5000)
        logger.info("helo=%s", logsafe.printable("a\u2028b" + "y" * 5000))
    finally:
        logger.removeHandler(capture)
    first, second = capture.lines
    assert "\r" not in first and "\x1b" not in first
    assert "\\x0d" in first and "\\x1b" in first
    assert "\u2028" not in second and len(second) < 300


# Pieces of what every pattern looks for, and near misses, in both cases.
_FRAGMENTS = [
    "AUTH PLAIN ", "auth login ", "Auth XOAUTH2 '", "Bearer ", "BEARER\t", "eyJ", "eyJhbGciOiJ",
    ".", "client_secret=", "PASSWORD=", "Passphrase=", "id_token=", '"access_token": "',
    "'refresh_token':'", "client_assertion", "=", "==", '"', "'", ":", "&", " ", "\r\n", "\t",
    "\x1b[2J", "\x7f", "queue", "1K0XPSDZ3M48BKK", "27D53A3FEB8C45BDAF00810EF78BD64B",
    "abcdefghijklmnop", "x", "/", "+", b64("\0scanner01\0hunter2"), plain_blob("a", "b"),
    b64(f"user={MAILBOX}\x01auth=Bearer abc\x01\x01"), b64("not a credential at all"),
]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=12))
def test_the_fast_path_redacts_exactly_what_every_pattern_would(parts: list[str]) -> None:
    # redact() skips patterns whose literal is absent from ASCII text; it must never skip one
    # that would have matched.
    text = "".join(parts)
    assert logsafe._redact_ascii(text) == logsafe._redact_all(text)
