"""Fuzzing: random command sequences and payloads into real sessions of a running relay.

Invariants, for every example: no crash (no ``500 Error: (Exception)`` reply, the relay keeps
answering new connections), no hang (every reply within seconds), exactly one reply per line
sent (a multi-line reply counts once, nothing left over after ``QUIT``), and no ``250`` for
DATA without the message committed to the spool (and nothing spooled without a ``250``).
"""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from conftest import RelayFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawsmtp import RawSMTP

from relay.sandbox import Sandbox
from relay.service.lifecycle import Relay

QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as (\w+)")
REPLY = re.compile(r"^[2-5]\d\d[ -]")

_words = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20)
_addresses = st.one_of(
    st.sampled_from(["a@example.org", "someone@example.org", "user%x@example.org",
                     "@a,@b:user@example.org", '"q@x"@example.org', "", "no-at", "@x",
                     "printers@contoso.example"]),
    st.builds(lambda u, d: f"{u}@{d}", _words, _words),
)
_junk = st.binary(max_size=80).map(lambda b: b.replace(b"\n", b""))
_body = st.lists(
    st.one_of(
        st.binary(max_size=200),
        st.sampled_from([b"\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r\n\x00.\r\n", b"\n.\r\n",
                         b"\r\n..\r\n", b"\r\n", b"\n", b"\r", b".", b"MAIL FROM:<x@y>\r\n"]),
        st.integers(990, 1100).map(lambda n: b"L" * n),
    ),
    max_size=12,
).map(b"".join)
_step = st.one_of(
    st.builds(lambda h: f"EHLO {h}".encode(), _words),
    st.builds(lambda h: f"HELO {h}".encode(), _words),
    st.builds(lambda a: f"MAIL FROM:<{a}>".encode(), _addresses),
    st.builds(lambda a: f"RCPT TO:<{a}>".encode(), _addresses),
    st.just(b"MAIL FROM:<d@printers.example> SIZE=999999999"),
    st.sampled_from([b"DATA", b"DATA x", b"RSET", b"NOOP", b"VRFY a", b"EXPN a", b"HELP",
                     b"HELP MAIL", b"STARTTLS", b"AUTH", b"AUTH LOGIN", b"AUTH PLAIN",
                     b"AUTH CRAM-MD5", b"AUTH PLAIN !!!", b"*", b"", b"QUIT x"]),
    st.builds(lambda u, p: b"AUTH PLAIN " + base64.b64encode(f"\0{u}\0{p}".encode()),
              _words, _words),
    _junk,
    st.integers(400, 70_000).map(lambda n: b"NOOP " + b"n" * n),
)
# A well-formed transaction now and then, so DATA content gets fuzzed too.
_transaction = st.builds(
    lambda rcpts: [b"EHLO fuzz.test", b"MAIL FROM:<d@printers.example>",
                   *(f"RCPT TO:<{r}>".encode() for r in rcpts), b"DATA"],
    st.lists(_addresses, min_size=1, max_size=3))
_session = st.lists(st.tuples(st.one_of(_step.map(lambda s: [s]), _transaction), _body),
                    min_size=1, max_size=15)


def _stuffed(body: bytes) -> bytes:
    """What a correct client sends: its own lines dot-stuffed, then the end of data."""
    body = re.sub(rb"(?m)^\.", b"..", body)
    return body + b"\r\n.\r\n"


@pytest.fixture
def state() -> dict[str, Any]:
    return {}


async def _relay(relays: RelayFactory, sandbox: Sandbox, state: dict[str, Any]) -> Relay:
    if "relay" not in state:
        # Messages stay queued, so the spool shows exactly what was acknowledged.
        sandbox.exchange.inject("connect", "421 4.3.2 Service not available", times=10**6)
        data = relays.config()
        data["listeners"][0].update(cleartext_auth_networks=["127.0.0.0/8"],
                                    max_line_length=4096, max_message_size=20_000)
        data["delivery"]["min_backoff"] = 3600
        state["relay"] = await relays.start(data)
    relay: Relay = state["relay"]
    return relay


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(steps=_session)
async def test_random_sessions_keep_every_promise(relays: RelayFactory, sandbox: Sandbox,
                                                  state: dict[str, Any],
                                                  steps: list[tuple[list[bytes], bytes]]
                                                  ) -> None:
    relay = await _relay(relays, sandbox, state)
    queued_before = {entry.id for entry in relay.spool.entries()}
    acknowledged = set()
    async with await RawSMTP.connect(relay.addresses["local"]) as client:
        assert (await client.reply(timeout=5)).startswith("220 ")
        open_ = True
        lines = [(line, body) for group, body in steps for line in group]
        for line, body in [*lines, (b"QUIT", b"")]:
            await client.send(line + b"\r\n")
            reply = await client.reply(timeout=10)
            if reply.startswith("354"):
                await client.send(_stuffed(body))
                reply = await client.reply(timeout=10)
                if match := QUEUED.match(reply):
                    acknowledged.add(match.group(1))
                    relay.spool.read(match.group(1))  # committed before the 250
            assert REPLY.match(reply), (line, reply)
            assert not reply.startswith("500 Error: ("), reply  # an exception inside
            if reply.startswith(("421", "221")) or reply.rstrip().endswith("closing"):
                open_ = False
                break
        # A QUIT sent while the server waited for an AUTH answer was that answer; say it again.
        for _ in range(3):
            if not open_:
                break
            await client.send(b"QUIT\r\n")
            reply = await client.reply(timeout=10)
            assert REPLY.match(reply), reply
            open_ = not reply.startswith(("421", "221"))
        assert not open_
        # Exactly one reply per line: nothing left once the server has said goodbye.
        assert await client.reader.read() == b""
    queued_now = {entry.id for entry in relay.spool.entries()}
    assert queued_now - queued_before == acknowledged
    async with await RawSMTP.connect(relay.addresses["local"]) as client:
        assert (await client.reply(timeout=5)).startswith("220 ")  # still serving
