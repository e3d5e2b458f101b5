"""RFC 3464 delivery status notifications (bounces) for mail the relay has given up on.

The body is always 7-bit clean, so it can go upstream whatever the original contained: 8-bit
text is sent as quoted-printable, and non-ASCII addresses in the machine-readable part use the
RFC 6533 ``utf-8`` address type. (Only a non-ASCII bounce address itself, which needs SMTPUTF8
anyway, puts 8-bit bytes in the To: header.) Only the original's headers are returned, never its
body: scanners send 30 MB attachments, and a bounce should not carry them back.
"""

from __future__ import annotations

import binascii
import email.parser
import email.policy
import re
import secrets
import textwrap
import time
from collections.abc import Iterable, Mapping
from email.utils import formatdate, make_msgid

from relay.diagnosis.errors import Outcome
from relay.message import Envelope

__all__ = ["build_dsn"]

SUBJECT = "Undelivered Mail Returned to Sender"
# Same bound as Postfix's header_size_limit: enough for any real header block, and it keeps a
# bounce for a message with no blank line (i.e. "all headers") from becoming huge.
MAX_ORIGINAL_HEADERS = 100 * 1024
_MAX_LINE = 998  # RFC 5322 hard limit, excluding CRLF

# An enhanced status code (RFC 3463) at the start of a reply, after the optional basic code:
# "550 5.1.1 User unknown", "550-5.7.1 ...", or a bare "5.4.7 message expired".
_STATUS_RE = re.compile(r"\s*(?:([2-5])\d\d(?:[ -]\s*|$))?(?:([245]\.\d{1,3}\.\d{1,3})(?!\.?\d))?")
_LINE_SPLIT_RE = re.compile(rb"\r\n|\r|\n")


def build_dsn(
    *,
    queue_id: str,
    envelope: Envelope,
    failed: Mapping[str, str | Outcome],
    original: bytes,
    reporting_mta: str,
    from_addr: str,
    arrival: float,
    now: float | None = None,
    explanation: str = "",
) -> bytes:
    """Return a complete ``multipart/report`` bounce (CRLF line endings) for ``envelope.bounce_to``.

    ``failed`` maps each failed recipient to its :class:`~relay.diagnosis.errors.Outcome`
    (whose fields give the Status and Diagnostic-Code), or to a reply text: the upstream's
    (``"550 5.1.1 User unknown"``) or a local reason (``"5.4.7 message expired"``).
    """
    if not envelope.bounce_to:
        raise ValueError(f"message {queue_id} has no bounce address; it must not get a DSN")
    if not failed:
        raise ValueError("a DSN needs at least one failed recipient")
    if now is None:
        now = time.time()
    mta = _one_line(reporting_mta)
    headers_block, truncated = _original_headers(original)

    parts = [
        _text_part(
            "text/plain",
            _human_text(
                mta=mta, queue_id=queue_id, failed=failed, headers_block=headers_block,
                arrival=arrival, explanation=explanation, truncated=truncated,
            ),
        ),
        _delivery_status_part(
            mta=mta, queue_id=queue_id, envelope=envelope, failed=failed, arrival=arrival, now=now
        ),
        _headers_part(headers_block),
    ]
    return _assemble(parts, from_addr=from_addr, bounce_to=envelope.bounce_to, mta=mta,
                     queue_id=queue_id, now=now)


