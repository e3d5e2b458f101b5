"""FakeGraph: the Microsoft Graph mail-sending endpoints over real HTTPS, for tests and demos.

Implements what the relay's Graph transport uses, with Graph's rules (the table in
relay/sandbox/rules.py): ``sendMail`` with base64 MIME (413 over ``request_limit``), drafts as
JSON, attachments (3 MB inline limit) and upload sessions (3 to 150 MB, pre-authenticated URL,
exact Content-Range sequence of at most 4 MB a PUT), ``send``, the mailbox's MaxSendSize and 4
concurrent requests per app and mailbox. Tokens are checked against the sandbox's Entra
(audience https://graph.microsoft.com), and each endpoint wants its own application permission
in the ``roles`` claim: Mail.Send for sendMail and send, Mail.ReadWrite for drafts, their
attachments and upload sessions. Like FakeEntra it is a threading HTTP server; recordings are
behind one lock.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.policy
import email.utils
import json
import logging
import re
import secrets
import ssl
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from relay.sandbox.apps import GRAPH_DRAFT_ROLE, GRAPH_READ_ROLES, GRAPH_SEND_ROLE
from relay.sandbox.entra import FakeEntra
from relay.sandbox.https import TLSHTTPServer
from relay.sandbox.rules import MICROSOFT, MailboxLimits
from relay.sandbox.tokens import TokenError

log = logging.getLogger("m365relay.sandbox.graph")

REQUEST_LIMIT = 4 * 1024 * 1024  # Graph's single-request limit for sendMail (§6)
ATTACHMENT_LIMIT = 3 * 1024 * 1024  # larger attachments need an upload session
UPLOAD_MAX = 150 * 1024 * 1024  # an upload session's largest attachment
UPLOAD_RANGE_LIMIT = 4 * 1024 * 1024  # bytes one PUT to an upload session may carry
_MAX_BODY = 64 * 1024 * 1024
_USER_PATH = re.compile(r"^/v1\.0/users/([^/]+)(/.*)$")


@dataclass(frozen=True)
class GraphMessage:
    """A message Graph accepted, in the shape of the fake Exchange's ReceivedMessage."""

    mail_from: str  # the From header's address
    rcpt_tos: tuple[str, ...]  # To, Cc and Bcc addresses: what Graph delivers to
    data: bytes  # the decoded MIME (sendMail) or the MIME rebuilt from the draft
    auth_user: str  # the mailbox in the URL
    client_id: str  # appid claim of the token used
    route: str  # "sendMail" or "draft"
    attachments: tuple[tuple[str, int], ...] = ()  # (name, size) of draft attachments
    path: Path | None = None


@dataclass
class _Draft:
    mailbox: str
    json: dict[str, Any]
    attachments: list[tuple[dict[str, Any], bytes]] = field(default_factory=list)


@dataclass
class _Upload:
    draft_id: str
    item: dict[str, Any]
    size: int
    received: bytearray = field(default_factory=bytearray)


@dataclass
class _Injection:
    status: int
    code: str
    message: str
    headers: dict[str, str]
    route: str | None
    remaining: int


