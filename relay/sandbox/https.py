"""The HTTPS server under the fake Entra and the fake Graph."""

from __future__ import annotations

import logging
import socket
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("m365relay.sandbox")


class TLSHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that speaks TLS with the sandbox's certificate."""

    daemon_threads = True
    handshake_timeout = 10.0

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 tls: ssl.SSLContext) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.tls = tls
        super().__init__(address, handler)

    def connection_opened(self) -> None:
        """Called once per connection after a successful handshake."""

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the per-request thread, so one slow or broken
        # client cannot stall the accept loop.
        request.settimeout(self.handshake_timeout)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake with %s failed: %s", client_address, exc)
            return
        self.connection_opened()
        handler: Any = self.RequestHandlerClass  # typeshed wants the exact server type
        try:
            handler(conn, client_address, self)
        finally:
            conn.close()
