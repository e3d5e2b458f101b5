"""FakeGraph: the Microsoft Graph mail-sending endpoints over real HTTPS, for tests and demos.

Implements what the relay's Graph transport uses, with Graph's rules (the table in
relay/sandbox/rules.py): ``sendMail`` with base64 MIME (413 over ``request_limit``), drafts as
JSON, attachments (3 MB inline limit) and upload sessions (3 to 150 MB, pre-authenticated URL,
exact Content-Range sequence of at most 4 MB a PUT), ``send``, the mailbox's MaxSendSize and 4
concurrent requests per app and mailbox. Tokens are checked against the sandbox's Entra
(audience https://graph.microsoft.com), and each endpoint wants its own application permission
in the ``roles`` claim: Mail.Send for sendMail and send, Mail.ReadWrite for drafts, their
attachments and upload sessions. Like FakeEntra it is a threading HTTP server
(:mod:`relay.sandbox.graphhttp`); recordings are behind one lock. Drafts and upload sessions
are :mod:`relay.sandbox.graphdrafts`; the limits and permissions, :mod:`relay.sandbox.rules`.
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
from dataclasses import dataclass
from email.parser import BytesParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from relay.sandbox.entra import FakeEntra
from relay.sandbox.graphdrafts import Draft, Upload, rebuild, take_range
from relay.sandbox.graphhttp import GraphServer, Reply, graph_error
from relay.sandbox.rules import (
    ATTACHMENT_LIMIT,
    MICROSOFT,
    REQUEST_LIMIT,
    UPLOAD_MAX,
    MailboxLimits,
    graph_permission,
)
from relay.sandbox.tokens import TokenError

log = logging.getLogger("m365relay.sandbox.graph")

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
class _Injection:
    status: int
    code: str
    message: str
    headers: dict[str, str]
    route: str | None
    remaining: int


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
        self._drafts: dict[str, Draft] = {}
        self._uploads: dict[str, Upload] = {}
        self._server: GraphServer | None = None
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
        server = GraphServer((host, port), self, tls)
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
               base: str) -> Reply:
        path = urlsplit(target).path
        reply = self._injected(path) or self._route(method, path, headers, body, base)
        with self._lock:
            self.requests.append((method, path, reply.status, time.monotonic()))
        return reply

    def _injected(self, path: str) -> Reply | None:
        with self._lock:
            for injection in self._injections:
                if injection.route is None or injection.route in path:
                    injection.remaining -= 1
                    if injection.remaining == 0:
                        self._injections.remove(injection)
                    return graph_error(injection.status, injection.code, injection.message,
                                        injection.headers)
        return None

    def _route(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
               base: str) -> Reply:
        if method == "PUT" and path.startswith("/upload/"):
            if "authorization" in headers:
                return graph_error(401, "InvalidAuthenticationToken", "The upload URL is "
                                    "pre-authenticated; do not send an Authorization header.")
            return self._upload(path.removeprefix("/upload/"), headers, body)
        match = _USER_PATH.match(path)
        if match is None:
            return graph_error(400, "BadRequest", f"Resource not found for the segment "
                                f"'{path}'.")
        mailbox, rest = unquote(match.group(1)), match.group(2)
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return graph_error(401, "InvalidAuthenticationToken",
                                "Access token is empty.")
        try:
            claims, app = self.entra.check_graph_token(auth.removeprefix("Bearer "))
        except TokenError as exc:
            return graph_error(401, "InvalidAuthenticationToken", str(exc))
        if not app.may_use(mailbox):
            return graph_error(403, "ErrorAccessDenied", "Access to OData is disabled: "
                                "[RAOP] : Blocked by tenant configured AppOnly AccessPolicy "
                                "settings.")
        roles = claims.get("roles")
        granted = {str(r) for r in roles} if isinstance(roles, list) else set()
        parts = rest.strip("/").split("/")
        needed = graph_permission(method, parts)
        if not needed & granted:
            return graph_error(403, "ErrorAccessDenied", "Access is denied. Check "
                                "credentials and try again.")
        key = (str(claims.get("appid")).casefold(), mailbox.casefold())
        if not self._enter(key):
            return graph_error(429, "ApplicationThrottled", "Application is over its "
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
              headers: Mapping[str, str], body: bytes, base: str) -> Reply:
        if method == "POST" and parts == ["sendMail"]:
            return self._send_mail(mailbox, client_id, headers, body)
        if method == "POST" and parts == ["messages"]:
            return self._create_draft(mailbox, body)
        if len(parts) >= 2 and parts[0] == "messages":
            return self._draft_call(method, parts[1], parts[2:], mailbox=mailbox,
                                    client_id=client_id, body=body, base=base)
        if method == "GET" and parts[0] == "mailFolders":
            return Reply(200, {"id": "AAMkSentItems", "displayName": "Sent Items"})
        return graph_error(400, "BadRequest", f"Unsupported request {method} "
                            f"{'/'.join(parts)}")

    def _send_mail(self, mailbox: str, client_id: str, headers: Mapping[str, str],
                   body: bytes) -> Reply:
        if len(body) > self.request_limit:
            return graph_error(413, "RequestEntityTooLarge", "The request is too large.")
        if not headers.get("content-type", "").startswith("text/plain"):
            return graph_error(415, "UnsupportedMediaType", "sendMail with MIME needs "
                                "Content-Type: text/plain (base64 MIME).")
        try:
            mime = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return graph_error(400, "ErrorMimeContentInvalidBase64String",
                                "Invalid base64 string for MIME content.")
        if self._too_big(len(mime)):
            return _too_big()
        self._record(mime, mailbox, client_id, "sendMail", ())
        return Reply(202)

    def _create_draft(self, mailbox: str, body: bytes) -> Reply:
        if len(body) > self.request_limit:
            return graph_error(413, "RequestEntityTooLarge", "The request is too large.")
        try:
            data = json.loads(body)
        except ValueError:
            return graph_error(400, "UnableToDeserializePostBody", "Body is not JSON.")
        if not isinstance(data, dict):
            return graph_error(400, "UnableToDeserializePostBody", "Body is not an object.")
        draft_id = "AAMk" + secrets.token_urlsafe(24)
        with self._lock:
            self._drafts[draft_id] = Draft(mailbox, data)
        return Reply(201, {"id": draft_id, "isDraft": True, **data})

    def _draft_call(self, method: str, draft_id: str, rest: list[str], *, mailbox: str,
                    client_id: str, body: bytes, base: str) -> Reply:
        draft_id = unquote(draft_id)
        with self._lock:
            draft = self._drafts.get(draft_id)
        if draft is None or draft.mailbox.casefold() != mailbox.casefold():
            return graph_error(404, "ErrorItemNotFound", "The specified object was not found "
                                "in the store.")
        if method == "DELETE" and not rest:
            with self._lock:
                self._drafts.pop(draft_id, None)
            return Reply(204)
        if method == "POST" and rest == ["send"]:
            mime = rebuild(draft)
            if self._too_big(len(mime)):
                return _too_big()  # the draft stays, as in Exchange
            with self._lock:
                self._drafts.pop(draft_id, None)
            names = tuple((str(item.get("name")), len(content))
                          for item, content in draft.attachments)
            self._record(mime, mailbox, client_id, "draft", names)
            return Reply(202)
        if method == "POST" and rest == ["attachments"]:
            item = json.loads(body)
            content = base64.b64decode(item.get("contentBytes", ""), validate=True)
            if len(content) > ATTACHMENT_LIMIT:
                return graph_error(413, "RequestEntityTooLarge",
                                    "Attachments over 3 MB need an upload session.")
            with self._lock:
                draft.attachments.append((item, content))
            return Reply(201, {"id": secrets.token_urlsafe(12), "name": item.get("name")})
        if method == "POST" and rest == ["attachments", "createUploadSession"]:
            item = dict(json.loads(body).get("AttachmentItem") or {})
            size = int(item.get("size", 0))
            if size < ATTACHMENT_LIMIT:
                return graph_error(400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                                    "Attachment size must be at least 3 MB for an upload "
                                    "session; POST smaller ones to attachments.")
            if size > UPLOAD_MAX:
                return graph_error(400, "ErrorAttachmentSizeExceeded", "Attachments can be "
                                    "at most 150 MB.")
            session = secrets.token_urlsafe(18)
            with self._lock:
                self._uploads[session] = Upload(draft_id, item, size)
            return Reply(201, {"uploadUrl": f"{base}/upload/{session}",
                                "expirationDateTime": "2099-01-01T00:00:00Z",
                                "nextExpectedRanges": ["0-"]})
        return graph_error(400, "BadRequest", f"Unsupported request {method} "
                            f"messages/{'/'.join(rest)}")

    def _upload(self, session: str, headers: Mapping[str, str], body: bytes) -> Reply:
        with self._lock:
            upload = self._uploads.get(session)
        if upload is None:
            return graph_error(404, "ItemNotFound", "Upload session not found or expired.")
        reply = take_range(upload, headers.get("content-range", ""), body)
        if reply.status != 201:
            return reply
        with self._lock:
            self._uploads.pop(session, None)
            draft = self._drafts.get(upload.draft_id)
            if draft is not None:
                draft.attachments.append((upload.item, bytes(upload.received)))
        return Reply(201)

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


def _too_big() -> Reply:
    return graph_error(400, "ErrorMessageSizeExceeded", "The message exceeds the maximum "
                        "supported size.")