@dataclass
class _Reply:
    status: int
    body: Mapping[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _graph_error(status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, {"error": {"code": code, "message": message, "innerError": {
        "request-id": secrets.token_hex(8), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}}},
        headers or {})


class FakeGraph:
    """Accepts mail through the Graph API, records it, injects faults."""

    def __init__(self, entra: FakeEntra, *, mail_dir: Path | None = None,
                 limits: MailboxLimits = MICROSOFT) -> None:
        self.entra = entra
        self.mail_dir = mail_dir
        self.request_limit = REQUEST_LIMIT
        self.limits = limits
        self._in_flight: dict[tuple[str, str], int] = {}  # (appid, mailbox) -> requests
        self.peak_in_flight = 0
        self._delays: list[list[Any]] = []  # [route, seconds, remaining]
        self.port = 0
        self.messages: list[GraphMessage] = []
        # (method, path, status, time.monotonic() when answered)
        self.requests: list[tuple[str, str, int, float]] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._injections: deque[_Injection] = deque()
        self._drafts: dict[str, _Draft] = {}
        self._uploads: dict[str, _Upload] = {}
        self._server: _GraphServer | None = None
        self._thread: threading.Thread | None = None

    # -- test-facing API ------------------------------------------------------------

    def inject(self, status: int, code: str = "", message: str = "", *, times: int = 1,
               headers: Mapping[str, str] | None = None, route: str | None = None) -> None:
        """Answer the next ``times`` requests (whose path contains ``route``, if given) with
        this Graph error instead."""
        with self._lock:
            self._injections.append(_Injection(status, code, message, dict(headers or {}),
                                               route, times))

    def delay(self, seconds: float, *, times: int = 1, route: str | None = None) -> None:
        """Take ``seconds`` over the next ``times`` authorised requests (whose path contains
        ``route``), counted in flight meanwhile, as a slow Graph does."""
        if seconds <= 0 or times < 1:
            raise ValueError("seconds must be positive and times at least 1")
        with self._lock:
            self._delays.append([route, seconds, times])

    def in_flight(self, mailbox: str) -> int:
        """Requests being handled for ``mailbox`` now, over all apps."""
        with self._lock:
            return sum(n for (_, box), n in self._in_flight.items()
                       if box == mailbox.casefold())

    def _pause(self, path: str) -> None:
        with self._lock:
            delay = next((d for d in self._delays if d[0] is None or d[0] in path), None)
            if delay is not None:
                delay[2] -= 1
                if delay[2] == 0:
                    self._delays.remove(delay)
        if delay is not None:
            time.sleep(delay[1])  # a server thread of its own: nothing else waits

    @property
    def drafts(self) -> int:
        """Drafts created and neither sent nor deleted."""
        with self._lock:
            return len(self._drafts)

    async def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[GraphMessage]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            if time.monotonic() > deadline:
                raise TimeoutError(f"Graph received {len(self.messages)} of {count} messages")
            await asyncio.sleep(0.02)

    def reset(self) -> None:
        with self._lock:
            self.messages.clear()
            self.requests.clear()
            self._injections.clear()
            self._drafts.clear()
            self._uploads.clear()
            self._delays.clear()

    # -- lifecycle ------------------------------------------------------------------

    def start(self, host: str, port: int, tls: ssl.SSLContext) -> int:
        server = _GraphServer((host, port), self, tls)
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"sandbox-graph-{self.port}", daemon=True)
        self._thread.start()
        return self.port

    async def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        if thread is not None:
            await asyncio.to_thread(server.shutdown)
            await asyncio.to_thread(thread.join)
        server.server_close()

    # -- HTTP (server threads) ------------------------------------------------------

    def connection_opened(self) -> None:
        with self._lock:
            self.connections += 1

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes,
               base: str) -> _Reply:
        path = urlsplit(target).path
        reply = self._injected(path) or self._route(method, path, headers, body, base)
        with self._lock:
            self.requests.append((method, path, reply.status, time.monotonic()))
        return reply

    def _injected(self, path: str) -> _Reply | None:
        with self._lock:
            for injection in self._injections:
                if injection.route is None or injection.route in path:
                    injection.remaining -= 1
                    if injection.remaining == 0:
                        self._injections.remove(injection)
                    return _graph_error(injection.status, injection.code, injection.message,
                                        injection.headers)
        return None

    def _route(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
               base: str) -> _Reply:
        if method == "PUT" and path.startswith("/upload/"):
            if "authorization" in headers:
                return _graph_error(401, "InvalidAuthenticationToken", "The upload URL is "
                                    "pre-authenticated; do not send an Authorization header.")
            return self._upload(path.removeprefix("/upload/"), headers, body)
        match = _USER_PATH.match(path)
        if match is None:
            return _graph_error(400, "BadRequest", f"Resource not found for the segment "
                                f"'{path}'.")
        mailbox, rest = unquote(match.group(1)), match.group(2)
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return _graph_error(401, "InvalidAuthenticationToken",
                                "Access token is empty.")
        try:
            claims, app = self.entra.check_graph_token(auth.removeprefix("Bearer "))
        except TokenError as exc:
            return _graph_error(401, "InvalidAuthenticationToken", str(exc))
        if not app.may_use(mailbox):
            return _graph_error(403, "ErrorAccessDenied", "Access to OData is disabled: "
                                "[RAOP] : Blocked by tenant configured AppOnly AccessPolicy "
                                "settings.")
        roles = claims.get("roles")
        granted = {str(r) for r in roles} if isinstance(roles, list) else set()
        parts = rest.strip("/").split("/")
        needed = _permission(method, parts)
        if not needed & granted:
            return _graph_error(403, "ErrorAccessDenied", "Access is denied. Check "
                                "credentials and try again.")
        key = (str(claims.get("appid")).casefold(), mailbox.casefold())
        if not self._enter(key):
            return _graph_error(429, "ApplicationThrottled", "Application is over its "
                                "MailboxConcurrency limit.", {"Retry-After": "1"})
        try:
            self._pause(path)
            return self._call(method, parts, mailbox=mailbox, client_id=str(claims.get("appid")),
                              headers=headers, body=body, base=base)
        finally:
            self._leave(key)

    def _enter(self, key: tuple[str, str]) -> bool:
        """Count one request in flight for (app, mailbox); False over the concurrency limit."""
        with self._lock:
            count = self._in_flight.get(key, 0)
            if 0 < self.limits.graph_concurrency <= count:
                return False
            self._in_flight[key] = count + 1
            self.peak_in_flight = max(self.peak_in_flight, count + 1)
            return True

    def _leave(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._in_flight[key] -= 1

    def _call(self, method: str, parts: list[str], *, mailbox: str, client_id: str,
              headers: Mapping[str, str], body: bytes, base: str) -> _Reply:
        if method == "POST" and parts == ["sendMail"]:
            return self._send_mail(mailbox, client_id, headers, body)
        if method == "POST" and parts == ["messages"]:
            return self._create_draft(mailbox, body)
        if len(parts) >= 2 and parts[0] == "messages":
            return self._draft_call(method, parts[1], parts[2:], mailbox=mailbox,
                                    client_id=client_id, body=body, base=base)
        if method == "GET" and parts[0] == "mailFolders":
            return _Reply(200, {"id": "AAMkSentItems", "displayName": "Sent Items"})
        return _graph_error(400, "BadRequest", f"Unsupported request {method} "
                            f"{'/'.join(parts)}")

    def _send_mail(self, mailbox: str, client_id: str, headers: Mapping[str, str],
                   body: bytes) -> _Reply:
        if len(body) > self.request_limit:
            return _graph_error(413, "RequestEntityTooLarge", "The request is too large.")
        if not headers.get("content-type", "").startswith("text/plain"):
            return _graph_error(415, "UnsupportedMediaType", "sendMail with MIME needs "
                                "Content-Type: text/plain (base64 MIME).")
        try:
            mime = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return _graph_error(400, "ErrorMimeContentInvalidBase64String",
                                "Invalid base64 string for MIME content.")
        if self._too_big(len(mime)):
            return _too_big()
        self._record(mime, mailbox, client_id, "sendMail", ())
        return _Reply(202)

    def _create_draft(self, mailbox: str, body: bytes) -> _Reply:
        if len(body) > self.request_limit:
            return _graph_error(413, "RequestEntityTooLarge", "The request is too large.")
        try:
            data = json.loads(body)
        except ValueError:
            return _graph_error(400, "UnableToDeserializePostBody", "Body is not JSON.")
        if not isinstance(data, dict):
            return _graph_error(400, "UnableToDeserializePostBody", "Body is not an object.")
        draft_id = "AAMk" + secrets.token_urlsafe(24)
        with self._lock:
            self._drafts[draft_id] = _Draft(mailbox, data)
        return _Reply(201, {"id": draft_id, "isDraft": True, **data})

    def _draft_call(self, method: str, draft_id: str, rest: list[str], *, mailbox: str,
                    client_id: str, body: bytes, base: str) -> _Reply:
        draft_id = unquote(draft_id)
        with self._lock:
            draft = self._drafts.get(draft_id)
        if draft is None or draft.mailbox.casefold() != mailbox.casefold():
            return _graph_error(404, "ErrorItemNotFound", "The specified object was not found "
                                "in the store.")
        if method == "DELETE" and not rest:
            with self._lock:
                self._drafts.pop(draft_id, None)
            return _Reply(204)
        if method == "POST" and rest == ["send"]:
            mime = _rebuild(draft)
            if self._too_big(len(mime)):
                return _too_big()  # the draft stays, as in Exchange
            with self._lock:
                self._drafts.pop(draft_id, None)
            names = tuple((str(item.get("name")), len(content))
                          for item, content in draft.attachments)
            self._record(mime, mailbox, client_id, "draft", names)
            return _Reply(202)
        if method == "POST" and rest == ["attachments"]:
            item = json.loads(body)
            content = base64.b64decode(item.get("contentBytes", ""), validate=True)
            if len(content) > ATTACHMENT_LIMIT:
                return _graph_error(413, "RequestEntityTooLarge",
                                    "Attachments over 3 MB need an upload session.")
            with self._lock:
                draft.attachments.append((item, content))
            return _Reply(201, {"id": secrets.token_urlsafe(12), "name": item.get("name")})
        if method == "POST" and rest == ["attachments", "createUploadSession"]:
            item = dict(json.loads(body).get("AttachmentItem") or {})
            size = int(item.get("size", 0))
            if size < ATTACHMENT_LIMIT:
                return _graph_error(400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                                    "Attachment size must be at least 3 MB for an upload "
                                    "session; POST smaller ones to attachments.")
            if size > UPLOAD_MAX:
                return _graph_error(400, "ErrorAttachmentSizeExceeded", "Attachments can be "
                                    "at most 150 MB.")
            session = secrets.token_urlsafe(18)
            with self._lock:
                self._uploads[session] = _Upload(draft_id, item, size)
            return _Reply(201, {"uploadUrl": f"{base}/upload/{session}",
                                "expirationDateTime": "2099-01-01T00:00:00Z",
                                "nextExpectedRanges": ["0-"]})
        return _graph_error(400, "BadRequest", f"Unsupported request {method} "
                            f"messages/{'/'.join(rest)}")

    def _upload(self, session: str, headers: Mapping[str, str], body: bytes) -> _Reply:
        with self._lock:
            upload = self._uploads.get(session)
        if upload is None:
            return _graph_error(404, "ItemNotFound", "Upload session not found or expired.")
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", headers.get("content-range", ""))
        if match is None:
            return _graph_error(400, "InvalidContentRange", "Content-Range is missing.")
        start, end, total = (int(g) for g in match.groups())
        if len(body) > UPLOAD_RANGE_LIMIT:
            return _graph_error(413, "RequestEntityTooLarge", "Upload at most 4 MB per "
                                "request.")
        if start != len(upload.received) or end - start + 1 != len(body) \
                or total != upload.size:
            return _graph_error(416, "InvalidRange", f"Expected range {len(upload.received)}- "
                                f"of {upload.size}, got {start}-{end}/{total}.")
        upload.received += body
        if len(upload.received) < upload.size:
            return _Reply(200, {"expirationDateTime": "2099-01-01T00:00:00Z",
                                "nextExpectedRanges": [f"{len(upload.received)}-"]})
        with self._lock:
            self._uploads.pop(session, None)
            draft = self._drafts.get(upload.draft_id)
            if draft is not None:
                draft.attachments.append((upload.item, bytes(upload.received)))
        return _Reply(201)

    def _too_big(self, size: int) -> bool:
        return 0 < self.limits.max_send_size < size

    def _record(self, mime: bytes, mailbox: str, client_id: str, route: str,
                attachments: tuple[tuple[str, int], ...]) -> None:
        head = BytesParser(policy=email.policy.compat32).parsebytes(mime, headersonly=True)
        rcpts = tuple(addr for _, addr in email.utils.getaddresses(
            [str(v) for name in ("to", "cc", "bcc") for v in head.get_all(name, [])]) if addr)
        sender = email.utils.parseaddr(str(head.get("from", "")))[1]
        path = None
        with self._lock:
            if self.mail_dir is not None:
                self.mail_dir.mkdir(parents=True, exist_ok=True)
                path = self.mail_dir / f"graph-{len(self.messages) + 1:06d}.eml"
                path.write_bytes(mime)
            self.messages.append(GraphMessage(sender, rcpts, mime, mailbox, client_id, route,
                                              attachments, path))


def _too_big() -> _Reply:
    return _graph_error(400, "ErrorMessageSizeExceeded", "The message exceeds the maximum "
                        "supported size.")


def _permission(method: str, parts: list[str]) -> frozenset[str]:
    """The application permissions any one of which lets a token make this request (Graph's
    permission tables: user-sendmail, message-send, user-post-messages, message-post-
    attachments, attachment-createuploadsession, message-delete, mailfolder-get)."""
    if (method, parts) == ("POST", ["sendMail"]) or (
            method == "POST" and len(parts) == 3 and parts[0] == "messages"
            and parts[2] == "send"):
        return frozenset({GRAPH_SEND_ROLE})
    if method == "GET":
        return GRAPH_READ_ROLES
    return frozenset({GRAPH_DRAFT_ROLE})  # drafts, their attachments and upload sessions


def _rebuild(draft: _Draft) -> bytes:
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


class _GraphServer(TLSHTTPServer):
    handshake_timeout = 30.0

    def __init__(self, address: tuple[str, int], graph: FakeGraph, tls: ssl.SSLContext) -> None:
        self.graph = graph
        super().__init__(address, _GraphHandler, tls)

    def connection_opened(self) -> None:
        self.graph.connection_opened()


class _GraphHandler(BaseHTTPRequestHandler):
    server: _GraphServer
    protocol_version = "HTTP/1.1"  # keep-alive, as Graph: the relay reuses its connection

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_GET

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self.close_connection = True
            self._send(_graph_error(413, "RequestEntityTooLarge", "The request is too large."))
            return
        body = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        base = f"https://localhost:{self.server.server_address[1]}"
        try:
            reply = self.server.graph.handle(self.command, self.path, headers, body, base)
        except Exception:  # a bug in the fake must still answer
            log.exception("sandbox Graph failed on %s %s", self.command, self.path)
            reply = _graph_error(500, "generalException", "sandbox error")
        self._send(reply)

    def _send(self, reply: _Reply) -> None:
        payload = b"" if reply.body is None else json.dumps(reply.body).encode("utf-8")
        self.send_response(reply.status)
        if reply.body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("request-id", secrets.token_hex(8))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
