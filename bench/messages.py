"""Benchmark messages, and the check that what arrived is what was accepted.

Each message carries an ``X-Bench-Id`` header, a body with lines that need dot-stuffing and
8-bit UTF-8, and random text so no two bodies are alike. The verdict is strict: every accepted
message arrives exactly once, at the right mailbox and recipient, with a byte-identical body and
every original header field byte-identical and in order; fields a hop adds (``Received:``) are
allowed and listed. The header splitter here is deliberately our own, not
relay.policy.rewrite's, so a bug in the code under test cannot hide in the checker.
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
from collections import Counter
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

RCPT = "bench-rcpt@example.org"
_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_ID = re.compile(rb"^X-Bench-Id:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)
_SPECIAL_LINES = (
    b".a line that starts with a dot (dot-stuffing)",
    b"..two dots",
    b".",  # a lone dot inside the body must not end DATA
    "8-bit: Gr\u00fc\u00dfe aus dem Scanner \u2014 \u00e9t\u00e9 \u2603".encode(),
)

_LAST_LINE = b".final line starting with a dot"


@dataclass(frozen=True)
class Message:
    id: str
    mailbox: str
    data: bytes
    head_fields: tuple[bytes, ...]
    body_sha256: str


def mailbox_name(index: int) -> str:
    return f"bench-mailbox-{index}@contoso.example"


def make(run: str, seq: int, mailbox: str, size: int, rng: random.Random) -> Message:
    """A message of about ``size`` bytes (headers included) for ``mailbox``."""
    message_id = f"{run}-{seq}"
    head = (
        f"From: Bench Device <{mailbox}>\r\n"
        f"To: <{RCPT}>\r\n"
        f"Subject: benchmark message {message_id}\r\n"
        f"Message-ID: <{message_id}@bench.example>\r\n"
        "Date: Mon, 3 Mar 2025 10:00:00 +0000\r\n"
        f"X-Bench-Id: {message_id}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
    ).encode()
    body = _body(max(size - len(head) - 2, 256), rng)
    data = head + b"\r\n" + body
    return Message(message_id, mailbox, data, tuple(split_fields(head)),
                   hashlib.sha256(body).hexdigest())


def _body(size: int, rng: random.Random) -> bytes:
    # base64 of random bytes, as 76-character lines: cheap to make at 30 MB, and every line
    # differs. A few special lines go near the start (and one at the end).
    size -= sum(len(s) + 2 for s in _SPECIAL_LINES) + len(_LAST_LINE) + 2
    raw_len = (size * 76 // 78) * 3 // 4  # 76 characters of text per 78-byte line
    text = base64.b64encode(rng.randbytes(raw_len))
    lines = [text[i:i + 76] for i in range(0, len(text), 76)]
    for n, special in enumerate(_SPECIAL_LINES):
        lines.insert(min(2 + 3 * n, len(lines)), special)
    lines.append(_LAST_LINE)
    return b"\r\n".join(lines) + b"\r\n"


def split_fields(head: bytes) -> list[bytes]:
    """Header fields, each with its folded continuation lines and CRLF."""
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def field_name(raw: bytes) -> str:
    match = _FIELD_NAME.match(raw)
    return match.group(1).decode("ascii").lower() if match else "?"


@dataclass
class Verdict:
    expected: int = 0          # accepted by the target (2xx to the client)
    delivered: int = 0         # distinct accepted messages found in the fake store
    lost: int = 0              # accepted, never arrived
    duplicates: int = 0        # arrived more than once (extra copies)
    corrupted: int = 0         # body, header, mailbox or recipient differ
    unexpected: int = 0        # arrived although the client never got a 2xx (or unknown id)
    added_headers: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.corrupted or self.unexpected)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "expected": self.expected, "delivered": self.delivered,
                "lost": self.lost, "duplicates": self.duplicates, "corrupted": self.corrupted,
                "unexpected": self.unexpected, "added_headers": dict(self.added_headers),
                "problems": self.problems[:10]}


def verify(sent: dict[str, Message], accepted: AbstractSet[str], received: list[dict[str, Any]],
           attempted_but_unacknowledged: AbstractSet[str] = frozenset()) -> Verdict:
    """Compare the fake's store with what the target acknowledged.

    ``attempted_but_unacknowledged``: ids whose outcome the client could not know (the
    connection dropped after the final dot); arriving once is fine for those, not twice.
    """
    verdict = Verdict(expected=len(accepted))
    seen: Counter[str] = Counter()
    for item in received:
        head = item["head"].encode("latin-1")
        match = _ID.search(head)
        message_id = match.group(1).decode("ascii", "replace") if match else "?"
        seen[message_id] += 1
        original = sent.get(message_id)
        if original is None or (message_id not in accepted
                                and message_id not in attempted_but_unacknowledged):
            verdict.unexpected += 1
            verdict.problems.append(f"{message_id}: arrived but was never acknowledged")
            continue
        if seen[message_id] > 1:
            verdict.duplicates += 1
            verdict.problems.append(f"{message_id}: arrived {seen[message_id]} times")
            continue
        problem = _compare(original, item, verdict.added_headers)
        if problem:
            verdict.corrupted += 1
            verdict.problems.append(f"{message_id}: {problem}")
    for message_id in accepted:
        if seen[message_id]:
            verdict.delivered += 1
        else:
            verdict.lost += 1
            verdict.problems.append(f"{message_id}: acknowledged but never arrived")
    return verdict


def _compare(original: Message, item: dict[str, Any], added: Counter[str]) -> str:
    if item["body_sha256"] != original.body_sha256:
        return "body differs"
    if item["mailbox"].lower() != original.mailbox.lower():
        return f"sent as {item['mailbox']}, expected {original.mailbox}"
    if item["rcpt"] != [RCPT]:
        return f"recipients {item['rcpt']}, expected [{RCPT}]"
    fields = split_fields(item["head"].encode("latin-1"))
    # The original fields must appear byte-identical and in order; anything else was added.
    want = iter(original.head_fields)
    pending = next(want, None)
    for raw in fields:
        if pending is not None and raw == pending:
            pending = next(want, None)
        else:
            added[field_name(raw)] += 1
    if pending is not None:
        return f"header field changed or missing: {pending[:60]!r}"
    return ""
