"""The HTTP side of the fake Entra ID: a threaded TLS server that hands each request to
:meth:`relay.sandbox.entra.FakeEntra.handle_http`, the shape of a response, Entra's JSON error
format (the AADSTS code leading the description) and the two discovery documents msal reads
before it asks for a token."""

from __future__ import annotations

import json
import logging
import re
import ssl
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol
from urllib.parse import urlsplit

from relay.sandbox.https import TLSHTTPServer

log = logging.getLogger("m365relay.sandbox.entra")

_MAX_BODY = 1 << 20
_HOST_HEADER = re.compile(r"[A-Za-z0-9.\-]+(:\d+)?|\[[0-9A-Fa-f:.]+\](:\d+)?")


@dataclass
class Response:
    status: int
    body: Mapping[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    page: str | None = None  # an HTML page instead of the JSON body (the sign-in pages)


class HttpApp(Protocol):
    """What the server calls (FakeEntra), from its request threads."""

    def handle_http(self, method: str, target: str, headers: Mapping[str, str], body: bytes,
                    base: str) -> Response: ...


def unknown_tenant(tenant: str) -> str:
    return (f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
            "and are signing into the correct cloud. Check with your subscription "
            "administrator, this may happen if there are no active subscriptions for the tenant.")


def entra_error(status: int, error: str, code: int, description: str,
           correlation: str | None) -> Response:
    """An error in Entra's JSON shape: the AADSTS code leads the description."""
    trace = str(uuid.uuid4())
    correlation = correlation or str(uuid.uuid4())
    now = datetime.now(UTC)
    stamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
    return Response(status, {
        "error": error,
        "error_description": (f"AADSTS{code}: {description} Trace ID: {trace} Correlation ID: "
                              f"{correlation} Timestamp: {stamp}"),
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }, {"x-ms-request-id": trace})


def openid_configuration(tenant: str, base: str) -> Response:
    """The tenant's OpenID configuration, as msal reads it first (a known tenant)."""
    root = f"{base}/{tenant}"
    return Response(200, {
        "token_endpoint": f"{root}/oauth2/v2.0/token",
        "token_endpoint_auth_methods_supported": [
            "client_secret_post", "private_key_jwt", "client_secret_basic"],
        "jwks_uri": f"{root}/discovery/v2.0/keys",
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": f"{root}/v2.0",
        "request_uri_parameter_supported": False,
        "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
        "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
        "end_session_endpoint": f"{root}/oauth2/v2.0/logout",
        "http_logout_supported": True,
        "frontchannel_logout_supported": True,
        "tenant_region_scope": "SANDBOX",
        "cloud_instance_name": "sandbox.localhost",
    })

def instance_discovery(query: Mapping[str, list[str]], base: str) -> Response:
    endpoint = urlsplit(query.get("authorization_endpoint", [""])[0])
    tenant = next((p for p in endpoint.path.split("/") if p), "common")
    netloc = urlsplit(base).netloc
    return Response(200, {
        "tenant_discovery_endpoint":
            f"{base}/{tenant}/v2.0/.well-known/openid-configuration",
        "api-version": "1.1",
        "metadata": [{"preferred_network": netloc, "preferred_cache": netloc,
                      "aliases": [netloc]}],
    })



class EntraServer(TLSHTTPServer):
    def __init__(self, address: tuple[str, int], entra: HttpApp, tls: ssl.SSLContext) -> None:
        self.entra = entra
        super().__init__(address, EntraRequestHandler, tls)


class EntraRequestHandler(BaseHTTPRequestHandler):
    server: EntraServer
    timeout = 10

    def do_GET(self) -> None:
        self._dispatch(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._send(Response(413, {"error": "request_too_large"}))
            return
        self._dispatch(self.rfile.read(length))

    def _dispatch(self, body: bytes) -> None:
        host = self.headers.get("Host", "")
        if not _HOST_HEADER.fullmatch(host):
            host = f"localhost:{self.server.server_address[1]}"
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            response = self.server.entra.handle_http(self.command, self.path, headers, body,
                                                f"https://{host}")
        except Exception:  # a bug in the fake must still answer, or msal hangs until timeout
            log.exception("sandbox Entra failed on %s %s", self.command, self.path)
            response = Response(500, {"error": "server_error"})
        self._send(response)

    def _send(self, response: Response) -> None:
        if response.page is not None:
            payload = response.page.encode("utf-8")
            content_type = "text/html; charset=utf-8"
        else:
            payload = json.dumps(response.body).encode("utf-8")
            content_type = "application/json; charset=utf-8"
        self.send_response(response.status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store, no-cache")
        self.send_header("Pragma", "no-cache")
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
