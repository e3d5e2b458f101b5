"""Header changes made at submission: From rewrite, Message-ID, Date, Received.

The body is never touched, and headers are handled as bytes so 8-bit and odd headers from old
devices pass through unchanged apart from what we add.
"""

from __future__ import annotations

import email.utils
import re
import uuid

_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.ASCII)


def split_headers(content: bytes) -> tuple[list[bytes], bytes]:
    """Header fields (each with its folded continuation lines and CRLF) and the rest."""
    if content.startswith(b"\r\n"):
        return [], content
    end = content.find(b"\r\n\r\n")
    head, body = (content, b"") if end < 0 else (content[: end + 2], content[end + 2:])
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
            return email.utils.parseaddr(field_value(field))[1]
    return None


def _line(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\n".encode("utf-8", errors="surrogateescape")


def prepare(content: bytes, *, mailbox: str, rewrite_from: bool, hostname: str,
            received: str) -> bytes:
    """The message as it will be spooled and sent upstream."""
    fields, body = split_headers(content)
    names = {field_name(f) for f in fields}
    out = [_line("Received", received)]
    for field in fields:
        if rewrite_from and field_name(field) == "from":
            display, address = email.utils.parseaddr(field_value(field))
            if address.lower() != mailbox.lower():
                # Exchange only sends as the mailbox we log in as (else 5.2.252 SendAsDenied);
                # keep the device's display name and let replies reach the original address.
                out.append(_line("From", email.utils.formataddr((display, mailbox))))
                if "reply-to" not in names and address:
                    out.append(_line("Reply-To", field_value(field)))
                continue
        out.append(field)
    if "from" not in names:
        out.append(_line("From", f"<{mailbox}>"))
    if "message-id" not in names:
        out.append(_line("Message-ID", f"<{uuid.uuid4().hex}@{hostname}>"))
    if "date" not in names:
        out.append(_line("Date", email.utils.formatdate(localtime=True)))
    if not fields and not body.startswith(b"\r\n"):
        body = b"\r\n" + body
    return b"".join(out) + body
