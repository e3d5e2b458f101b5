"""aiosmtpd's SMTP protocol, minus its per-connection and per-command introspection.

aiosmtpd 1.4.6 builds its tables of commands, AUTH mechanisms and handler hooks in
``SMTP.__init__`` with ``inspect.getmembers``, ``dir`` and ``inspect.signature`` on every new
connection (about 0.5 ms), and ``SMTP._getaddr`` defines a ``typing.Protocol`` class on every
MAIL and RCPT (about 0.15 ms). :class:`FastSMTP` works out what those depend on (the classes)
once per class and only binds it per connection; ``tests/test_smtpbase.py`` compares what it
sets with what aiosmtpd's own ``__init__`` sets, so an aiosmtpd upgrade that changes them fails
there rather than in production.

:class:`DataReader` lets DATA take every complete line already received in one piece instead
of one ``readuntil`` per line.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import socket
import ssl
import types
import weakref
from collections.abc import Callable
from email._header_value_parser import AddrSpec, AngleAddr, get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any

from aiosmtpd import smtp as aiosmtpd_smtp
from aiosmtpd.smtp import SMTP, _AuthMechAttr

_Table = tuple[tuple[str, Callable[..., Any]], ...]

# <dot-atom@dot-atom> in printable ASCII (RFC 5322 atext): no quoting, comments, routes or
# literals, so the parser would return it as it is.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_ADDRESS = re.compile(rf"<(({_ATEXT}(?:\.{_ATEXT})*)@{_ATEXT}(?:\.{_ATEXT})*)>")


class DataReader(asyncio.StreamReader):
    """A StreamReader that also hands over all the complete lines it holds at once."""

    def buffered(self) -> int:
        """How many received bytes wait to be read."""
        return len(self._buffer)  # type: ignore[attr-defined]

    def take_lines(self) -> bytes:
        """The complete lines (each ending in LF) at the front of the buffer, in one piece,
        or ``b""`` when it holds none.

        The piece stops after the first line that could end DATA, ``.<CR><LF>`` at the start
        of the buffer or after an LF, so what the client pipelined after the message (QUIT,
        the next MAIL) stays in the stream for the command loop.
        """
        buffer: bytearray = self._buffer  # type: ignore[attr-defined]
        if self._exception is not None:  # type: ignore[attr-defined]
            return b""  # readuntil() raises it
        end = buffer.rfind(b"\n") + 1
        if end == 0:
            return b""
        if buffer.startswith(b".\r\n"):
            end = 3
        else:
            dot = buffer.find(b"\n.\r\n", 0, end)
            if dot >= 0:
                end = dot + 4
        with memoryview(buffer) as view:
            lines = view[:end].tobytes()
        del buffer[:end]  # no export is left, so the bytearray may shrink
        self._maybe_resume_transport()  # type: ignore[attr-defined]
        return lines


def _class_tables(cls: type[FastSMTP]) -> tuple[_Table, _Table]:
    """The session class's commands and AUTH mechanisms, as aiosmtpd finds them on an
    instance: smtp_* in dir() order keyed without "smtp_"; auth_* in getmembers() order."""
    tables = _class_tables_cache.get(cls)
    if tables is None:
        commands = tuple((name.replace("smtp_", ""), cls._command(name, _function(cls, name)))
                         for name in dir(cls) if name.startswith("smtp_"))
        mechanisms = tuple((_mechanism(name, func), _function(cls, name))
                           for name, func in inspect.getmembers(cls) if name.startswith("auth_"))
        tables = _class_tables_cache[cls] = commands, mechanisms
    return tables


_class_tables_cache: dict[type, tuple[_Table, _Table]] = {}


def _function(cls: type, name: str) -> Callable[..., Any]:
    func = getattr(cls, name)
    if not inspect.isfunction(func):  # bound per connection with types.MethodType
        raise TypeError(f"{cls.__name__}.{name} must be a plain method")
    return func


def _mechanism(name: str, func: Any) -> str:
    """The AUTH mechanism of method ``name``: from @auth_mechanism, or auth_FOO__BAR → FOO-BAR."""
    return getattr(func, "__auth_mechanism_name__",
                   name.replace("auth_", "").replace("__", "-"))


class _HandlerTables:
    """What aiosmtpd looks up on a handler: the names of its handle_* hooks and auth_*
    mechanisms, and the EHLO hook's version. Names only, so the cache keeps no handler alive.

    Unlike aiosmtpd 1.4.6, only methods are mechanisms: it took any auth_* attribute, so
    RelayHandler.auth_failures (a counter) made EHLO offer ``AUTH LOGIN PLAIN failures``.
    """

    def __init__(self, handler: Any) -> None:
        self.hooks = tuple((m.replace("handle_", ""), m)
                           for m in dir(handler) if m.startswith("handle_"))
        self.mechanisms = tuple((_mechanism(name, func), name)
                                for name, func in inspect.getmembers(handler)
                                if name.startswith("auth_") and callable(func))
        self.ehlo_version: str | None = None
        ehlo = dict(self.hooks).get("EHLO")
        if ehlo is not None:
            count = len(inspect.signature(getattr(handler, ehlo)).parameters)
            if count not in (4, 5):
                raise RuntimeError("Unsupported EHLO Hook")
            self.ehlo_version = "old" if count == 4 else "new"


_handler_tables: weakref.WeakKeyDictionary[Any, _HandlerTables] = weakref.WeakKeyDictionary()


def handler_tables(handler: Any) -> _HandlerTables:
    """The handler's tables, worked out at its first session (hooks it gains later are not
    seen; aiosmtpd would see them from the next session on)."""
    try:
        tables = _handler_tables.get(handler)
    except TypeError:  # not hashable, or no weak references to it
        return _HandlerTables(handler)
    if tables is None:
        tables = _handler_tables[handler] = _HandlerTables(handler)
    return tables


class FastSMTP(SMTP):
    """aiosmtpd's SMTP with a cheap ``__init__`` (for the options the relay uses) and
    ``_getaddr``."""

    reader_class: type[DataReader] = DataReader

    def __init__(self, handler: Any, *, data_size_limit: int | None, enable_SMTPUTF8: bool,
                 decode_data: bool, hostname: str, ident: str,
                 tls_context: ssl.SSLContext | None, require_starttls: bool,
                 timeout: float) -> None:
        """What ``SMTP.__init__`` does with these options and the others at their defaults
        (no AUTH requirement, no authenticator, no call limits, no PROXY protocol)."""
        self.__ident__ = ident
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = aiosmtpd_smtp.make_loop()
        reader = self.reader_class(limit=self.line_length_limit, loop=self.loop)
        self._lines_reader = reader
        asyncio.StreamReaderProtocol.__init__(
            self, reader, client_connected_cb=self._cb_client_connected, loop=self.loop)
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = decode_data
        # aiosmtpd's class-wide MAIL size allowance, which every EHLO raises: reset it per
        # connection as aiosmtpd does, or it grows without bound.
        self.command_size_limits.clear()
        self.hostname = hostname or socket.getfqdn()  # (the relay always gives one)
        self.tls_context = tls_context
        if tls_context is not None:  # aiosmtpd's warnings, word for word
            if tls_context.verify_mode not in {ssl.CERT_NONE, ssl.CERT_OPTIONAL}:
                aiosmtpd_smtp.log.warning("tls_context.verify_mode not in {CERT_NONE, "
                                          "CERT_OPTIONAL}; this might cause client "
                                          "connection problems")
            elif tls_context.check_hostname:
                aiosmtpd_smtp.log.warning("tls_context.check_hostname == True; "
                                          "this might cause client connection problems")
        self.require_starttls = tls_context and require_starttls
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._auth_callback = aiosmtpd_smtp.login_always_fail
        self._authenticator = None
        self._auth_required = False
        self._bind_tables(handler)
        self._enforce_call_limit = False

    def _bind_tables(self, handler: Any) -> None:
        bind = types.MethodType
        commands, mechanisms = _class_tables(type(self))
        self._smtp_methods = {name: bind(func, self) for name, func in commands}
        auth = {name: _AuthMechAttr(bind(func, self), True) for name, func in mechanisms}
        tables = handler_tables(handler)
        for name, attribute in tables.mechanisms:  # the handler's win, as in aiosmtpd
            auth[name] = _AuthMechAttr(getattr(handler, attribute), False)
        self._auth_methods = auth
        self._handle_hooks = {name: getattr(handler, attribute)
                              for name, attribute in tables.hooks}
        self._ehlo_hook_ver = tables.ehlo_version

    @classmethod
    def _command(cls, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        """The function behind command method ``name`` (a subclass may wrap it)."""
        return func

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd 1.4.6's ``SMTP._getaddr`` without the class it defines per call, and
        without the header parser (~0.1 ms) for a plain ``<local@domain>``."""
        if not arg:
            return "", ""
        simple = _SIMPLE_ADDRESS.match(arg)
        if simple is not None:
            # What the parser returns for it: the address as written, and the rest after
            # the white space that follows (get_cfws); a comment there is left to the parser.
            rest = arg[simple.end():]
            if rest[:1] in (" ", "\t"):
                rest = rest.lstrip()
            if rest[:1] != "(":
                return self._limited(simple.group(1), simple.group(2), rest)
        address: AngleAddr | AddrSpec
        try:
            if arg.lstrip().startswith("<"):
                address, rest = get_angle_addr(arg)
            else:
                address, rest = get_addr_spec(arg)
            addr = address.addr_spec
        except HeaderParseError:
            return None, None
        except (IndexError, AttributeError):
            # The parser also breaks on some input ("a@", '"', "a@["); aiosmtpd let that
            # escape as "500 Error: (IndexError) ...". It is a malformed address too.
            return None, None
        return self._limited(addr, addr.rpartition("@")[0], rest)

    def _limited(self, addr: str, localpart: str, rest: str
                 ) -> tuple[str | None, str | None]:
        if self.local_part_limit and len(localpart) > self.local_part_limit:
            return None, None
        return addr, rest
