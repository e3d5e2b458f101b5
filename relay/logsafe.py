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
    from relay.config.records import Config

REDACTED = "[redacted]"
MARK = "m365relay_redacted"  # set on cleaned records
_MAX_TOKENS = 64  # tokens come hourly per app and expire: keep the newest, bounded

_lock = threading.Lock()
_secrets: set[str] = set()  # config secrets (and base64 forms): for the process's lifetime
_tokens: dict[str, None] = {}  # an ordered set of recent access tokens
# Both of the above, longest first, in _known[0]: rebuilt under _lock on every change, read
# without it (one atomic load of a tuple), so a record costs no lock and no sort.
_known: list[tuple[str, ...]] = [()]
_formatter = logging.Formatter()

_AUTH_ARG = re.compile(
    r"(?i)(\bAUTH\s+['\"]?[A-Z0-9_-]+)[^\S\r\n]+(?=[A-Za-z0-9+/=]{4,})"
    r"((?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?)(?![A-Za-z0-9+/=])")
_BEARER = re.compile(r"(?i)\b(Bearer)\s+[A-Za-z0-9\-._~+/]+=*")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]*")
_FIELDS = "client_secret|access_token|refresh_token|id_token|client_assertion|password|passphrase"
_FORM_FIELD = re.compile(rf"(?i)\b({_FIELDS})=[^&\s'\"]+")
_JSON_FIELD = re.compile(rf"(?i)([\"']({_FIELDS})[\"']\s*:\s*[\"'])[^\"']+")
_BASE64_RUN = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{12,}={0,2}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
# A queue ID is a base64 run and appears in every line about its message: remember the
# verdicts on recent runs (a pure function of the run; the dict is bounded, and only ever
# cleared or added to, which is safe from any thread).
_verdicts: dict[str, bool] = {}
_MAX_VERDICTS = 512
# Every _FIELDS name contains one of these; for ASCII text they rule both field patterns out.
_FIELD_WORDS = ("secret", "token", "assertion", "pass")

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
        _rebuild()


def register_token(token: str) -> None:
    """Never log this access token (JWTs are caught anyway; other token formats are not)."""
    with _lock:
        _tokens[token] = None
        while len(_tokens) > _MAX_TOKENS:
            del _tokens[next(iter(_tokens))]
        _rebuild()


def _rebuild() -> None:
    """Under _lock: publish the secrets and tokens, longest first (a secret containing another
    must be replaced whole)."""
    _known[0] = tuple(sorted({*_secrets, *_tokens}, key=len, reverse=True))


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
    """``text`` with every secret this module knows about replaced.

    Every record passes through here, so the common case (an ordinary ASCII line) is kept
    cheap: a pattern runs only if the text holds the literal it cannot match without. For ASCII
    text those substring tests are exact (``(?i)`` folds only ASCII letters there); other text
    takes :func:`_redact_all`, every pattern unconditionally."""
    for secret in _known[0]:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _redact_ascii(text) if text.isascii() else _redact_all(text)


def _redact_ascii(text: str) -> str:
    """:func:`_redact_all` for ASCII text, skipping each pattern whose literal is absent."""
    # The substitutions below only shorten matches and insert "[redacted]" or "********", which
    # form none of these literals, so testing them once on this text is enough.
    low = text.lower()
    if "auth" in low:
        text = _AUTH_ARG.sub(_auth_arg, text)
    if "bearer" in low:
        text = _BEARER.sub(_bearer, text)
    if "eyJ" in text:
        text = _JWT.sub(_whole, text)
    if any(word in low for word in _FIELD_WORDS):
        text = _FORM_FIELD.sub(_form_field, text)
        text = _JSON_FIELD.sub(_json_field, text)
    text = _credential_blobs(text)
    # isprintable() is false for every ASCII character _CONTROL matches (and for \t and \n).
    return text if text.isprintable() else _CONTROL.sub(_escape, text)


