"""Logs that can be trusted (issue 14, item 7): redaction is exact, every refusal that loses a
device's mail is logged, and logging survives the stream it was set up with being closed.

The corpus is ordinary text the relay logs every day, generated the way the relay and Exchange
generate it (real queue ids from a real spool, Exchange-style Message-IDs, pytest's temporary
paths, UUIDs, base32 and base64 ids): it must come out byte for byte. Beside it, the secrets
(SASL responses, bearer tokens, JWTs, client secrets, passwords) that must not.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import random
import string
import sys
import uuid
from pathlib import Path

import pytest
from conftest import PASSWORD, RelayFactory, message, send, smtp_client

from relay import logsafe
from relay.service import logs
from relay.spool.store import Spool

LOGIN = ("scanner01", PASSWORD)
_RNG = random.Random(14)  # the corpus is the same in every run; it is large enough to matter


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _exchange_message_id() -> str:
    """As Exchange Online writes them: <{server}{hex}@{server}.{region}.prod.outlook.com>."""
    server = (f"{_RNG.choice(['DM6', 'SN7', 'BY5', 'AM0', 'PH0', 'CH3'])}PR"
              f"{_RNG.randrange(10, 99)}MB{_RNG.randrange(1000, 9999)}")
    local = server + "".join(_RNG.choices("0123456789ABCDEF", k=32))
    host = f"{server}.namprd{_RNG.randrange(1, 22):02d}.prod.outlook.com"
    return f"<{local}@{host}>" if _RNG.random() < 0.5 else f"<{local}@{host.upper()}>"


def _random(alphabet: str, length: int) -> str:
    return "".join(_RNG.choices(alphabet, k=length))


def ordinary_lines(tmp_path: Path) -> list[str]:
    spool = Spool(tmp_path / "spool")
    spool.open()
    ids = [spool._new_id() for _ in range(3000)]  # the relay's own id generator
    long_dir = "/tmp/pytest-of-root/pytest-12/test_damaged_queue_file_is_mov0"
    lines = [f"queue file {long_dir}/spool/queue/{q} is damaged; moved to "
             f"{long_dir}/spool/corrupt/{q}" for q in ids]
    lines += [f"{q}: to=<someone@example.org>, relay=smtp.office365.com[52.96.1.2]:587, "
              f"delay=0.4, status=sent (250 2.0.0 OK {_exchange_message_id()} "
              f"[Hostname={_exchange_message_id()[1:16]}.prod.outlook.com])" for q in ids[:1500]]
    lines += [f"message-id {_exchange_message_id()}" for _ in range(3000)]
    lines += [f"request-id {uuid.UUID(int=_RNG.getrandbits(128))} "
              f"correlation {uuid.UUID(int=_RNG.getrandbits(128)).hex}" for _ in range(1000)]
    lines += [f"id {_random(string.ascii_uppercase + '234567', 26)} "
              f"b64 {b64(_RNG.randbytes(_RNG.randrange(6, 40)))} "
              f"urlsafe {base64.urlsafe_b64encode(_RNG.randbytes(18)).decode()}"
              for _ in range(3000)]
    lines += [f"{tmp_path}/{_random(string.ascii_letters + string.digits, 40)}/state.json"
              for _ in range(1000)]
    lines += [
        "127.0.0.1: AUTH LOGIN from 10.0.0.1 with user 'scan'",
        "127.0.0.1: AUTH PLAIN failed for user 'scanner01'",
        "AUTH: too many failed logins for address 127.0.0.1",
        "connect from 192.168.10.23 on local",
        "mx1.contoso.example accepted the message; EHLO printer-3F.lan",
        "/var/spool/m365relay/queue/0H9K2M3N4P5Q6R7S8T9V",
        "token endpoint https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token",
        "password_hash rehashed for accounts[2]; passwords are checked with argon2id",
    ]
    return lines


def secret_lines() -> dict[str, str]:
    """line -> the secret in it that must not survive."""
    jwt = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL291dGxvb2sifQ.c2lnbmF0dXJl"
    plain = b64("\0scanner01\0" + PASSWORD)
    latin1 = b64(b"\0scanner01\0sch\xf6n-gr\xfcn")
    xoauth2 = b64(f"user=scanner@contoso.example\x01auth=Bearer {jwt}\x01\x01")
    oauthbearer = b64(f"n,a=scanner@contoso.example,\x01auth=Bearer {jwt}\x01\x01")
    return {
        f"client sent AUTH PLAIN {plain}": plain,
        f"AUTH PLAIN {plain.rstrip('=')}": plain.rstrip("="),
        f"'auth_PLAIN' response {plain} from 10.0.0.1": plain,
        f"{latin1} arrived": latin1,
        f"AUTH XOAUTH2 {xoauth2}": xoauth2,
        f"upstream AUTH response {oauthbearer}": oauthbearer,
        f"AUTH LOGIN {b64('scanner01')}": b64("scanner01"),
        f"Authorization: Bearer {jwt[:40]}x": jwt[:40],
        f"got token {jwt} for app contoso": jwt,
        "POST client_id=abc&client_secret=Zx8Q~secret.value_1&grant_type=client_credentials":
            "Zx8Q~secret.value_1",
        '{"access_token": "opaque-token-value-123", "expires_in": 3599}':
            "opaque-token-value-123",
        "config: password=hunter2-but-longer": "hunter2-but-longer",
    }


def test_ordinary_lines_come_out_unchanged(tmp_path: Path) -> None:
    # Before the fix about 1 in 400 queue-file paths decoded to bytes with two NULs and was
    # taken for an AUTH PLAIN response: "moved to .../test_damaged_queue_file_is_[redacted]".
    changed = [(line, out) for line in ordinary_lines(tmp_path)
               if (out := logsafe.redact(line)) != line]
    assert changed == []


def test_secrets_beside_ordinary_text_do_not_survive(tmp_path: Path) -> None:
    ordinary = ordinary_lines(tmp_path)
    for line, secret in secret_lines().items():
        beside = f"{ordinary[_RNG.randrange(len(ordinary))]} {line} {ordinary[0]}"
        for text in (line, beside):
            out = logsafe.redact(text)
            assert secret not in out, text
            assert ordinary[0] in out or text == line  # the ordinary part stays whole


def test_redaction_through_logging_is_the_same(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    logsafe.install()
    logger = logging.getLogger("m365relay.test.logs")
    ordinary = ordinary_lines(tmp_path)[::50]
    with caplog.at_level(logging.INFO, logger=logger.name):
        for line in ordinary:
            logger.info("%s", line)
        for line in secret_lines():
            logger.info("%s", line)
    got = [r.getMessage() for r in caplog.records if r.name == logger.name]
    assert got[:len(ordinary)] == ordinary
    assert not any(secret in text for text in got for secret in secret_lines().values())


def test_logging_survives_its_stream_being_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    # pytest's capture replaced sys.stderr with a file it closed after the test: the handler
    # set up by an in-process `main(["doctor", ...])` kept writing into it, and every later
    # record printed "--- Logging error --- ValueError: I/O operation on closed file".
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    root = logging.getLogger()
    logs.setup_logging("info")
    logging.getLogger("m365relay.test").info("one")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("m365relay.test").warning("two")
    assert "two" in second.getvalue() and "Logging error" not in second.getvalue()
    assert root.level == logging.INFO  # (conftest puts the root logger back afterwards)


async def test_from_enforce_refusals_are_logged(relays: RelayFactory,
                                                caplog: pytest.LogCaptureFixture) -> None:
    data = relays.config()
    data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]
    data["accounts"][0]["from"] = "enforce"
    relay = await relays.start(data)
    address = relay.addresses["local"]

    def refused_at_mail() -> int:
        with smtp_client(address) as client:
            client.login(*LOGIN)
            return client.mail("intruder@elsewhere.example")[0]

    with caplog.at_level(logging.INFO, logger="m365relay"):
        assert await asyncio.to_thread(refused_at_mail) == 550
        code, _ = await asyncio.to_thread(
            send, address, message(sender="forged@elsewhere.example"),
            sender="scanner@contoso.example", login=LOGIN)
        assert code == 550
    refusals = [r for r in caplog.records
                if r.levelno >= logging.WARNING and "refused for account scanner" in r.getMessage()]
    assert len(refusals) == 2
    mail, header = (r.getMessage() for r in refusals)
    assert "127.0.0.1" in mail and "MAIL FROM <intruder@elsewhere.example>" in mail
    assert "From: header <forged@elsewhere.example>" in header
    assert all("accounts[scanner].from: enforce" in r.getMessage() for r in refusals)
