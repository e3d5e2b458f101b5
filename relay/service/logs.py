"""Where log lines go and how they look: stderr, as text, as journald wants it, or as JSON.

Every command sets logging up here (``serve``, ``doctor``, ``login``, ...); the secrets filter of
:mod:`relay.logsafe` is installed first, whatever the format.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import sys
import time
from typing import Any

from relay import logsafe

# Maillog lines ("ID: to=<a@b>, relay=h:587, ... status=sent (250 ok)") as key=value fields for
# JSON collectors. Delivery also passes its outcomes' typed fields (code, enhanced_status, ...)
# as `extra=`, which take precedence: the codes are never read back from our own text.
_QUEUE_ID = re.compile(r"([0-9A-HJKMNP-TV-Z]{15}): ")
_KEY = re.compile(r"([a-z_]+)=")
_CODE = re.compile(r"(?:\banswered|>:) ([2-5]\d\d)\b")

_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", logsafe.MARK}


class _TextFormatter(logging.Formatter):
    """logging.Formatter's default time format, with the strftime done once per second (it
    costs as much as the rest of formatting a line, and a busy relay logs many per second)."""

    _cached: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached_second, stamp = self._cached
        if second != cached_second:
            stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._cached = (second, stamp)
        return f"{stamp},{int(record.msecs):03d}"  # default_msec_format


# Maillog fields that are numbers (Postfix's size=, nrcpt=, delay=): typed in JSON, so Loki,
# Elastic or Datadog can sum and compare them without a parsing rule.
_NUMERIC_FIELDS = {"size": int, "nrcpt": int, "expires_in": int, "delay": float}


def _typed(fields: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = dict(fields)
    for key, kind in _NUMERIC_FIELDS.items():
        if key in fields:
            with contextlib.suppress(ValueError):  # not a number after all: keep the text
                out[key] = kind(fields[key])
    return out


class _JsonFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # RFC 3339 with milliseconds and the zone offset: what log shippers parse unaided.
        moment = datetime.datetime.fromtimestamp(record.created).astimezone()
        return moment.isoformat(timespec="milliseconds")

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        # Fields of maillog lines (queue_id, to, status, ...) and any `extra=`, for collectors.
        out: dict[str, object] = {**_typed(log_fields(message)), **{
            k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}}
        out.update({"time": self.formatTime(record), "level": record.levelname.lower(),
                    "logger": record.name, "message": message})
        # logsafe leaves the traceback only as redacted exc_text.
        exception = record.exc_text or (
            self.formatException(record.exc_info) if record.exc_info else "")
        if exception:
            out["exception"] = exception
        return json.dumps(out, default=str)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted, as logging's own
    last-resort handler does: a handler holding the stream of its creation writes into a closed
    file once that stream is replaced and closed (a test's capture, an embedding application
    redirecting stderr), and every later record becomes ``--- Logging error ---``."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # setStream() and StreamHandler.__init__: the stream is always sys.stderr


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    logsafe.install()
    handler = _StderrHandler()
    handler.addFilter(logsafe.RedactingFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        # journald stamps each line itself.
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter at DEBUG can include protocol lines (AUTH blobs); keep it quiet. aiosmtpd
    # ("mail.log") also warns about its own deprecated login_data on every AUTH.
    for name in ("aiosmtplib", "msal", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.ERROR)


def reply_code(text: str) -> str:
    """The SMTP reply code a log line quotes, for lines that carry no ``code`` field (an
    operator's tools reading old logs); the relay itself counts by its outcomes' fields."""
    if text[:3].isdigit() and text[:1] in "2345" and text[3:4] in {"", " ", "-"}:
        return text[:3]
    match = _CODE.search(text)
    return match.group(1) if match else "none"


def log_fields(message: str) -> dict[str, str]:
    """Structured fields of a maillog-style line, for JSON logs.

    ``"3F2A...: to=<a@b>, relay=h:587, delay=0.4, status=sent (250 ok)"`` gives queue_id, to,
    relay, delay, status and detail. Parsing stops at the first part that is not ``key=value``,
    so free text after the fields never turns into bogus keys.
    """
    match = _QUEUE_ID.match(message)
    if match is None:
        return {}
    fields = {"queue_id": match.group(1)}
    pos = match.end()
    while (key := _KEY.match(message, pos)) is not None:
        pos = key.end()
        if message.startswith("<", pos):
            close = message.find(">", pos)
            end = len(message) if close < 0 else close + 1
            value = message[pos + 1:end if close < 0 else close]
        else:
            end = pos
            while end < len(message) and message[end] not in ", ":
                end += 1
            value = message[pos:end]
        fields[key.group(1)] = value
        pos = end
        if message.startswith(" (", pos):
            close = _matching_paren(message, pos + 1)
            fields["detail"] = message[pos + 2:close]
            pos = close + 1
        if not message.startswith(", ", pos):
            break
        pos += 2
    return fields


def _matching_paren(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return len(text)
