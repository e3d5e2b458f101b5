"""The HTTP side of the fake Microsoft Graph: a threaded TLS server with keep-alive (the
relay reuses its connection) that hands each request to
:meth:`relay.sandbox.graph.FakeGraph.handle`, the shape of a reply and Graph's JSON error."""

from __future__ import annotations

import json
import logging
import secrets
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol

from relay.sandbox.https import TLSHTTPServer

log = logging.getLogger("m365relay.sandbox.graph")

MAX_BODY = 64 * 1024 * 1024


@dataclass
class Reply:
    status: int
    body: Mapping[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def graph_error(status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"error": {"code": code, "message": message, "innerError": {
        "request-id": secrets.token_hex(8), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}}},
        headers or {})


class GraphApp(Protocol):
    """What the server calls (FakeGraph), from its request threads."""

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes,
               base: str) -> Reply: ...

    def connection_opened(self) -> None: ...


class GraphServer(TLSHTTPServer):
    handshake_timeout = 30.0

    def __init__(self, address: tuple[str, int], graph: GraphApp, tls: ssl.SSLContext) -> None:
        self.graph = graph
        super().__init__(address, GraphHandler, tls)

    def connection_opened(self) -> None:
        self.graph.connection_opened()


class GraphHandler(BaseHTTPRequestHandler):
    server: GraphServer
    protocol_version = "HTTP/1.1"  # keep-alive, as Graph: the relay reuses its connection

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_GET

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            self._send(graph_error(413, "RequestEntityTooLarge", "The request is too large."))
            return
        body = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        base = f"https://localhost:{self.server.server_address[1]}"
        try:
            reply = self.server.graph.handle(self.command, self.path, headers, body, base)
        except Exception:  # a bug in the fake must still answer
            log.exception("sandbox Graph failed on %s %s", self.command, self.path)
            reply = graph_error(500, "generalException", "sandbox error")
        self._send(reply)

    def _send(self, reply: Reply) -> None:
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
