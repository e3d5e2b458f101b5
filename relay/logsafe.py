"""Keep secrets and raw client input out of every log record, whoever configured logging.

Handlers and levels belong to the admin (``--log-level debug``, a systemd journal, a library
user's own ``logging.basicConfig``), and aiosmtpd logs protocol lines (``AUTH`` included) at
DEBUG and INFO. A filter on our own handler would miss records that reach other handlers, and a
filter on a logger misses its children (``msal.application``), so :func:`install` wraps the
process's LogRecord factory instead: every record, from any logger, is cleaned once when it is
created, before any handler, filter or formatter can see it. The message is formatted then and
there, redacted, and stored without arguments; a traceback is formatted, redacted and stored as
``exc_text`` with ``exc_info`` dropped, so no formatter can render the raw exception again.

Redacted: ``AUTH <mechanism> <blob>`` arguments, base64 blobs that decode to a PLAIN or XOAUTH2
response, ``Bearer`` tokens, JWTs, ``client_secret=``-style fields, config secrets (with their
base64 form) given to :func:`register_secret`, and recent access tokens given to
:func:`register_token`. aiosmtpd's
protocol trace is rewritten so that lines a client sent (which after an AUTH challenge are
base64 credentials) show only their SMTP verb, and message bodies only their length. Control
characters are escaped so a client cannot forge log lines.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.config import Config

REDACTED = "[redacted]"
MARK = "m365relay_redacted"  # set on cleaned records
_MAX_TOKENS = 64  # tokens come hourly per app and expire: keep the newest, bounded

_lock = threading.Lock()
_secrets: set[str] = set()  # config secrets (and base64 forms): for the process's lifetime
_tokens: dict[str, None] = {}  # an ordered set of recent access tokens
_formatter = logging.Formatter()

_AUTH_ARG = re.compile(
    r"(?i)(\bAUTH\s+['\"]?[A-Z0-9_-]+)[^\S\r\n]+(?=[A-Za-z0-9+/=]{4,})"
    r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?(?![A-Za-z0-9+/=])")
_BEARER = re.compile(r"(?i)\b(Bearer)\s+[A-Za-z0-9\-._~+/]+=*")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]*")
_FIELDS = "client_secret|access_token|refresh_token|id_token|client_assertion|password|passphrase"
_FORM_FIELD = re.compile(rf"(?i)\b({_FIELDS})=[^&\s'\"]+")
_JSON_FIELD = re.compile(rf"(?i)([\"']({_FIELDS})[\"']\s*:\s*[\"'])[^\"']+")
_BASE64_RUN = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{12,}={0,2}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")

# SMTP verbs a client may send; anything else on a client line is data or an AUTH response.
_VERBS = frozenset({"HELO", "EHLO", "LHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP",
                    "QUIT", "VRFY", "EXPN", "HELP", "STARTTLS", "AUTH", "XCLIENT", "PROXY"})


def register_secret(value: str) -> None:
    """Never log ``value`` (nor its base64 form, nor, for a PEM, any of its lines)."""
    parts = [value.strip()]
    if "\n" in value:
        parts += [line.strip() for line in value.splitlines()]
    with _lock:
        for part in parts:
            if len(part) >= 6 and not part.startswith("-----"):  # not a PEM armor line
                _secrets.update((part, base64.b64encode(part.encode()).decode("ascii")))


def register_token(token: str) -> None:
    """Never log this access token (JWTs are caught anyway; other token formats are not)."""
    with _lock:
        _tokens[token] = None
        while len(_tokens) > _MAX_TOKENS:
            del _tokens[next(iter(_tokens))]


def register_config_secrets(config: Config) -> None:
    """Register every app credential of ``config`` (secrets, private keys, passphrases)."""
    for app in config.apps.values():
        credentials = [app.client_secret]
        if app.certificate is not None:
            credentials += [app.certificate.private_key, app.certificate.passphrase]
        for secret in credentials:
            if secret is not None:
                register_secret(secret.value)


def printable(text: str, limit: int = 200) -> str:
    """Client-supplied text for a log line: escaped to printable ASCII, and cut."""
    escaped = text.encode("unicode_escape", errors="backslashreplace").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


def redact(text: str) -> str:
    """``text`` with every secret this module knows about replaced."""
    with _lock:
        known = [s for s in (*_secrets, *_tokens) if s in text]
    for secret in sorted(known, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    # Functions, not template strings: re compiles templates lazily, with an import that
    # fails while the interpreter shuts down (and asyncio still logs then).
    text = _AUTH_ARG.sub(lambda m: f"{m.group(1)} ********", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _JWT.sub(lambda m: REDACTED, text)
    text = _FORM_FIELD.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    text = _JSON_FIELD.sub(lambda m: f"{m.group(1)}{REDACTED}", text)
    text = _BASE64_RUN.sub(_credential_blob, text)
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _credential_blob(match: re.Match[str]) -> str:
    """A base64 run that decodes to a SASL PLAIN (``\\0user\\0password``) or XOAUTH2 response."""
    run = match.group()
    try:
        decoded = base64.b64decode(run + "=" * (-len(run) % 4), validate=True)
    except (binascii.Error, ValueError):
        return run
    if decoded.count(b"\x00") == 2 or b"auth=Bearer" in decoded or b"\x01auth=" in decoded:
        return REDACTED
    return run


# --- aiosmtpd's protocol trace ("mail.log") ---------------------------------------------------


def _client_line(line: Any) -> str:
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    if not isinstance(line, str):
        return "?"
    line = line.rstrip("\r\n")
    verb, _, arg = line.partition(" ")
    if verb.upper() not in _VERBS:
        return f"<{len(line)} bytes, not an SMTP command>"
    if verb.upper() == "AUTH":
        mechanism, _, response = arg.partition(" ")
        return f"AUTH {printable(mechanism, 20)}" + (" ********" if response else "")
    return printable(line, 300)


def _length(value: Any) -> str:
    return f"<{len(value)} bytes>" if isinstance(value, bytes | str) else "?"


def _auth_result(value: Any) -> str:
    return f"AuthResult(success={getattr(value, 'success', '?')})"


def _arg(index: int, fix: Callable[[Any], str]) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    def rewrite(args: tuple[Any, ...]) -> tuple[Any, ...]:
        if len(args) <= index:
            return args
        return (*args[:index], fix(args[index]), *args[index + 1:])
    return rewrite


# Keyed by aiosmtpd 1.4's message templates; an unknown template still gets redact().
_AIOSMTPD: dict[str, Callable[[tuple[Any, ...]], tuple[Any, ...]]] = {
    "%r >> %r": _arg(1, _client_line),  # commands, and AUTH responses if tracing is on
    "_handle_client readline: %r": _arg(0, _client_line),
    "%r unrecognised: %s": _arg(1, lambda v: printable(str(v), 10) if str(v).isalpha()
                                and len(str(v)) <= 10 else _length(v)),
    "%r can't decode base64: %s": _arg(1, _length),
    "DATA readline: %s": _arg(0, _length),  # message bodies do not belong in logs
    "auth_%s returned %r": _arg(1, _auth_result),  # carries LoginPassword(login, password)
    "%r sender: %s": _arg(1, lambda v: printable(str(v))),
    "%r recip: %s": _arg(1, lambda v: printable(str(v))),
}


def clean(record: logging.LogRecord) -> None:
    """Redact ``record`` in place, once."""
    if getattr(record, MARK, False):
        return
    setattr(record, MARK, True)
    try:
        if record.name == "mail.log" and isinstance(record.args, tuple):
            rewrite = _AIOSMTPD.get(str(record.msg))
            if rewrite is not None:
                record.args = rewrite(record.args)
        record.msg, record.args = redact(record.getMessage()), ()
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact(_formatter.formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
    except Exception:
        # A malformed logging call (whose error report would print the raw arguments), or
        # an interpreter shutting down: withhold rather than risk an unredacted line.
        record.msg = (f"<log message withheld: it could not be redacted; logged at "
                      f"{record.pathname}:{record.lineno}>")
        record.args = ()
        record.exc_text, record.stack_info = None, None
    # A handler formatting the exception again would bypass the redaction.
    record.exc_info = None


class RedactingFilter(logging.Filter):
    """For handlers: cleans records that did not come through the factory (makeLogRecord)."""

    def filter(self, record: logging.LogRecord) -> bool:
        clean(record)
        return True


def install() -> None:
    """Clean every log record this process creates from now on. Idempotent."""
    with _lock:
        previous = logging.getLogRecordFactory()
        if getattr(previous, MARK, False):
            return

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            clean(record)
            return record

        setattr(factory, MARK, True)
        logging.setLogRecordFactory(factory)
