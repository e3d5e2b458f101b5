"""The Microsoft Graph calls behind :class:`relay.upstream.graph.GraphConnection`, synchronous
(they run in a worker thread, on one ``requests`` session per connection so TCP/TLS is reused).

Small messages: ``POST /v1.0/users/{mailbox}/sendMail`` with the base64 of the whole MIME
message. Graph has no large-MIME upload (a MIME body in one request is capped at about 4 MB),
so larger messages are converted: the MIME is parsed, a draft is created as JSON (subject, body,
recipients, Message-ID, X- headers), attachments up to 3 MB are added in one request each and
larger ones through an upload session in chunks, then the draft is sent.
"""

from __future__ import annotations

import base64
import email.policy
import email.utils
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.message import EmailMessage, Message
from email.parser import BytesParser
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    import requests  # the caller's session brings it; importing it here would delay start-up

log = logging.getLogger("m365relay.graph")

# Attachments up to this size go in the attachment request itself (Graph's documented 3 MB).
INLINE_ATTACHMENT_LIMIT = 3 * 1024 * 1024
# Upload session chunks must be multiples of 320 KiB; 10 of them stays under 4 MB.
UPLOAD_CHUNK = 10 * 320 * 1024
# UNVERIFIED how many custom headers Graph keeps on a JSON message; more are dropped (logged).
MAX_CUSTOM_HEADERS = 5


class GraphHTTPError(Exception):
    """Graph answered with an error status; the body's ``error.code``/``message`` if any."""

    def __init__(self, status: int, code: str, message: str, retry_after: float,
                 request: str) -> None:
        super().__init__(f"{request} answered HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.request = request


def retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); 0 if absent."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when.timestamp() - time.time())


def with_envelope_recipients(data: bytes, rcpts: Sequence[str]) -> tuple[bytes, list[str]]:
    """Graph delivers to the message's To/Cc/Bcc, not to an SMTP envelope: envelope recipients
    missing from those headers are added as a Bcc header (Exchange never shows Bcc to
    recipients). Returns the message and the header addresses that are *not* envelope
    recipients (Graph will deliver to them too; the caller logs it)."""
    head = BytesParser(policy=email.policy.compat32).parsebytes(data, headersonly=True)
    fields = [str(v) for name in ("to", "cc", "bcc") for v in head.get_all(name, [])]
    present = {addr.casefold() for _, addr in email.utils.getaddresses(fields) if addr}
    wanted = {r.casefold() for r in rcpts}
    missing = [r for r in rcpts if r.casefold() not in present]
    extra = sorted(present - wanted)
    if missing:
        newline = b"\r\n" if b"\r\n" in data[:4096] else b"\n"
        folded = (b"," + newline + b" ").join(r.encode("utf-8") for r in missing)
        data = b"Bcc: " + folded + newline + data
    return data, extra


@dataclass(frozen=True)
class _Attachment:
    name: str
    content_type: str
    content: bytes
    inline: bool
    content_id: str


class GraphClient:
    """One mailbox's Graph calls with one token; raises GraphHTTPError or requests errors."""

    def __init__(self, session: requests.Session, endpoint: str, mailbox: str, token: str,
                 request_limit: int) -> None:
        self._session = session
        self._base = f"{endpoint}/v1.0/users/{quote(mailbox, safe='@')}"
        self._mailbox = mailbox
        self._token = token
        self._limit = request_limit

    def send(self, data: bytes) -> str:
        """Send the MIME message; returns a reply line for the maillog."""
        body = base64.b64encode(data)
        if len(body) <= self._limit:
            response = self._call("POST", "/sendMail", data=body,
                                  content_type="text/plain")
            return f"202 Accepted by Graph sendMail ({_request_id(response)})"
        return self._send_large(data)

    def check(self) -> None:
        """A request that needs a valid token and an existing mailbox, for doctor. Reading
        the mailbox needs Mail.Read; with only Mail.Send Graph answers 403 ErrorAccessDenied
        for that, so the caller treats a 403 here as "token accepted"."""
        self._call("GET", "/mailFolders/sentitems?$select=id")

    # --- large messages --------------------------------------------------------------

    def _send_large(self, data: bytes) -> str:
        message = BytesParser(policy=email.policy.default).parsebytes(data)
        assert isinstance(message, EmailMessage)  # noqa: S101 - policy.default gives these
        draft, attachments = _draft(message, self._mailbox)
        created = self._call("POST", "/messages", json=draft).json()
        draft_id = quote(str(created["id"]), safe="")
        try:
            for attachment in attachments:
                self._attach(draft_id, attachment)
            response = self._call("POST", f"/messages/{draft_id}/send")
        except BaseException:
            self._discard(draft_id)
            raise
        return (f"202 Accepted by Graph as a draft with {len(attachments)} attachment(s), "
                f"{len(data)} bytes ({_request_id(response)})")

    def _attach(self, draft_id: str, item: _Attachment) -> None:
        size = len(item.content)
        if size <= INLINE_ATTACHMENT_LIMIT:
            self._call("POST", f"/messages/{draft_id}/attachments", json={
                "@odata.type": "#microsoft.graph.fileAttachment",
                "name": item.name, "contentType": item.content_type, "isInline": item.inline,
                "contentId": item.content_id or None,
                "contentBytes": base64.b64encode(item.content).decode("ascii"),
            })
            return
        session = self._call("POST", f"/messages/{draft_id}/attachments/createUploadSession",
                             json={"AttachmentItem": {
                                 "attachmentType": "file", "name": item.name, "size": size,
                                 "contentType": item.content_type, "isInline": item.inline,
                                 "contentId": item.content_id or None,
                             }}).json()
        url = str(session["uploadUrl"])
        for start in range(0, size, UPLOAD_CHUNK):
            chunk = item.content[start:start + UPLOAD_CHUNK]
            end = start + len(chunk) - 1
            # The upload URL is pre-authenticated: Graph refuses a request that also carries
            # the bearer token, so this one goes without it.
            response = self._session.put(url, data=chunk, headers={
                "Content-Range": f"bytes {start}-{end}/{size}",
                "Content-Type": "application/octet-stream",
            })
            if response.status_code not in (200, 201):
                raise _http_error(response, f"PUT upload session of {item.name!r}")

    def _discard(self, draft_id: str) -> None:
        import requests

        try:
            self._call("DELETE", f"/messages/{draft_id}")
        except (GraphHTTPError, requests.RequestException) as exc:
            log.warning("could not delete the unsent Graph draft in %s: %s (delete it from "
                        "Drafts by hand)", self._mailbox, exc)

    # --- plumbing --------------------------------------------------------------------

    def _call(self, method: str, path: str, *, json: Any = None, data: bytes | None = None,
              content_type: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {self._token}"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        response = self._session.request(method, self._base + path, json=json, data=data,
                                         headers=headers)
        if response.status_code >= 300:
            where = path.partition("?")[0]
            raise _http_error(response, f"{method} /users/{self._mailbox}{where}")
        return response