def _assemble(parts: list[bytes], *, from_addr: str, bounce_to: str, mta: str, queue_id: str,
              now: float) -> bytes:
    """The report's own header and its parts between MIME boundaries."""
    boundary = _boundary(parts)
    top = [
        f"From: Mail Delivery System <{_one_line(from_addr)}>",
        f"To: <{_one_line(bounce_to)}>",
        f"Subject: {SUBJECT}",
        f"Date: {formatdate(now, localtime=False, usegmt=True)}",
        f"Message-ID: {make_msgid(idstring=_idstring(queue_id), domain=mta or 'localhost')}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        "Content-Transfer-Encoding: 7bit",
        "",
        "This is a MIME-encapsulated message reporting a delivery failure.",
        "",
    ]
    out = [_crlf_join(top)]
    for part in parts:
        out.append(f"--{boundary}\r\n".encode())
        out.append(part)
        out.append(b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


# ---------------------------------------------------------------------- parts


def _human_text(
    *,
    mta: str,
    queue_id: str,
    failed: Mapping[str, str | Outcome],
    headers_block: bytes,
    arrival: float,
    explanation: str,
    truncated: bool,
) -> str:
    many = len(failed) != 1
    paras = [
        f"This is the mail relay at {mta or 'this host'}.",
        f"Your message could not be delivered to the following "
        f"{'recipients' if many else 'recipient'}. The relay has given up and will not try "
        f"again. {'The replies' if many else 'The reply'} from the receiving mail system "
        "say why:",
    ]
    out = []
    for para in paras:
        out += [textwrap.fill(para, 72), ""]
    for rcpt, reply in failed.items():
        out.append(f"  {_printable(rcpt)}")
        text = reply.text if isinstance(reply, Outcome) else reply
        out.extend(
            textwrap.fill(
                _printable(text), 72, initial_indent="      ", subsequent_indent="      ",
                break_long_words=False, break_on_hyphens=False,
            ).splitlines()
        )
        out.append("")
    if explanation.strip():
        for para in re.split(r"\n\s*\n", explanation.strip()):
            out.append(textwrap.fill(" ".join(para.split()), 72, break_long_words=False,
                                     break_on_hyphens=False))
            out.append("")
    subject = _original_subject(headers_block)
    details = [
        f"Subject: {subject}" if subject else "",
        f"Received by the relay: {formatdate(arrival, localtime=False, usegmt=True)}",
        f"Queue ID: {queue_id}",
    ]
    out.append("Your message:")
    out.extend(f"  {d}" for d in details if d)
    out.append("")
    note = "Its headers are attached below"
    if truncated:
        note += " (cut short: they were unusually long)"
    out.append(note + "; the body is not included.")
    return "\n".join(out)


def _delivery_status_part(
    *,
    mta: str,
    queue_id: str,
    envelope: Envelope,
    failed: Mapping[str, str | Outcome],
    arrival: float,
    now: float,
) -> bytes:
    fields = [
        f"Reporting-MTA: dns; {_ascii(mta)}",
        f"X-M365Relay-Queue-ID: {_ascii(queue_id)}",
    ]
    sender = envelope.original_from or envelope.mail_from
    if sender:
        fields.append(f"X-M365Relay-Sender: {_address_field(sender)}")
    fields.append(f"Arrival-Date: {formatdate(arrival, localtime=False, usegmt=True)}")
    blocks = [fields]
    for rcpt, reply in failed.items():
        blocks.append([
            f"Final-Recipient: {_address_field(rcpt)}",
            "Action: failed",
            f"Status: {_status(reply)}",
            f"Diagnostic-Code: {_diagnostic_field(reply)}",
            f"Last-Attempt-Date: {formatdate(now, localtime=False, usegmt=True)}",
        ])
    body = "\r\n\r\n".join("\r\n".join(_fold(f) for f in block) for block in blocks)
    return (
        b"Content-Type: message/delivery-status\r\n"
        b"Content-Description: Delivery report\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n\r\n" + body.encode("ascii") + b"\r\n"
    )


def _headers_part(headers_block: bytes) -> bytes:
    desc = b"Content-Description: Headers of the undelivered message\r\n"
    if _is_7bit(headers_block):
        return (b"Content-Type: text/rfc822-headers\r\n" + desc
                + b"Content-Transfer-Encoding: 7bit\r\n\r\n" + headers_block)
    # Raw 8-bit headers would make the whole bounce 8-bit; quoted-printable carries the exact
    # bytes through any relay. utf-8 is what RFC 6532 headers use; legacy Latin-1 bytes then
    # show as replacement characters, which is the best a reader can do without knowing.
    return (b"Content-Type: text/rfc822-headers; charset=utf-8\r\n" + desc
            + b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
            + binascii.b2a_qp(headers_block, istext=True))


def _text_part(content_type: str, text: str) -> bytes:
    data = _crlf_normalize(text.encode("utf-8", "replace"))
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if _is_7bit(data):
        return (f"Content-Type: {content_type}; charset=us-ascii\r\n"
                "Content-Transfer-Encoding: 7bit\r\n\r\n").encode() + data
    return (f"Content-Type: {content_type}; charset=utf-8\r\n"
            "Content-Transfer-Encoding: quoted-printable\r\n\r\n").encode() + binascii.b2a_qp(
        data, istext=True
    )


# ---------------------------------------------------------------------- status fields


def status_code(reply: str) -> str:
    """The RFC 3463 status for a reply: its enhanced code, else derived from its class."""
    m = _STATUS_RE.match(reply)
    if m and m.group(2):
        return m.group(2)
    if m and m.group(1) in ("4", "5"):
        return f"{m.group(1)}.0.0"
    return "5.0.0"


def _status(reply: str | Outcome) -> str:
    return reply.dsn_status if isinstance(reply, Outcome) else status_code(reply)


def _diagnostic_field(reply: str | Outcome) -> str:
    if not isinstance(reply, Outcome):
        return _diagnostic(reply)
    if reply.reply and reply.code and not reply.graph_code:  # an SMTP server's own words
        return f"smtp; {_ascii(reply.reply)}"
    return f"X-M365Relay; {_ascii(reply.text)}"


def _diagnostic(reply: str) -> str:
    text = _ascii(reply)
    # "smtp" promises an SMTP reply (RFC 3464 2.3.6); our own reasons such as "message expired"
    # are not one, so they get an X- type the way Postfix uses "X-Postfix".
    if re.match(r"[2-5]\d\d(?:[ -]|$)", text):
        return f"smtp; {text}"
    return f"X-M365Relay; {text}"


def _address_field(addr: str) -> str:
    addr = _one_line(addr)
    if addr.isascii():
        return f"rfc822; {addr}"
    # RFC 6533 utf-8-addr-xtext: keeps message/delivery-status 7-bit for SMTPUTF8 addresses.
    encoded = "".join(
        c if 0x21 <= ord(c) <= 0x7E and c not in "+=\\" else f"\\x{{{ord(c):X}}}" for c in addr
    )
    return f"utf-8; {encoded}"


def _fold(field: str) -> str:
    """Fold a long field at spaces so no line passes 78 characters where that is possible."""
    if len(field) <= 78:
        return field
    lines: list[str] = []
    current = ""
    for word in field.split(" "):
        if current and len(current) + 1 + len(word) > 78:
            lines.append(current)
            current = " " + word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    # A single unbreakable token longer than the hard limit is cut, not left to break the part.
    return "\r\n".join(_chunk(line) for line in lines)


def _chunk(line: str) -> str:
    if len(line) <= _MAX_LINE:
        return line
    pieces = [line[i:i + _MAX_LINE - 1] for i in range(0, len(line), _MAX_LINE - 1)]
    return "\r\n ".join(pieces)


# ---------------------------------------------------------------------- original message


def _original_headers(original: bytes) -> tuple[bytes, bool]:
    """The header block of ``original`` with CRLF endings, and whether it was cut short."""
    m = re.search(rb"\r?\n\r?\n", original)
    if original.startswith((b"\r\n", b"\n")):
        block = b""
    elif m:
        block = original[: m.start()]
    else:
        block = original
    truncated = len(block) > MAX_ORIGINAL_HEADERS
    if truncated:
        block = block[:MAX_ORIGINAL_HEADERS]
        cut = max(block.rfind(b"\n"), block.rfind(b"\r"))
        block = block[:cut] if cut > 0 else block
    lines = [line for line in _LINE_SPLIT_RE.split(block) if line]
    return b"".join(line + b"\r\n" for line in lines), truncated


def _original_subject(headers_block: bytes) -> str:
    try:
        msg = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
            headers_block
        )
        value = msg.get("subject")
        return _printable(str(value)) if value is not None else ""
    except Exception:  # a damaged Subject must not stop the bounce
        return ""


