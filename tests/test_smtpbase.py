"""relay.ingress.smtpbase against aiosmtpd itself: the cheap session set-up, _getaddr and block-wise
DATA reading must do exactly what aiosmtpd 1.4.6 and the line-by-line reader do.

When aiosmtpd changes what ``SMTP.__init__`` sets, the comparison here fails: update
:class:`relay.ingress.smtpbase.FastSMTP` to match, then this test.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import ssl
import weakref
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, auth_mechanism
from conftest import RelayFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.ingress.data import SMTP_LINE_LIMIT, DataAssembler, fold_long_lines
from relay.ingress.session import _JUNK, RelaySMTP
from relay.ingress.smtpbase import DataReader, FastSMTP
from relay.policy import rewrite

# -- set-up ------------------------------------------------------------------------------


class Hooks:
    """A handler using what aiosmtpd can find on one: hooks, a named AUTH mechanism."""

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        return responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"

    @auth_mechanism("X-TOKEN")
    async def auth_TOKEN(self, server: SMTP, args: list[str]) -> AuthResult:
        return AuthResult(success=False)

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:  # overrides
        return AuthResult(success=False)


def _built_both_ways(cls: type[FastSMTP], handler: Any, options: dict[str, Any],
                     line_length_limit: int | None = None) -> tuple[FastSMTP, FastSMTP]:
    slow, fast = cls.__new__(cls), cls.__new__(cls)
    if line_length_limit is not None:
        slow.line_length_limit = fast.line_length_limit = line_length_limit
    SMTP.__init__(slow, handler, **options)
    FastSMTP.__init__(fast, handler, **options)
    return slow, fast


def _same_method(fast: Any, slow: Any, fast_self: Any, slow_self: Any) -> bool:
    if getattr(slow, "__self__", None) is slow_self:  # bound to the session
        return fast.__self__ is fast_self and fast.__func__ is slow.__func__
    return bool(fast == slow)


def _assert_same_state(slow: FastSMTP, fast: FastSMTP, *, junk: tuple[str, ...] = (),
                       fixed: frozenset[str] = frozenset()) -> None:
    mine, theirs = vars(fast), vars(slow)
    assert set(mine) - set(theirs) == {"_lines_reader"}
    assert set(theirs) - set(mine) == set()
    for key, value in theirs.items():
        ours = mine[key]
        if key == "_smtp_methods":
            assert list(ours) == list(value)
            for name, method in value.items():
                func = ours[name].__func__
                assert ours[name].__self__ is fast
                assert (func.__wrapped__ if name in junk else func) is method.__func__, name
        elif key == "_auth_methods":
            assert list(ours) == [name for name in value if name not in fixed]
            for name, (method, builtin) in ours.items():
                assert builtin == value[name].is_builtin
                assert _same_method(method, value[name].method, fast, slow), name
        elif key in ("_stream_reader_wr", "_strong_reader"):
            reader = value() if isinstance(value, weakref.ref) else value
            ours = ours() if isinstance(ours, weakref.ref) else ours
            assert ours is fast._lines_reader and isinstance(ours, DataReader)
            assert type(reader) is asyncio.StreamReader
            assert (ours._limit, ours._loop) == (reader._limit, reader._loop)
        elif key == "_closed":
            assert isinstance(ours, asyncio.Future) and not ours.done() and ours is not value
        elif key == "_drain_waiters":
            assert isinstance(ours, collections.deque) and not ours and ours is not value
        elif key == "_client_connected_cb":
            assert _same_method(ours, value, fast, slow)
        else:
            assert ours == value, key


async def test_relay_session_is_set_up_as_aiosmtpd_would(relays: RelayFactory) -> None:
    relay = await relays.start()
    handler = relay.handlers[0]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for tls in (None, context):
        options = RelaySMTP.session_options(handler, tls)
        limit = handler.listener.max_line_length + 3
        slow, fast = _built_both_ways(RelaySMTP, handler, options, limit)
        # aiosmtpd also takes RelayHandler.auth_failures, a counter, for a mechanism.
        assert "failures" in slow._auth_methods
        _assert_same_state(slow, fast, junk=_JUNK, fixed=frozenset({"failures"}))
    session = RelaySMTP(handler)
    assert set(session._auth_methods) == {"LOGIN", "PLAIN"}
    assert session._smtp_methods["NOOP"].__smtp_syntax__ == "NOOP [ignored]"  # HELP text


async def test_hooks_and_mechanisms_are_found_as_aiosmtpd_finds_them() -> None:
    options: dict[str, Any] = {
        "hostname": "relay.test", "data_size_limit": 1000, "enable_SMTPUTF8": False,
        "decode_data": True, "ident": "test", "tls_context": None, "require_starttls": True,
        "timeout": 7.0}
    handler = Hooks()
    _assert_same_state(*_built_both_ways(FastSMTP, handler, options))
    assert FastSMTP(handler, **options)._ehlo_hook_ver == "new"
    # A hook set on the instance is found too (not taken from the class's cached tables).
    other = Hooks()
    other.handle_NOOP = other.handle_DATA  # type: ignore[attr-defined]
    slow, fast = _built_both_ways(FastSMTP, other, options)
    _assert_same_state(slow, fast)
    assert "NOOP" in fast._handle_hooks
    assert "NOOP" not in FastSMTP(Hooks(), **options)._handle_hooks


# -- _getaddr ----------------------------------------------------------------------------

ADDRESSES = [
    "", " ", "<>", "< >", "<user@example.com>", "user@example.com", " <user@example.com>",
    "<user@example.com> SIZE=100 BODY=8BITMIME", "user@example.com SIZE=1",
    '<"quoted local"@example.com>', '<"q@x"@example.org>', '"a\\"b"@example.com',
    "<@a,@b:user@example.org>", "<@relay.example:user@example.org>", "<user%x@example.org>",
    "<a!b@example.org>", "<user@[192.0.2.1]>", "<user@[IPv6:2001:db8::1]>", "<user@>",
    "<@example.org>", "<user>", "user", "<user@example.com", "user@example.com>",
    "<<user@example.com>>", "<user@@example.com>", "<a..b@example.com>", "<.a@example.com>",
    "<user(comment)@example.com>", "(c) <user@example.com>", "<user@example.com>(c)",
    "<user@exa mple.com>", "<üser@exämple.com>", "<user@example.com>\x00", "\x00", "<\udcff>",
    "garbage <> with <user@example.com>", "<" + "a" * 200 + "@example.com>",
    "<x@y> SMTPUTF8", "=?utf-8?q?x?= <user@example.com>",
    "a@", "<a@>", "@", '"', '<"">', "a@[", "<a@[>",  # the parser breaks on these
    "<a@b>  x", "<a@b>\tx", "<a@b> (c) x", "<a@b>(c)", "<a@b> \x0bx", "<a@b>\x0bx", "<a@b> ",
    "<a.b@c.d>", "<a..b@c>", "<a.@c>", "<.a@c>", "<a@c.>", "<a@.c>", "<a@c..d>", "<a@b@c>",
    "<A!#$%&'*+/=?^_`{|}~-@x-y.z>", "<a@b>>", "<a@b>x", "<a@b> \u3000x", "<a@b>\u3000x",
]


def _check_getaddr(sessions: tuple[FastSMTP, FastSMTP], arg: str) -> None:
    ours, theirs = sessions
    for limit in (0, 8):
        ours.local_part_limit = theirs.local_part_limit = limit
        try:
            expected = SMTP._getaddr(theirs, arg)
        except (IndexError, AttributeError):  # aiosmtpd's crash on "a@"; malformed here
            expected = (None, None)
        assert ours._getaddr(arg) == expected, (arg, limit)


@pytest.fixture
def getaddr_sessions() -> tuple[FastSMTP, FastSMTP]:
    options: dict[str, Any] = {
        "hostname": "relay.test", "data_size_limit": None, "enable_SMTPUTF8": True,
        "decode_data": False, "ident": "test", "tls_context": None,
        "require_starttls": False, "timeout": 1.0}
    return FastSMTP(Hooks(), **options), FastSMTP(Hooks(), **options)


def test_getaddr_parses_as_aiosmtpd(getaddr_sessions: tuple[FastSMTP, FastSMTP]) -> None:
    for arg in ADDRESSES:
        _check_getaddr(getaddr_sessions, arg)


_odd = st.text(st.sampled_from('<>@"\\.,:;()[] \t\x0b%!a-Z09\x00é'), max_size=30)
_atext = st.text(st.sampled_from("aZ09.-_%!'=`{~é \t("), min_size=1, max_size=6)


@settings(max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arg=st.one_of(_odd, st.builds("<{}@{}>{}".format, _atext, _atext, _odd)))
def test_getaddr_parses_odd_input_as_aiosmtpd(getaddr_sessions: tuple[FastSMTP, FastSMTP],
                                              arg: str) -> None:
    _check_getaddr(getaddr_sessions, arg)


# -- DATA: blocks of lines against one line at a time -----------------------------------


async def _read(blocks: bool, chunks: list[bytes], max_line: int, max_size: int,
                normalize: bool) -> tuple[Any, ...]:
    """Read DATA as the session does (blocks) or as it did (readuntil per line)."""
    reader = DataReader(limit=max_line + 3) if blocks else asyncio.StreamReader(max_line + 3)
    data = DataAssembler(max_size=max_size, max_line=max_line, normalize=normalize)

    async def send() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)
        reader.feed_eof()

    async def segment() -> bytes:
        try:
            return await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            return await reader.read(exc.consumed)

    sender = asyncio.ensure_future(send())
    outcome = "ended"
    try:
        while True:
            lines = reader.take_lines() if isinstance(reader, DataReader) else b""
            if lines:
                if data.feed_lines(lines):
                    break
            elif data.feed(await segment()):
                break
    except asyncio.IncompleteReadError:
        outcome = "eof"
    await sender
    rest = await reader.read()
    long_line = any(len(line) > SMTP_LINE_LIMIT for line in data.content.split(b"\r\n"))
    assert (data.longest > SMTP_LINE_LIMIT) == long_line or data.refused
    return (outcome, bytes(data.content), data.size, data.too_big, data.too_long, data.bare,
            rest)


_pieces = st.one_of(
    st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b".\r\n", b"\r\n.\r\n", b"\n.\n",
                     b"\r.\r\n", b"\r\n.\r", b"\n.\r\n", b"\r\n..\r\n", b"x", b"QUIT\r\n",
                     b"\r\n\r\n", b"MAIL FROM:<a@b>\r\n"]),
    st.binary(max_size=30),
    st.integers(20, 70).map(lambda n: b"L" * n),
)


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(_pieces, max_size=40), cuts=st.lists(st.integers(0, 400), max_size=8),
       normalize=st.booleans(), max_line=st.sampled_from([30, 64, 2000]),
       max_size=st.sampled_from([0, 100, 10_000]))
async def test_data_in_blocks_reads_as_line_by_line(pieces: list[bytes], cuts: list[int],
                                                    normalize: bool, max_line: int,
                                                    max_size: int) -> None:
    stream = b"".join(pieces)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    expected = await _read(False, chunks, max_line, max_size, normalize)
    assert await _read(True, chunks, max_line, max_size, normalize) == expected


async def test_long_message_in_blocks_keeps_what_follows() -> None:
    lines = [b"Subject: x\r\n", b"\r\n", b".leading dot\r\n", b"x" * 1500 + b"\r\n",
             b"bare\nLF\r\n", b"..\r\n"] * 300
    stream = b"".join(lines) + b".\r\nQUIT\r\nMAIL FROM:<a@b>\r\n"
    chunks = [stream[i:i + 4096] for i in range(0, len(stream), 4096)]
    expected = await _read(False, chunks, 2000, 0, True)
    got = await _read(True, chunks, 2000, 0, True)
    assert got == expected
    assert got[0] == "ended" and got[-1] == b"QUIT\r\nMAIL FROM:<a@b>\r\n"


# -- header block and body as parts -----------------------------------------------------


def test_fold_returns_the_same_object_when_nothing_is_long() -> None:
    body = bytearray(b"short\r\nlines\r\n")
    view = memoryview(body)[2:]
    assert fold_long_lines(view) is view
    assert fold_long_lines(body) is body
    long = memoryview(bytearray(b"a\r\n" + b"x" * 1200 + b"\r\n"))
    folded = fold_long_lines(long)
    assert isinstance(folded, bytes) and folded.count(b"\r\n") == 3


@pytest.mark.parametrize("content", [
    b"Subject: s\r\nFrom: Dev <dev@printers.example>\r\n\r\nbody\r\n",
    b"\r\nno header\r\n", b"", b"Subject: only headers\r\n", b"not a header line\r\n",
])
def test_prepare_returns_a_header_block_before_the_body_as_received(content: bytes) -> None:
    received = bytearray(content)
    fields, body = rewrite.split_headers(received)
    header = rewrite.prepare(fields, body, mailbox="box@contoso.example", rewrite_from=True,
                             hostname="relay.test", received="from x by y")
    message = header + body.tobytes()
    assert body.obj is received  # a view, not a copy
    start = content.find(b"\r\n\r\n")
    rest = content[start + 2:] if start >= 0 else content if content[:2] == b"\r\n" else b""
    assert body.tobytes() == rest and message.endswith(rest)
    assert message.startswith(b"Received: from x by y\r\n")
    assert b"From: <box@contoso.example>\r\n" in message or (
        b"From: Dev <box@contoso.example>\r\nReply-To: Dev <dev@printers.example>\r\n"
        in message)
    if not fields:
        assert b"\r\n\r\n" in message  # the header block still ends with a blank line
    del fields, body
    received.clear()  # nothing holds a view of it any more
