"""Header changes made at submission: From rewrite, Message-ID, Date, Received.

The body is never touched (not even copied: it stays a view of the content as received), and
headers are handled as bytes so 8-bit and odd headers from old devices pass through unchanged
apart from what we add.
"""

from __future__ import annotations

import email.utils
import functools
import re
import time
import uuid

_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.ASCII)


def split_headers(content: bytes | bytearray) -> tuple[list[bytes], memoryview]:
    """Header fields (each with its folded continuation lines and CRLF) and the rest (the
    blank line and the body), as a view of ``content``."""
    view = memoryview(content)
    if content.startswith(b"\r\n"):
        return [], view
    end = content.find(b"\r\n\r\n")
    end = len(content) if end < 0 else end + 2
    head, body = view[:end].tobytes(), view[end:]
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields, body


def field_name(field: bytes) -> str:
    match = _FIELD.match(field)
    return match.group(1).decode("ascii").lower() if match else ""


def field_value(field: bytes) -> str:
    raw = field.split(b":", 1)[1] if b":" in field else b""
    text = raw.decode("utf-8", errors="surrogateescape")
    return re.sub(r"\r?\n[ \t]*", " ", text).strip()


def header_address(fields: list[bytes], name: str) -> str | None:
    """The first address of header ``name``, or None when the header is absent."""
    for field in fields:
        if field_name(field) == name:
            return parse_address(field_value(field))[1]
    return None


def parse_address(value: str) -> tuple[str, str]:
    """email.utils.parseaddr, remembered: a device sends the same From header every time,
    and each message needs it twice (the identity check, then the rewrite). Only a usual
    header's length is kept, so the cache stays a few hundred KiB at most."""
    if len(value) > 1000:
        return email.utils.parseaddr(value)
    return _parse_address(value)


_parse_address = functools.lru_cache(maxsize=256)(email.utils.parseaddr)


def date_now() -> str:
    """``email.utils.formatdate(localtime=True)``, worked out once a second (it has only
    seconds, and costs tens of microseconds; every message needs it once or twice)."""
    return _date_at(int(time.time()))


@functools.lru_cache(maxsize=1)
def _date_at(second: int) -> str:
    return email.utils.formatdate(second, localtime=True)


def _line(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\n".encode("utf-8", errors="surrogateescape")


def _from_value(display: str, mailbox: str) -> str:
    """The rewritten From: the device's display name before the mailbox."""
    try:
        return email.utils.formataddr((display, mailbox))
    except UnicodeEncodeError:
        # 8-bit bytes that are not UTF-8 (a Latin-1 printer's "Drucker Büro"): formataddr
        # cannot encode them, so they go on as the device sent them, like its other headers.
        quoted = display.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{mailbox}>'


def prepare(fields: list[bytes], body: memoryview, *, mailbox: str, rewrite_from: bool,
            hostname: str, received: str) -> bytes:
    """The header block that goes before ``body`` (from :func:`split_headers`) when the
    message is spooled and sent upstream."""
    names = {field_name(f) for f in fields}
    out = [_line("Received", received)]
    for field in fields:
        if rewrite_from and field_name(field) == "from":
            display, address = parse_address(field_value(field))
            if address.lower() != mailbox.lower():
                # Exchange only sends as the mailbox we log in as (else 5.2.252 SendAsDenied);
                # keep the device's display name and let replies reach the original address.
                out.append(_line("From", _from_value(display, mailbox)))
                if "reply-to" not in names and address:
                    out.append(_line("Reply-To", field_value(field)))
                continue
        out.append(field)
    if "from" not in names:
        out.append(_line("From", f"<{mailbox}>"))
    if "message-id" not in names:
        out.append(_line("Message-ID", f"<{uuid.uuid4().hex}@{hostname}>"))
    if "date" not in names:
        out.append(_line("Date", date_now()))
    if not fields and body[:2].tobytes() != b"\r\n":
        out.append(b"\r\n")  # the blank line that ends the header block
    return b"".join(out)
