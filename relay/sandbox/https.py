"""The HTTPS server under the fake Entra and the fake Graph."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
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
        self._open: set[ssl.SSLSocket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def server_close(self) -> None:
        """Stop as a real server process would: kept-alive connections end too, or a client
        would go on talking to a "restarted" sandbox's old instance (old CA, old keys)."""
        super().server_close()
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

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
        with self._open_lock:
            self._open.add(conn)
        try:
            handler(conn, client_address, self)
        finally:
            with self._open_lock:
                self._open.discard(conn)
            conn.close()