# ---------------------------------------------------------------------- text helpers


def _printable(text: str) -> str:
    """One line of displayable text; undecodable bytes from 8-bit headers become U+FFFD."""
    text = text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "replace").decode(
        "utf-8", "replace"
    )
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _only_escapes(text: str) -> bool:
    # Surrogates from surrogateescape decoding are U+DC80..U+DCFF; any other surrogate cannot
    # be turned back into bytes that way.
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def _ascii(text: str) -> str:
    cleaned = _printable(text)
    return cleaned.encode("ascii", "backslashreplace").decode("ascii")


def _one_line(text: str) -> str:
    # Addresses and host names come from config and envelopes; CR/LF in them would let a
    # value add header fields of its own.
    return "".join(text.split())


def _is_7bit(data: bytes) -> bool:
    if not data.isascii() or b"\0" in data:
        return False
    return all(len(line) <= _MAX_LINE for line in data.split(b"\r\n"))


def _crlf_normalize(data: bytes) -> bytes:
    return b"\r\n".join(_LINE_SPLIT_RE.split(data))


def _crlf_join(lines: Iterable[str]) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode("utf-8")


def _boundary(parts: list[bytes]) -> str:
    while True:
        boundary = f"=_m365relay_{secrets.token_hex(12)}"
        if not any(boundary.encode() in p for p in parts):
            return boundary


def _idstring(queue_id: str) -> str:
    return "dsn." + re.sub(r"[^A-Za-z0-9]", "", queue_id)
