"""The file format of one queued message, unchanged since the first release (a spool written
by any release is read by this one)::

    M365RELAY-SPOOL 1\n
    {"mail_from": ..., "rcpt_tos": [...], ..., "size": N, "sha256": "..."}\n
    <the N bytes of the message as received, header changes applied>

and of its retry state (``state/<id>.json``), and the queue ids (Crockford base32, time
first, so ids sort by arrival)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from typing import Any, BinaryIO

from relay.message import READ_CHUNK, BodyCheck, DeliveryState, Envelope, Message
from relay.spool.base import SpoolError

MAGIC = b"M365RELAY-SPOOL 1\n"
# Bounds how much a garbage file (e.g. one with no newline) can make us read while parsing
# the header; a real envelope with thousands of recipients stays well below this.
MAX_HEADER_BYTES = 4 * 1024 * 1024
# Crockford base32: ASCII-ordered, so fixed-width ids sort by time; no I/L/O/U to misread.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TIME_CHARS = 11  # 55 bits of microseconds since the epoch: good until the year 3111
_RANDOM_CHARS = 4  # 20 random bits keep ids from two processes on one spool apart
ID_LENGTH = _TIME_CHARS + _RANDOM_CHARS
_ID_RE = re.compile(rf"[{_ALPHABET}]{{{ID_LENGTH}}}")
# Messages up to this size are read whole for delivery; larger ones are verified and sent in
# READ_CHUNK pieces straight from the spool file, so a 30 MB scan costs no 30 MB of memory.
INLINE_LIMIT = 1024 * 1024


class _BadFile(Exception):
    """A queue or state file that cannot be trusted; the text says why."""


def _check_id(queue_id: str) -> str:
    # Ids become file names; refusing anything else keeps "../x" from escaping the spool.
    if not _ID_RE.fullmatch(queue_id):
        raise SpoolError(f"{queue_id!r} is not a valid queue id")
    return queue_id


def _b32(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def _encode_header(envelope: Envelope, size: int, sha256: str) -> bytes:
    meta = {
        "mail_from": envelope.mail_from,
        "rcpt_tos": list(envelope.rcpt_tos),
        "account": envelope.account,
        "app": envelope.app,
        "mailbox": envelope.mailbox,
        "bounce_to": envelope.bounce_to,
        "client": envelope.client,
        "received_at": envelope.received_at,
        "original_from": envelope.original_from,
        "is_dsn": envelope.is_dsn,
        "size": size,
        # ~20 ms for 30 MB; lets load() refuse to send silently damaged mail upstream.
        "sha256": sha256,
    }
    # ensure_ascii keeps the line free of raw newlines whatever the addresses contain.
    return MAGIC + json.dumps(meta, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


def _read_header(f: BinaryIO, file_size: int) -> dict[str, Any]:
    """Parse the header and leave ``f`` positioned at the first byte of the message."""
    if f.read(len(MAGIC)) != MAGIC:
        raise _BadFile("missing or unknown spool header")
    line = f.readline(MAX_HEADER_BYTES)
    if not line.endswith(b"\n"):
        raise _BadFile("envelope line is truncated")
    try:
        meta = json.loads(line)
    except ValueError as exc:
        raise _BadFile(f"envelope is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise _BadFile("envelope is not a JSON object")
    size = meta.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _BadFile("envelope has no valid message size")
    actual = file_size - f.tell()
    if actual != size:
        raise _BadFile(f"message is {actual} bytes but {size} were queued")
    digest = meta.get("sha256")
    if digest is not None and not isinstance(digest, str):
        raise _BadFile("envelope checksum is not a string")
    return meta


def _verified(f: BinaryIO, file_size: int, inline_limit: int, owns_file: bool) -> Message:
    f.seek(0)
    meta = _read_header(f, file_size)
    size: int = meta["size"]
    digest = hashlib.sha256()
    check = BodyCheck()
    data: bytes | None = None
    offset = f.tell()
    if size <= inline_limit:
        data = f.read(size)
        digest.update(data)
        check.update(data)
        seen = len(data)
    else:
        # One pass in pieces: memory stays at one piece whatever the message's size.
        buffer = bytearray(READ_CHUNK)
        seen = 0
        while n := os.preadv(f.fileno(), [buffer], offset + seen):
            piece = buffer if n == len(buffer) else buffer[:n]
            digest.update(piece)
            check.update(piece)
            seen += n
    expected = meta.get("sha256")
    if seen != size or (expected is not None and digest.hexdigest() != expected):
        raise _BadFile("content does not match the size and checksum recorded when it was "
                       "queued")
    if data is not None and owns_file:
        f.close()  # all in memory: nothing more to read
    if data is not None:
        return Message(size, check, data)
    return Message(size, check, None, reader=_reader(f, offset),
                   closer=f.close if owns_file else None)


def _reader(f: BinaryIO, offset: int) -> Callable[[int, int], bytes]:
    """Reads a large message's bytes from its spool file, ``offset`` being where it starts."""
    def read(start: int, length: int) -> bytes:
        # pread: no shared file position, so the lock holder's file object is left alone.
        piece = os.pread(f.fileno(), length, offset + start)
        if len(piece) != length:
            raise SpoolError(f"spool file {f.name} shrank while being sent")
        return piece
    return read


def _field(
    meta: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    if key not in meta:
        if default is ...:
            raise _BadFile(f"envelope field {key!r} is missing")
        return default
    value = meta[key]
    # bool is an int subclass; a flag where a number belongs means the file is wrong.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise _BadFile(f"envelope field {key!r} has the wrong type")
    return value


def _envelope_from(meta: dict[str, Any]) -> Envelope:
    rcpts = _field(meta, "rcpt_tos", list)
    if not all(isinstance(r, str) for r in rcpts):
        raise _BadFile("envelope field 'rcpt_tos' has the wrong type")
    return Envelope(
        mail_from=_field(meta, "mail_from", str),
        rcpt_tos=tuple(rcpts),
        account=_field(meta, "account", str),
        app=_field(meta, "app", str),
        mailbox=_field(meta, "mailbox", str),
        bounce_to=_field(meta, "bounce_to", str),
        client=_field(meta, "client", str),
        received_at=float(_field(meta, "received_at", (int, float))),
        original_from=_field(meta, "original_from", str, ""),
        is_dsn=_field(meta, "is_dsn", bool, False),
    )


def _state_from(raw: object) -> DeliveryState:
    if not isinstance(raw, dict):
        raise _BadFile("not a JSON object")
    pending = _field(raw, "pending_rcpts", (list, type(None)), None)
    if pending is not None and not all(isinstance(r, str) for r in pending):
        raise _BadFile("pending_rcpts is not a list of addresses")
    return DeliveryState(
        attempts=_field(raw, "attempts", int, 0),
        next_attempt_at=float(_field(raw, "next_attempt_at", (int, float), 0.0)),
        pending_rcpts=None if pending is None else tuple(pending),
        last_error=_field(raw, "last_error", str, ""),
        bounce_reason=_field(raw, "bounce_reason", str, ""),
    )
