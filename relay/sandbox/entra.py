"""FakeEntra: the Entra ID token endpoint (client credentials only) over real HTTPS.

msal is synchronous and talks to this from a worker thread, so a stdlib threading HTTP
server is the simplest honest fit; everything it records is guarded by one lock because
the Exchange side reads it from the event loop thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import secrets
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from relay.sandbox.apps import (
    AUDIENCE,
    AUDIENCE_APP_ID,
    GRAPH_AUDIENCE,
    GRAPH_SCOPE,
    SCOPE,
    SEND_ROLE,
    SandboxApp,
)
from relay.sandbox.delegated import (
    DELEGATED_AUDIENCE,
    DELEGATED_SCOPE,
    DEVICE_CODE_GRANT,
    SEND_SCOPE,
    DelegatedGrants,
)
from relay.sandbox.federated import verify_federated_assertion
from relay.sandbox.https import TLSHTTPServer
from relay.sandbox.pages import signin_page
from relay.sandbox.tokens import (
    CLOCK_SKEW,
    JWT_BEARER,
    AssertionRejected,
    TokenError,
    b64url_encode,
    sign_hs256,
    verify_client_assertion,
    verify_hs256,
)

log = logging.getLogger("m365relay.sandbox.entra")

_SECRET_FIELDS = frozenset({"client_secret", "client_assertion", "refresh_token", "device_code"})
# msal may add these to any scope list; Entra ignores them for client credentials.
_RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access"})
_MAX_BODY = 1 << 20
_HOST_HEADER = re.compile(r"[A-Za-z0-9.\-]+(:\d+)?|\[[0-9A-Fa-f:.]+\](:\d+)?")


@dataclass
class _Response:
    status: int
    body: Mapping[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    page: str | None = None  # an HTML page instead of the JSON body (the sign-in pages)


@dataclass
class _Injection:
    status: int
    body: Mapping[str, Any]
    headers: dict[str, str]
    remaining: int


class FakeEntra:
    """Issues signed app-only tokens to registered apps, records requests, injects faults."""

    def __init__(self, apps: Sequence[SandboxApp], *, token_lifetime: int = 3600) -> None:
        self.apps = tuple(apps)
        self.token_lifetime = token_lifetime
        self.port = 0
        self.token_requests: list[dict[str, str]] = []
        self.issued_tokens: list[str] = []
        self._by_id = {(a.tenant.casefold(), a.client_id.casefold()): a for a in self.apps}
        self._tenants = {a.tenant.casefold() for a in self.apps}
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._injections: deque[_Injection] = deque()
        self._issued_ids: list[str] = []
        self._revoked: set[str] = set()
        self._server: _EntraServer | None = None
        self._thread: threading.Thread | None = None
        self.delegated = DelegatedGrants()

    # -- recordings and fault injection (the test-facing API) --------------------------

    @property
    def token_request_count(self) -> int:
        with self._lock:
            return len(self.token_requests)

    def inject(self, status: int, body: Mapping[str, Any], times: int = 1,
               headers: Mapping[str, str] | None = None) -> None:
        """Answer the next ``times`` token POSTs with this status and JSON body instead."""
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._injections.append(_Injection(status, dict(body), dict(headers or {}), times))

    def revoke_all(self) -> None:
        """Make Exchange refuse every token issued so far (535 5.7.3), as after a revocation."""
        with self._lock:
            self._revoked.update(self._issued_ids)

    def approve_device_code(self, user_code: str, user: str) -> None:
        """The person signs in at the verification URL as ``user`` and enters ``user_code``."""
        self.delegated.approve(user_code, user)

    def revoke_refresh_tokens(self, user: str) -> int:
        """Revoke ``user``'s refresh tokens, as a password change or admin action does."""
        return self.delegated.revoke(user)

    def reset(self) -> None:
        with self._lock:
            self.token_requests.clear()
            self.issued_tokens.clear()
            self._injections.clear()
            self._issued_ids.clear()
            self._revoked.clear()

    def mint_token(self, app: SandboxApp, *, lifetime: int | None = None,
                   roles: Sequence[str] | None = None, audience: str = AUDIENCE,
                   not_before: int | None = None) -> str:
        """A token as the token endpoint would issue it; tests vary the claims to probe Exchange."""
        now = int(time.time())
        lifetime = self.token_lifetime if lifetime is None else lifetime
        token_id = _random_id()
        object_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"sandbox-sp:{app.client_id}"))
        claims: dict[str, Any] = {
            "aud": audience,
            "iss": f"https://sts.windows.net/{app.tenant}/",
            # Entra backdates iat/nbf by five minutes to absorb client clock skew.
            "iat": now - CLOCK_SKEW,
            "nbf": now - CLOCK_SKEW if not_before is None else not_before,
            "exp": now + lifetime,
            "aio": _random_id(64),
            "app_displayname": "m365relay sandbox app",
            "appid": app.client_id,
            "appidacr": "2" if app.certificate_pem and not app.client_secret else "1",
            "idp": f"https://sts.windows.net/{app.tenant}/",
            "oid": object_id,
            "rh": _random_id(24),
            "sub": object_id,
            "tid": app.tenant,
            "uti": token_id,
            "ver": "1.0",
            # Real app-only tokens run past 1 KB; padding keeps AUTH lines realistically long.
            "xms_pad": secrets.token_urlsafe(768),
        }
        app_roles = list(app.roles if roles is None else roles)
        if app_roles:  # Entra omits the claim rather than sending an empty list
            claims["roles"] = app_roles
        token = sign_hs256(claims, self._key)
        with self._lock:
            self.issued_tokens.append(token)
            self._issued_ids.append(token_id)
        return token

    def check_token(self, token: str) -> tuple[dict[str, Any], SandboxApp]:
        """Claims and app of a token Exchange may accept for SMTP; TokenError says why not."""
        claims = verify_hs256(token, self._key)
        _check_times(claims)
        delegated = "scp" in claims
        if delegated and claims.get("aud") == DELEGATED_AUDIENCE:
            pass
        elif claims.get("aud") not in (AUDIENCE, AUDIENCE_APP_ID):
            raise TokenError(f"token audience {claims.get('aud')!r} is not {AUDIENCE!r}; "
                             f"request scope {SCOPE!r}")
        app = self._principal(claims)
        if delegated:
            if SEND_SCOPE not in str(claims.get("scp", "")).split():
                raise TokenError(f"token has no {SEND_SCOPE} scope (add the delegated "
                                 "permission and sign in again)")
            return claims, app
        roles = claims.get("roles")
        if not isinstance(roles, list) or SEND_ROLE not in roles:
            raise TokenError(f"token has no {SEND_ROLE} role (grant the application "
                             "permission and admin consent)")
        return claims, app

    def _principal(self, claims: dict[str, Any]) -> SandboxApp:
        """The app a token was issued to, if it still has a service principal and the token
        was not revoked; TokenError says why not."""
        app = self._by_id.get((str(claims.get("tid")).casefold(),
                               str(claims.get("appid")).casefold()))
        if app is None:
            raise TokenError(f"app {claims.get('appid')} has no service principal in tenant "
                             f"{claims.get('tid')}")
        with self._lock:
            revoked = claims.get("uti") in self._revoked
        if revoked:
            raise TokenError("token was revoked")
        return app

    def check_graph_token(self, token: str) -> tuple[dict[str, Any], SandboxApp]:
        """Claims and app of an app-only token Microsoft Graph accepts for sendMail."""
        claims = verify_hs256(token, self._key)
        _check_times(claims)
        if claims.get("aud") != GRAPH_AUDIENCE:
            raise TokenError(f"token audience {claims.get('aud')!r} is not {GRAPH_AUDIENCE!r}; "
                             f"request scope {GRAPH_SCOPE!r}")
        app = self._principal(claims)
        return claims, app

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, host: str, port: int, tls: ssl.SSLContext) -> int:
        """Bind and serve in a daemon thread; returns the bound port."""
        server = _EntraServer((host, port), self, tls)
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"sandbox-entra-{self.port}", daemon=True)
        self._thread.start()
        return self.port

    async def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        # shutdown() blocks until serve_forever notices, so keep it off the event loop.
        if thread is not None:
            await asyncio.to_thread(server.shutdown)
            await asyncio.to_thread(thread.join)
        server.server_close()

    # -- HTTP endpoints (called from server threads) --------------------------------------

    def handle_http(self, method: str, target: str, headers: Mapping[str, str], body: bytes,
               base: str) -> _Response:
        url = urlsplit(target)
        parts = [p for p in url.path.split("/") if p]
        if parts in (["devicelogin"], ["revoke"]):
            form = {k: v[0] for k, v in parse_qs(
                body.decode("utf-8", "replace") if method == "POST" else url.query).items()}
            status, page = signin_page(self.delegated, parts[0], method, form)
            return _Response(status, {}, page=page)
        if method == "GET" and parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            return self._openid_configuration(parts[0], base)
        if method == "GET" and parts[1:] == ["discovery", "instance"]:
            return self._instance_discovery(parse_qs(url.query), base)
        if method == "POST" and parts[1:3] == ["oauth2", "v2.0"] and len(parts) == 4:
            form = {k: v[0] for k, v in
                    parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
            if parts[3] == "token":
                return self._token(parts[0], form, headers)
            if parts[3] == "devicecode":
                return self._device_code(parts[0], form, base)
        return _Response(404, {"error": "not_found",
                               "error_description": f"The sandbox has no {method} {url.path}."})

    def _openid_configuration(self, tenant: str, base: str) -> _Response:
        if tenant.casefold() not in self._tenants:
            return _error(400, "invalid_tenant", 90002, _unknown_tenant(tenant), None)
        root = f"{base}/{tenant}"
        return _Response(200, {
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

    def _instance_discovery(self, query: Mapping[str, list[str]], base: str) -> _Response:
        endpoint = urlsplit(query.get("authorization_endpoint", [""])[0])
        tenant = next((p for p in endpoint.path.split("/") if p), "common")
        netloc = urlsplit(base).netloc
        return _Response(200, {
            "tenant_discovery_endpoint":
                f"{base}/{tenant}/v2.0/.well-known/openid-configuration",
            "api-version": "1.1",
            "metadata": [{"preferred_network": netloc, "preferred_cache": netloc,
                          "aliases": [netloc]}],
        })

    def _token(self, tenant: str, form: dict[str, str], headers: Mapping[str, str]) -> _Response:
        correlation = headers.get("client-request-id") or str(uuid.uuid4())
        with self._lock:
            self.token_requests.append(
                {k: "***" if k in _SECRET_FIELDS else v for k, v in form.items()})
            injection = self._injections[0] if self._injections else None
            if injection is not None:
                injection.remaining -= 1
                if injection.remaining == 0:
                    self._injections.popleft()
        if injection is not None:
            return _Response(injection.status, injection.body, dict(injection.headers))

        if tenant.casefold() not in self._tenants:
            return _error(400, "invalid_request", 90002, _unknown_tenant(tenant), correlation)
        grant = form.get("grant_type", "")
        if grant in (DEVICE_CODE_GRANT, "refresh_token"):
            return self._delegated_token(tenant, grant, form, correlation)
        if grant != "client_credentials":
            return _error(400, "unsupported_grant_type", 70003,
                          f"The app requested an unsupported grant type '{grant}'. The sandbox "
                          "implements only client_credentials.", correlation)
        client_id = form.get("client_id", "")
        app = self._by_id.get((tenant.casefold(), client_id.casefold()))
        if app is None:
            return _error(400, "unauthorized_client", 700016,
                          f"Application with identifier '{client_id}' was not found in the "
                          f"directory '{tenant}'. This can happen if the application has not "
                          "been installed by the administrator of the tenant or consented to "
                          "by any user in the tenant. You may have sent your authentication "
                          "request to the wrong tenant.", correlation)
        refusal = self._check_credentials(app, form, f"/{tenant}/oauth2/v2.0/token")
        if refusal is not None:
            code, message = refusal
            return _error(401, "invalid_client", code, message, correlation)
        scopes = set(form.get("scope", "").split()) - _RESERVED_SCOPES
        if scopes == {GRAPH_SCOPE}:  # Microsoft Graph: its own audience and roles
            return self._issue(app, correlation, self.mint_token(
                app, audience=GRAPH_AUDIENCE, roles=app.graph_roles))
        if scopes != {SCOPE}:
            return _error(400, "invalid_scope", 70011,
                          "The provided request must include a 'scope' input parameter. The "
                          "provided value for the input parameter 'scope' is not valid. The "
                          f"scope '{form.get('scope', '')}' does not exist. Exchange Online "
                          f"SMTP needs exactly '{SCOPE}'.", correlation)
        return self._issue(app, correlation, self.mint_token(app))

    def _issue(self, app: SandboxApp, correlation: str, token: str) -> _Response:
        log.info("issued a token to app %s in tenant %s", app.client_id, app.tenant)
        return _Response(200, {
            "token_type": "Bearer",
            "expires_in": self.token_lifetime,
            "ext_expires_in": self.token_lifetime,
            "access_token": token,
        }, {"client-request-id": correlation})

    def _device_code(self, tenant: str, form: Mapping[str, str], base: str) -> _Response:
        app = self._by_id.get((tenant.casefold(), form.get("client_id", "").casefold()))
        if app is None:
            return _error(400, "unauthorized_client", 700016,
                          f"Application with identifier '{form.get('client_id')}' was not found "
                          f"in the directory '{tenant}'.", None)
        if DELEGATED_SCOPE not in form.get("scope", "").split():
            return _error(400, "invalid_scope", 70011,
                          f"The scope '{form.get('scope', '')}' does not include "
                          f"'{DELEGATED_SCOPE}'.", None)
        return _Response(200, self.delegated.new_device_code(tenant, app.client_id, base))

    def _delegated_token(self, tenant: str, grant: str, form: Mapping[str, str],
                         correlation: str) -> _Response:
        app = self._by_id.get((tenant.casefold(), form.get("client_id", "").casefold()))
        if app is None:
            return _error(400, "unauthorized_client", 700016,
                          f"Application with identifier '{form.get('client_id')}' was not found "
                          f"in the directory '{tenant}'.", correlation)
        if app.client_secret is not None:  # a confidential client must still prove itself
            refusal = self._check_credentials(app, form, f"/{tenant}/oauth2/v2.0/token")
            if refusal is not None:
                return _error(401, "invalid_client", refusal[0], refusal[1], correlation)
        if grant == DEVICE_CODE_GRANT:
            outcome = self.delegated.redeem_device_code(tenant, form)
        else:
            outcome = self.delegated.redeem_refresh_token(tenant, form)
        if not isinstance(outcome, str):
            status, error, code, description = outcome
            return _error(status, error, code, description, correlation)
        user = outcome
        token = self.mint_delegated_token(app, user)
        refresh = self.delegated.issue_refresh_token(tenant, app.client_id, user)
        uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"sandbox-user:{user.casefold()}"))
        client_info = {"uid": uid, "utid": app.tenant}
        id_claims = {"iss": self._issuer(tenant), "aud": app.client_id, "sub": uid, "oid": uid,
                     "tid": app.tenant, "preferred_username": user,
                     "iat": int(time.time()), "exp": int(time.time()) + 3600}
        log.info("issued a delegated token for %s to app %s (%s)", user, app.client_id, grant)
        return _Response(200, {
            "token_type": "Bearer",
            "scope": f"{DELEGATED_SCOPE}",
            "expires_in": self.token_lifetime,
            "ext_expires_in": self.token_lifetime,
            "access_token": token,
            "refresh_token": refresh,
            "id_token": sign_hs256(id_claims, self._key),
            "client_info": b64url_encode(json.dumps(client_info).encode("utf-8")),
        }, {"client-request-id": correlation})

    def _issuer(self, tenant: str) -> str:
        return f"https://localhost:{self.port}/{tenant}/v2.0"

    def mint_delegated_token(self, app: SandboxApp, user: str, *,
                             lifetime: int | None = None) -> str:
        """A user token (scp SMTP.Send, upn = the signed-in mailbox) for Outlook SMTP."""
        now = int(time.time())
        lifetime = self.token_lifetime if lifetime is None else lifetime
        token_id = _random_id()
        claims: dict[str, Any] = {
            "aud": DELEGATED_AUDIENCE, "iss": f"https://sts.windows.net/{app.tenant}/",
            "iat": now - CLOCK_SKEW, "nbf": now - CLOCK_SKEW, "exp": now + lifetime,
            "appid": app.client_id, "tid": app.tenant, "scp": SEND_SCOPE,
            "upn": user, "preferred_username": user, "uti": token_id, "ver": "1.0",
        }
        token = sign_hs256(claims, self._key)
        with self._lock:
            self.issued_tokens.append(token)
            self._issued_ids.append(token_id)
        return token

    def _check_credentials(self, app: SandboxApp, form: Mapping[str, str],
                           token_path: str) -> tuple[int, str] | None:
        secret, assertion = form.get("client_secret"), form.get("client_assertion")
        if secret:
            if app.client_secret is None or not hmac.compare_digest(
                    secret.encode("utf-8"), app.client_secret.encode("utf-8")):
                return 7000215, (
                    "Invalid client secret provided. Ensure the secret being sent in the request "
                    "is the client secret value, not the client secret ID, for a secret added "
                    f"to app '{app.client_id}'.")
            return None
        if assertion:
            if form.get("client_assertion_type") != JWT_BEARER:
                return 7000216, f"'client_assertion_type' must be '{JWT_BEARER}'."
            if app.federated is not None and app.certificate_pem is None:
                try:
                    verify_federated_assertion(assertion, app.federated, now=time.time())
                except AssertionRejected as exc:
                    return exc.code, str(exc)
                return None
            if app.certificate_pem is None:
                return 700027, ("The certificate with identifier used to sign the client "
                                "assertion is not registered on application.")
            try:
                verify_client_assertion(assertion, app.certificate_pem, client_id=app.client_id,
                                        token_path=token_path, now=time.time())
            except AssertionRejected as exc:
                return exc.code, str(exc)
            return None
        return 7000216, ("'client_assertion', 'client_secret' or 'request' is required for the "
                         "'client_credentials' grant type.")


def _check_times(claims: Mapping[str, Any]) -> None:
    """Expired, or not yet valid beyond Entra's clock skew: TokenError (Exchange and Graph)."""
    now = time.time()
    exp, nbf = claims.get("exp"), claims.get("nbf")
    if not isinstance(exp, int) or exp <= now:
        raise TokenError(f"token expired at {_iso(exp)}")
    if not isinstance(nbf, int) or nbf > now + CLOCK_SKEW:
        raise TokenError(f"token not valid before {_iso(nbf)}")


def _random_id(length: int = 22) -> str:
    return secrets.token_urlsafe(length)[:length]


def _iso(epoch: object) -> str:
    if not isinstance(epoch, int | float):
        return f"<missing: {epoch!r}>"
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def _unknown_tenant(tenant: str) -> str:
    return (f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
            "and are signing into the correct cloud. Check with your subscription "
            "administrator, this may happen if there are no active subscriptions for the tenant.")


def _error(status: int, error: str, code: int, description: str,
           correlation: str | None) -> _Response:
    """An error in Entra's JSON shape: the AADSTS code leads the description."""
    trace = str(uuid.uuid4())
    correlation = correlation or str(uuid.uuid4())
    now = datetime.now(UTC)
    stamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
    return _Response(status, {
        "error": error,
        "error_description": (f"AADSTS{code}: {description} Trace ID: {trace} Correlation ID: "
                              f"{correlation} Timestamp: {stamp}"),
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }, {"x-ms-request-id": trace})


class _EntraServer(TLSHTTPServer):
    def __init__(self, address: tuple[str, int], entra: FakeEntra, tls: ssl.SSLContext) -> None:
        self.entra = entra
        super().__init__(address, _EntraRequestHandler, tls)


class _EntraRequestHandler(BaseHTTPRequestHandler):
    server: _EntraServer
    timeout = 10

    def do_GET(self) -> None:
        self._dispatch(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._send(_Response(413, {"error": "request_too_large"}))
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
            response = _Response(500, {"error": "server_error"})
        self._send(response)

    def _send(self, response: _Response) -> None:
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