def _redact_all(text: str) -> str:
    """Every pattern, no shortcuts: what :func:`redact` does for text that is not ASCII."""
    text = _AUTH_ARG.sub(_auth_arg, text)
    text = _BEARER.sub(_bearer, text)
    text = _JWT.sub(_whole, text)
    text = _FORM_FIELD.sub(_form_field, text)
    text = _JSON_FIELD.sub(_json_field, text)
    text = _credential_blobs(text)
    return _CONTROL.sub(_escape, text)


# Functions, not template strings: re compiles templates lazily, with an import that fails
# while the interpreter shuts down (and asyncio still logs then).
def _auth_arg(m: re.Match[str]) -> str:
    # An initial response is base64 of text (a user name, a PLAIN or XOAUTH2 response, a
    # CRAM-MD5 digest line); a word that merely has 4n letters ("AUTH LOGIN from ...") is not.
    try:
        decoded = binascii.a2b_base64(m.group(2), strict_mode=True)
    except (binascii.Error, ValueError):
        return m.group()
    if not decoded or not _text(decoded.replace(b"\x00", b"").replace(b"\x01", b"")):
        return m.group()
    return f"{m.group(1)} ********"


def _bearer(m: re.Match[str]) -> str:
    return f"{m.group(1)} {REDACTED}"


def _whole(m: re.Match[str]) -> str:
    return REDACTED


def _form_field(m: re.Match[str]) -> str:
    return f"{m.group(1)}={REDACTED}"


def _json_field(m: re.Match[str]) -> str:
    return f"{m.group(1)}{REDACTED}"


def _escape(m: re.Match[str]) -> str:
    return f"\\x{ord(m.group()):02x}"


def _credential_blobs(text: str) -> str:
    # Queue IDs, Message-IDs and host names are base64 runs too: decide on all runs first and
    # substitute only when one is a credential (rare), not through a callback per run.
    runs = _BASE64_RUN.findall(text)
    if any(_is_credential(run) for run in runs):
        return _BASE64_RUN.sub(_credential_blob, text)
    return text


def _credential_blob(match: re.Match[str]) -> str:
    return REDACTED if _is_credential(match.group()) else match.group()


def _is_credential(run: str) -> bool:
    """A base64 run that decodes to a SASL PLAIN, XOAUTH2 or OAUTHBEARER response.

    Exact, not a guess on random-looking text: queue ids (base32), Message-IDs, host names and
    paths (``/`` is a base64 character) are runs too, and about 1 in 400 queue-file paths
    decoded to bytes holding two NULs, which the old test ("two NULs") took for a PLAIN
    response. A response is recognised by its whole grammar instead (RFC 4616, Google's
    XOAUTH2, RFC 7628): text parts that are UTF-8 with no control characters.
    """
    verdict = _verdicts.get(run)
    if verdict is None:
        verdict = _is_sasl_response(run)
        if len(_verdicts) >= _MAX_VERDICTS:
            _verdicts.clear()
        _verdicts[run] = verdict
    return verdict


def _is_sasl_response(run: str) -> bool:
    try:
        # What base64.b64decode(validate=True) does, without its wrappers; a client may leave
        # the padding off, so it is added.
        decoded = binascii.a2b_base64(run + "=" * (-len(run) % 4), strict_mode=True)
    except (binascii.Error, ValueError):
        return False
    if decoded.count(b"\x00") == 2:  # PLAIN: [authzid] NUL authcid NUL passwd
        authzid, user, password = decoded.split(b"\x00")
        # The password as bytes: a device may send Latin-1, which is no less a secret.
        return (bool(user) and bool(password) and _text(authzid + user)
                and not any(byte < 0x20 or byte == 0x7F for byte in password))
    # XOAUTH2: user=U ^A auth=Bearer T ^A^A; OAUTHBEARER: n,a=U, ^A auth=Bearer T ^A^A
    if (decoded.startswith((b"user=", b"n,")) and b"\x01auth=" in decoded
            and decoded.endswith(b"\x01\x01")):
        return _text(decoded.replace(b"\x01", b""))
    return False


def _text(data: bytes) -> bool:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return text.isprintable()


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