def _request_id(response: requests.Response) -> str:
    return f"request-id {response.headers.get('request-id', 'none')}"


def _http_error(response: requests.Response, request: str) -> GraphHTTPError:
    code, message = "", response.reason or ""
    try:
        error = response.json().get("error", {})
        code, message = str(error.get("code", "")), str(error.get("message", message))
    except (ValueError, AttributeError):
        pass
    return GraphHTTPError(response.status_code, code, message,
                          retry_after(response.headers.get("Retry-After")), request)


def _addresses(message: Message, name: str) -> list[dict[str, Any]]:
    values = [str(v) for v in message.get_all(name, [])]
    return [{"emailAddress": {"address": addr, **({"name": display} if display else {})}}
            for display, addr in email.utils.getaddresses(values) if addr]


def _draft(message: EmailMessage, mailbox: str) -> tuple[dict[str, Any], list[_Attachment]]:
    html, plain = message.get_body(("html",)), message.get_body(("plain",))
    body_part = html or plain
    bodies = {id(p) for p in (html, plain) if p is not None}
    content = body_part.get_content() if isinstance(body_part, EmailMessage) else ""
    draft: dict[str, Any] = {
        "subject": str(message.get("subject", "")),
        "body": {"contentType": "HTML" if body_part is html and html else "Text",
                 "content": content},
        "toRecipients": _addresses(message, "to"),
        "ccRecipients": _addresses(message, "cc"),
        "bccRecipients": _addresses(message, "bcc"),
    }
    reply_to = _addresses(message, "reply-to")
    if reply_to:
        draft["replyTo"] = reply_to
    sender = _addresses(message, "from")
    if sender and sender[0]["emailAddress"]["address"].casefold() != mailbox.casefold():
        draft["from"] = sender[0]  # needs SendAs, as over SMTP
    if message.get("message-id"):
        draft["internetMessageId"] = str(message["message-id"]).strip()
    custom = [{"name": k, "value": str(v)} for k, v in message.items()
              if k.lower().startswith("x-")]
    if len(custom) > MAX_CUSTOM_HEADERS:
        log.info("large message: keeping %d of %d X- headers", MAX_CUSTOM_HEADERS, len(custom))
    if custom:
        draft["internetMessageHeaders"] = custom[:MAX_CUSTOM_HEADERS]
    attachments = [_attachment(part, i) for i, part in enumerate(_leaves(message))
                   if id(part) not in bodies]
    return draft, attachments


def _leaves(part: Message) -> Iterator[Message]:
    """Non-multipart parts, not descending into attached messages (they stay one .eml)."""
    if part.is_multipart() and part.get_content_type() != "message/rfc822":
        for sub in part.get_payload():
            if isinstance(sub, Message):
                yield from _leaves(sub)
    else:
        yield part


def _attachment(part: Message, index: int) -> _Attachment:
    content_type = part.get_content_type()
    if content_type == "message/rfc822":
        inner = part.get_payload(0)
        content = inner.as_bytes() if isinstance(inner, Message) else b""
    else:
        payload = part.get_payload(decode=True)
        content = payload if isinstance(payload, bytes) else b""
    name = part.get_filename() or (f"message-{index}.eml" if content_type == "message/rfc822"
                                   else f"attachment-{index}")
    cid = str(part.get("content-id", "")).strip().strip("<>")
    inline = bool(cid) and part.get_content_disposition() != "attachment"
    return _Attachment(name, content_type, content, inline, cid)
