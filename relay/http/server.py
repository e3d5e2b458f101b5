"""The optional HTTP endpoint: ``/healthz``, ``/readyz``, ``/metrics``, the status page ``/``
with its script and style, and its JSON API ``/api/status``.

A few read-only GET routes do not justify a web framework: this is a minimal HTTP/1.1 server on
asyncio streams (one request per connection, bounded head, timeouts), running in the relay's
own event loop so every answer reflects the live state. Off unless the config has an ``http``
section; loopback by default. The page and the API answer ``http.networks``, ``/metrics``
``http.metrics_networks``, the probes both; ``http.tls`` and ``http.basic_auth_users``
(relay/webguard.py) add TLS and passwords as a Prometheus exporter's web config does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder

from relay.config.records import HttpSettings
from relay.config.values import IPNetwork
from relay.http import statuspage
from relay.http.guard import (
    BasicAuth,
    ReloadingTls,
    TooManyFailures,
    certificate_path,
    exposure_warnings,
)
from relay.http.metrics import RelayCollector, new_registry, read_queue

if TYPE_CHECKING:
    from relay.http.view import RelayView

log = logging.getLogger("m365relay.http")

_MAX_HEAD = 16 * 1024
_REQUEST_TIMEOUT = 10.0
_PROBE_TIMEOUT = 5.0
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 429: "Too Many Requests",
            405: "Method Not Allowed", 500: "Internal Server Error", 503: "Service Unavailable"}
_TEXT = "text/plain; charset=utf-8"
_PROBES = {"/healthz", "/readyz"}  # for kubelet and load balancers: no password
_PAGE_HEADERS = {
    # Script and style only from same-origin files: an injected inline script cannot run.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class WebServer:
    def __init__(self, relay: RelayView, settings: HttpSettings) -> None:
        self.relay = relay
        self.settings = settings
        self.collector = RelayCollector(relay, http_certificate=certificate_path(settings))
        self.registry = new_registry(self.collector)
        self.address: tuple[str, int] | None = None
        self.tls = ReloadingTls(settings.tls) if settings.tls is not None else None
        self.auth = (BasicAuth(settings.basic_auth_users, relay.config.auth_limits)
                     if settings.basic_auth_users else None)
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def start(self) -> tuple[str, int]:
        """Bind (port 0 picks a free port) and serve; raises OSError when the port is taken."""
        self._server = await asyncio.start_server(
            self._serve, host=self.settings.host, port=self.settings.port, limit=_MAX_HEAD,
            reuse_address=True, ssl=self.tls.context if self.tls is not None else None,
            ssl_handshake_timeout=_REQUEST_TIMEOUT if self.tls is not None else None)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = (host, port)
        scheme = "https" if self.tls is not None else "http"
        log.info("http: status page, /metrics, /healthz and /readyz at %s://%s:%d/%s", scheme,
                 f"[{host}]" if ":" in host else host, port,
                 " (basic auth)" if self.auth is not None else "")
        for warning in exposure_warnings(self.settings):
            log.warning("%s", warning)
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # Closing a transport ends its request with EOF; cancelling is the last resort.
        for writer in self._clients.values():
            writer.close()
        tasks = list(self._clients)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2)
            for task in pending:
                task.cancel()

    # --- HTTP ----------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - asyncio runs each connection in a task
        self._clients[task] = writer
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                await self._exchange(reader, writer)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away or stalled; nothing to answer
        except asyncio.CancelledError:
            # Only close() cancels us, and Python 3.11's start_server logs a cancelled
            # connection task as an error: end quietly instead.
            pass
        finally:
            del self._clients[task]
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _ip(writer.get_extra_info("peername"))
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await _respond(writer, "GET", 400, "request head too large\n")
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await _respond(writer, "GET", 400, "bad request line\n")
            return
        method, target, _ = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        path = urlsplit(target).path
        refusal = self._refusal(peer, path)
        if refusal is not None:
            log.warning("http: request for %s from %s refused: not in %s", path, peer, refusal)
            await _respond(writer, method, 403,
                           f"{peer} is not in {refusal}; add its address (e.g. your "
                           f"Prometheus server's) to {refusal} in the config\n")
            return
        if method not in {"GET", "HEAD"}:
            await _respond(writer, method, 405, "only GET and HEAD\n",
                           extra={"Allow": "GET, HEAD"})
            return
        if self.auth is not None and path not in _PROBES and not await self._authorized(
                writer, method, path, peer, headers.get("authorization")):
            return
        try:
            await self._route(writer, method, path, headers)
        except Exception:
            log.exception("http: %s %s failed", method, path)
            await _respond(writer, method, 500, "internal error; see the relay's log\n")

    async def _authorized(self, writer: asyncio.StreamWriter, method: str, path: str,
                          peer: object, given: str | None) -> bool:
        """Check HTTP Basic; when it fails, answer 401 (or 429 while blocked) and say False."""
        assert self.auth is not None  # noqa: S101 - only called with basic_auth_users
        try:
            if await self.auth.check(given, str(peer)) is not None:
                return True
        except TooManyFailures as exc:
            await _respond(writer, method, 429, f"{exc} (auth_limits)\n",
                           extra={"Retry-After": str(int(self.auth.limits.block))})
            return False
        # A browser always asks once without a password first: only wrong ones are news.
        log.log(logging.WARNING if given else logging.DEBUG, "http: request for %s from %s "
                "refused: no valid user and password (http.basic_auth_users)", path, peer)
        await _respond(writer, method, 401, "user name and password required "
                       "(http.basic_auth_users)\n",
                       extra={"WWW-Authenticate": 'Basic realm="m365relay", charset="UTF-8"'})
        return False

    def _refusal(self, peer: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
                 path: str) -> str | None:
        """The config key whose networks would have to list ``peer``, or None if allowed."""
        settings = self.settings
        allowed: tuple[IPNetwork, ...]
        if path == "/metrics":
            key, allowed = _key(settings), settings.scrape_networks
        elif path in _PROBES:
            key, allowed = "http.networks", settings.networks + settings.scrape_networks
        else:
            key, allowed = "http.networks", settings.networks
        if peer is not None and any(peer in net for net in allowed):
            return None
        return key

    async def _route(self, writer: asyncio.StreamWriter, method: str, path: str,
                     headers: dict[str, str]) -> None:
        if path == "/healthz":
            await _respond(writer, method, 200, "ok\n")
        elif path == "/readyz":
            problems = await readiness(self.relay)
            if problems:
                body = "not ready:\n" + "".join(f"- {p}\n" for p in problems)
                await _respond(writer, method, 503, body)
            else:
                await _respond(writer, method, 200, "ready\n")
        elif path == "/metrics":
            self.collector.queue = await read_queue(self.relay.store)
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            await _respond(writer, method, 200, encoder(self.registry),
                           content_type=content_type)
        elif path == "/":
            page = statuspage.render(self.relay, await read_queue(self.relay.store))
            await _respond(writer, method, 200, page,
                           content_type="text/html; charset=utf-8", extra=_PAGE_HEADERS)
        elif path == "/api/status":
            data = statuspage.status_data(self.relay, await read_queue(self.relay.store))
            await _respond(writer, method, 200, json.dumps(data),
                           content_type="application/json", extra=_PAGE_HEADERS)
        elif path in statuspage.ASSETS:
            asset, content_type = statuspage.asset(path)
            await _respond(writer, method, 200, asset, content_type=content_type,
                           extra=_PAGE_HEADERS)
        else:
            await _respond(writer, method, 404,
                           "not found; try /, /api/status, /metrics, /healthz or /readyz\n")


def _key(settings: HttpSettings) -> str:
    return "http.networks" if settings.metrics_networks is None else "http.metrics_networks"


async def _respond(writer: asyncio.StreamWriter, method: str, status: int, body: str | bytes,
                   *, content_type: str = _TEXT, extra: dict[str, str] | None = None) -> None:
    if writer.transport.is_closing():
        return  # the client gave up (its timeout); an SSL transport would fail on write
    data = body.encode() if isinstance(body, str) else body
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}", f"Content-Type: {content_type}",
            f"Content-Length: {len(data)}", "Cache-Control: no-store", "Connection: close"]
    head += [f"{name}: {value}" for name, value in (extra or {}).items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    if method != "HEAD":
        writer.write(data)
    await writer.drain()


def _ip(peer: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(peer[0])  # type: ignore[index]
    except (TypeError, ValueError, IndexError):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# --- readiness -------------------------------------------------------------------------------


async def readiness(relay: RelayView) -> list[str]:
    """Why the relay cannot take mail right now; empty when it can."""
    problems = []
    listeners = relay.listener_snapshots()
    if any(lis.closing for lis in listeners):
        problems.append("shutting down: no new connections are accepted")
    else:
        serving = {lis.name for lis in listeners if lis.serving}
        problems += [f"listener {lis.name} ({lis.bind}) is not accepting connections"
                     for lis in relay.config.listeners if lis.name not in serving]
    try:
        problem = await asyncio.wait_for(relay.store.probe(), _PROBE_TIMEOUT)
    except TimeoutError:
        problem = (f"spool {relay.store.location} did not complete a write within "
                   f"{_PROBE_TIMEOUT:.0f}s; check the disk or network filesystem under it")
    if problem:
        problems.append(problem)
    return problems
