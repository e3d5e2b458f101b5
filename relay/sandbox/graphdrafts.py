"""Drafts as the fake Graph keeps them between requests: the JSON message, its attachments,
an upload session's bytes so far, and the MIME Exchange builds from a draft when it is sent
(enough to check what the relay sent)."""

from __future__ import annotations

import email.policy
import email.utils
import re
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from relay.sandbox.graphhttp import Reply, graph_error
from relay.sandbox.rules import UPLOAD_RANGE_LIMIT


@dataclass
class Draft:
    mailbox: str
    json: dict[str, Any]
    attachments: list[tuple[dict[str, Any], bytes]] = field(default_factory=list)


@dataclass
class Upload:
    draft_id: str
    item: dict[str, Any]
    size: int
    received: bytearray = field(default_factory=bytearray)


def rebuild(draft: Draft) -> bytes:
    """The MIME Exchange would build from a JSON draft: enough to check what the relay sent."""
    data = draft.json
    msg = EmailMessage()

    def addresses(key: str) -> str:
        return ", ".join(email.utils.formataddr((r["emailAddress"].get("name", ""),
                                                 r["emailAddress"]["address"]))
                         for r in data.get(key) or [])

    sender = data.get("from", {}).get("emailAddress", {}).get("address") or draft.mailbox
    msg["From"] = sender
    for header, key in (("To", "toRecipients"), ("Cc", "ccRecipients"),
                        ("Bcc", "bccRecipients"), ("Reply-To", "replyTo")):
        if data.get(key):
            msg[header] = addresses(key)
    msg["Subject"] = data.get("subject", "")
    if data.get("internetMessageId"):
        msg["Message-ID"] = data["internetMessageId"]
    for header in data.get("internetMessageHeaders") or []:
        msg[header["name"]] = header["value"]
    body = data.get("body") or {}
    subtype = "html" if str(body.get("contentType", "")).lower() == "html" else "plain"
    msg.set_content(str(body.get("content", "")), subtype=subtype)
    for item, content in draft.attachments:
        maintype, _, subtype = str(item.get("contentType") or
                                   "application/octet-stream").partition("/")
        msg.add_attachment(content, maintype=maintype, subtype=subtype or "octet-stream",
                           filename=str(item.get("name", "attachment")))
    return msg.as_bytes(policy=email.policy.SMTP)


def take_range(upload: Upload, content_range: str, body: bytes) -> Reply:
    """One PUT to an upload session, in Graph's exact Content-Range sequence: 200 with the
    next range expected, 201 once the attachment is complete (the caller attaches it to its
    draft), or Graph's refusal."""
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", content_range)
    if match is None:
        return graph_error(400, "InvalidContentRange", "Content-Range is missing.")
    start, end, total = (int(g) for g in match.groups())
    if len(body) > UPLOAD_RANGE_LIMIT:
        return graph_error(413, "RequestEntityTooLarge", "Upload at most 4 MB per request.")
    if start != len(upload.received) or end - start + 1 != len(body) or total != upload.size:
        return graph_error(416, "InvalidRange", f"Expected range {len(upload.received)}- "
                           f"of {upload.size}, got {start}-{end}/{total}.")
    upload.received += body
    if len(upload.received) < upload.size:
        return Reply(200, {"expirationDateTime": "2099-01-01T00:00:00Z",
                           "nextExpectedRanges": [f"{len(upload.received)}-"]})
    return Reply(201)
