"""FakeEntra: the Entra ID token endpoint over real HTTPS (client credentials, and the delegated
sign-in of relay/sandbox/delegated.py).

msal is synchronous and talks to this from a worker thread, so a stdlib threading HTTP
server is the simplest honest fit; everything it records is guarded by one lock because
the Exchange side reads it from the event loop thread. The server, the response shapes and
the discovery documents are :mod:`relay.sandbox.entrahttp`; how an app proves itself,
:mod:`relay.sandbox.clientauth`; device codes and refresh tokens, :mod:`relay.sandbox.delegated`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from relay.sandbox.clientauth import check_credentials
from relay.sandbox.delegated import (
    DELEGATED_AUDIENCE,
    DELEGATED_SCOPE,
    DEVICE_CODE_GRANT,
    SEND_SCOPE,
    DelegatedGrants,
)
from relay.sandbox.entrahttp import (
    EntraServer,
    Response,
    entra_error,
    instance_discovery,
    openid_configuration,
    unknown_tenant,
)
from relay.sandbox.pages import signin_page
from relay.sandbox.tokens import (
    CLOCK_SKEW,
    TokenError,
    b64url_encode,
    check_times,
    sign_hs256,
    verify_hs256,
)

log = logging.getLogger("m365relay.sandbox.entra")

_SECRET_FIELDS = frozenset({"client_secret", "client_assertion", "refresh_token", "device_code"})
# msal may add these to any scope list; Entra ignores them for client credentials.
_RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access"})



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
        self._server: EntraServer | None = None
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
        check_times(claims)
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
        check_times(claims)
        if claims.get("aud") != GRAPH_AUDIENCE:
            raise TokenError(f"token audience {claims.get('aud')!r} is not {GRAPH_AUDIENCE!r}; "
                             f"request scope {GRAPH_SCOPE!r}")
        app = self._principal(claims)
        return claims, app

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, host: str, port: int, tls: ssl.SSLContext) -> int:
        """Bind and serve in a daemon thread; returns the bound port."""
        server = EntraServer((host, port), self, tls)
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
               base: str) -> Response:
        url = urlsplit(target)
        parts = [p for p in url.path.split("/") if p]
        if parts in (["devicelogin"], ["revoke"]):
            form = {k: v[0] for k, v in parse_qs(
                body.decode("utf-8", "replace") if method == "POST" else url.query).items()}
            status, page = signin_page(self.delegated, parts[0], method, form)
            return Response(status, {}, page=page)
        if method == "GET" and parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            if parts[0].casefold() not in self._tenants:
                return entra_error(400, "invalid_tenant", 90002, unknown_tenant(parts[0]), None)
            return openid_configuration(parts[0], base)
        if method == "GET" and parts[1:] == ["discovery", "instance"]:
            return instance_discovery(parse_qs(url.query), base)
        if method == "POST" and parts[1:3] == ["oauth2", "v2.0"] and len(parts) == 4:
            form = {k: v[0] for k, v in
                    parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
            if parts[3] == "token":
                return self._token(parts[0], form, headers)
            if parts[3] == "devicecode":
                return self._device_code(parts[0], form, base)
        return Response(404, {"error": "not_found",
                               "error_description": f"The sandbox has no {method} {url.path}."})

    def _token(self, tenant: str, form: dict[str, str], headers: Mapping[str, str]) -> Response:
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
            return Response(injection.status, injection.body, dict(injection.headers))

        if tenant.casefold() not in self._tenants:
            return entra_error(400, "invalid_request", 90002, unknown_tenant(tenant), correlation)
        grant = form.get("grant_type", "")
        if grant in (DEVICE_CODE_GRANT, "refresh_token"):
            return self._delegated_token(tenant, grant, form, correlation)
        if grant != "client_credentials":
            return entra_error(400, "unsupported_grant_type", 70003,
                          f"The app requested an unsupported grant type '{grant}'. The sandbox "
                          "implements only client_credentials.", correlation)
        client_id = form.get("client_id", "")
        app = self._by_id.get((tenant.casefold(), client_id.casefold()))
        if app is None:
            return entra_error(400, "unauthorized_client", 700016,
                          f"Application with identifier '{client_id}' was not found in the "
                          f"directory '{tenant}'. This can happen if the application has not "
                          "been installed by the administrator of the tenant or consented to "
                          "by any user in the tenant. You may have sent your authentication "
                          "request to the wrong tenant.", correlation)
        refusal = check_credentials(app, form, f"/{tenant}/oauth2/v2.0/token")
        if refusal is not None:
            code, message = refusal
            return entra_error(401, "invalid_client", code, message, correlation)
        scopes = set(form.get("scope", "").split()) - _RESERVED_SCOPES
        if scopes == {GRAPH_SCOPE}:  # Microsoft Graph: its own audience and roles
            return self._issue(app, correlation, self.mint_token(
                app, audience=GRAPH_AUDIENCE, roles=app.graph_roles))
        if scopes != {SCOPE}:
            return entra_error(400, "invalid_scope", 70011,
                          "The provided request must include a 'scope' input parameter. The "
                          "provided value for the input parameter 'scope' is not valid. The "
                          f"scope '{form.get('scope', '')}' does not exist. Exchange Online "
                          f"SMTP needs exactly '{SCOPE}'.", correlation)
        return self._issue(app, correlation, self.mint_token(app))

    def _issue(self, app: SandboxApp, correlation: str, token: str) -> Response:
        log.info("issued a token to app %s in tenant %s", app.client_id, app.tenant)
        return Response(200, {
            "token_type": "Bearer",
            "expires_in": self.token_lifetime,
            "ext_expires_in": self.token_lifetime,
            "access_token": token,
        }, {"client-request-id": correlation})

    def _device_code(self, tenant: str, form: Mapping[str, str], base: str) -> Response:
        app = self._by_id.get((tenant.casefold(), form.get("client_id", "").casefold()))
        if app is None:
            return entra_error(400, "unauthorized_client", 700016,
                          f"Application with identifier '{form.get('client_id')}' was not found "
                          f"in the directory '{tenant}'.", None)
        if DELEGATED_SCOPE not in form.get("scope", "").split():
            return entra_error(400, "invalid_scope", 70011,
                          f"The scope '{form.get('scope', '')}' does not include "
                          f"'{DELEGATED_SCOPE}'.", None)
        return Response(200, self.delegated.new_device_code(tenant, app.client_id, base))

    def _delegated_token(self, tenant: str, grant: str, form: Mapping[str, str],
                         correlation: str) -> Response:
        app = self._by_id.get((tenant.casefold(), form.get("client_id", "").casefold()))
        if app is None:
            return entra_error(400, "unauthorized_client", 700016,
                          f"Application with identifier '{form.get('client_id')}' was not found "
                          f"in the directory '{tenant}'.", correlation)
        if app.client_secret is not None:  # a confidential client must still prove itself
            refusal = check_credentials(app, form, f"/{tenant}/oauth2/v2.0/token")
            if refusal is not None:
                return entra_error(401, "invalid_client", refusal[0], refusal[1], correlation)
        if grant == DEVICE_CODE_GRANT:
            outcome = self.delegated.redeem_device_code(tenant, form)
        else:
            outcome = self.delegated.redeem_refresh_token(tenant, form)
        if not isinstance(outcome, str):
            status, error, code, description = outcome
            return entra_error(status, error, code, description, correlation)
        user = outcome
        token = self.mint_delegated_token(app, user)
        refresh = self.delegated.issue_refresh_token(tenant, app.client_id, user)
        uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"sandbox-user:{user.casefold()}"))
        client_info = {"uid": uid, "utid": app.tenant}
        id_claims = {"iss": self._issuer(tenant), "aud": app.client_id, "sub": uid, "oid": uid,
                     "tid": app.tenant, "preferred_username": user,
                     "iat": int(time.time()), "exp": int(time.time()) + 3600}
        log.info("issued a delegated token for %s to app %s (%s)", user, app.client_id, grant)
        return Response(200, {
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


def _random_id(length: int = 22) -> str:
    return secrets.token_urlsafe(length)[:length]
