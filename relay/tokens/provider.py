"""App-only access tokens from Entra ID (client credentials), one msal app per config app.

Upstream code sees only ``await tokens.token(app_name) -> str``. Behind it:

* msal is synchronous and its constructor fetches the OpenID configuration, so every msal call
  runs in a worker thread;
* msal has no single-flight, so one ``asyncio.Lock`` per app makes a thousand waiting
  deliveries share one token request;
* Exchange Online rejects tokens close to expiry, so we refresh ``token_refresh_margin`` before
  ``expires_in`` runs out, and drop msal's own cached copy first so msal really asks Entra.

msal and requests (~7 MB, ~150 ms) are imported by the worker thread of the first token request,
not before the relay accepts mail: an idle relay that has delivered nothing stays at ~39 MB.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from relay import logsafe
from relay.config import clouds
from relay.config.files import content_digest
from relay.config.records import App, Config
from relay.diagnosis.errors import TokenError, aadsts_code
from relay.diagnosis.explain import Context, explain_connection_error, explain_token_error
from relay.tokens.credentials import build_credential

if TYPE_CHECKING:
    import ssl

    import requests

    from relay.tokens.delegated import DelegatedTokens
    from relay.tokens.shared import SharedSignIns

log = logging.getLogger("m365relay.tokens")

# Authority hosts msal knows; for any other (sandbox, private cloud proxy) msal's instance
# discovery against login.microsoftonline.com must be off, or it would call Microsoft.
_MICROSOFT_HOSTS = frozenset({
    "login.microsoftonline.com", "login.microsoftonline.us", "login.partner.microsoftonline.cn",
    "login.chinacloudapi.cn", "login.microsoftonline.de", "login.windows.net",
    "login.microsoft.com", "sts.windows.net",
})


@dataclass
class _AppState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    client: Any = None  # msal.ConfidentialClientApplication, built on first use
    token: str = ""
    refresh_at: float = 0.0
    expires_at: float = 0.0
    requests: int = 0
    failures: int = 0
    error: str = ""  # why the last request failed, with the fix; "" after a success
    failed: TokenError | None = None  # the last request's failure; None after a success
    answered: int = 0  # requests that have finished, either way


@dataclass(frozen=True)
class TokenStatus:
    """An app's token state for metrics and the status page; never the token itself."""

    requests: int
    failures: int
    expires_at: float  # unix time; 0 before the first token
    error: str


class TokenProvider:
    """Hands out cached app-only tokens; ``await provider.token("contoso")``."""

    def __init__(self, apps: Mapping[str, App], *, margin: float = 600.0,
                 timeout: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self._apps = dict(apps)
        self._margin = margin
        self._timeout = timeout
        self._clock = clock
        self._states: dict[str, _AppState] = {name: _AppState() for name in apps}
        self._inputs = {name: file_inputs(app) for name, app in apps.items()}
        # One trust context per app, shared by its sessions (building one loads the system's
        # CAs: tens of ms, and Graph makes sessions on the event loop); rebuilt on reload.
        self._trusts: dict[str, ssl.SSLContext | bool] = {}
        self.delegated: DelegatedTokens | None = None

    def context(self, app_name: str, mailbox: str = "") -> Context:
        app = self._apps[app_name]
        return Context(mailbox=mailbox, app=app_name, client_id=app.client_id,
                       tenant=app.tenant, smtp_host=app.smtp_host, smtp_port=app.smtp_port,
                       authority_host=urlsplit(app.authority_url).netloc)

    def stats(self, app_name: str) -> tuple[int, int]:
        """(token requests sent to Entra, failed requests) for one app."""
        state = self._states[app_name]
        return state.requests, state.failures

    def use_delegated(self, config: Config, config_path: Path | None) -> None:
        """Serve the apps with ``flow: delegated`` too (relay/tokens/delegated.py), per mailbox."""
        if self.delegated is None:
            if not any(app.flow == "delegated" for app in config.apps.values()):
                return  # relay/tokens/delegated.py and its imports cost ~4 MB; a reload may add it
            from relay.tokens.delegated import DelegatedTokens

            self.delegated = DelegatedTokens(config, config_path, margin=self._margin,
                                             session=self.http_session, clock=self._clock)
        else:
            self.delegated.configure(config, config_path, margin=self._margin)

    def share_signins(self, rows: Any, key: str, where: str, config_path: Path | None
                      ) -> SharedSignIns | None:
        """Cluster mode: keep delegated sign-ins in the queue database's ``rows``
        (:class:`~relay.spool.pgsignins.PgSignins`); None without delegated apps."""
        if self.delegated is None:
            return None
        from relay.tokens.delegated import login_command
        from relay.tokens.shared import SharedSignIns
        from relay.tokens.store import Sealer

        shared = SharedSignIns(rows, Sealer(key, login=lambda a: login_command(a, config_path)),
                               where)
        self.delegated.share(shared)
        return shared

    def status(self, app_name: str) -> TokenStatus:
        if self.delegated is not None and self._is_delegated(app_name):
            signins = [s for s in self.delegated.statuses() if s.app == app_name]
            waiting = [s for s in signins if s.needs_login]
            error = "; ".join(s.error or f"account {s.account} needs sign-in: run "
                              f"`{s.login_command}`" for s in waiting)
            return TokenStatus(0, len(waiting), min((s.expires_at for s in signins), default=0),
                               error)
        state = self._states.get(app_name) or _AppState()
        return TokenStatus(state.requests, state.failures, state.expires_at, state.error)

    def _is_delegated(self, app_name: str) -> bool:
        app = self._apps.get(app_name)
        return app is not None and app.flow == "delegated"

    async def token(self, app_name: str, mailbox: str = "") -> str:
        if self._is_delegated(app_name):
            if self.delegated is None:
                raise TokenError(f"app {app_name!r} uses flow: delegated but the relay was "
                                 "started without token_store support")
            return await self.delegated.token(app_name, mailbox)
        state = self._states[app_name]
        if state.token and self._clock() < state.refresh_at:
            return state.token
        answered = state.answered
        async with state.lock:
            # Another delivery may have refreshed it while we waited for the lock.
            if state.token and self._clock() < state.refresh_at:
                return state.token
            if state.answered != answered and state.failed is not None:
                # ...or failed to: share that answer, or a broken secret would send Entra one
                # request per waiting delivery.
                raise TokenError(str(state.failed), explanation=state.failed.explanation)
            try:
                return await self._refresh(app_name, state)
            finally:
                state.answered += 1

    def invalidate(self, app_name: str, token: str, mailbox: str = "") -> None:
        """Forget ``token`` (Exchange rejected it) so the next call asks Entra again."""
        if self._is_delegated(app_name):
            if self.delegated is not None:
                self.delegated.invalidate(app_name, mailbox, token)
            return
        state = self._states[app_name]
        if state.token == token:
            state.token, state.refresh_at = "", 0.0

    def http_session(self, app_name: str) -> requests.Session:
        """An HTTP session that trusts exactly what msal's does for this app, so
        ``m365relay doctor`` probes the authority the way token requests reach it."""
        from relay.tokens.httpsession import TimeoutSession

        return TimeoutSession(self._trust(app_name), self._timeout)

    def _trust(self, app_name: str) -> ssl.SSLContext | bool:
        found = self._trusts.get(app_name)
        if found is None:
            found = self._trusts[app_name] = trust(self._apps[app_name])
        return found

    def client(self, app_name: str) -> Any:
        """The app's msal client, None before its first token request (for tests)."""
        return self._states[app_name].client

    def update(self, apps: Mapping[str, App], *, margin: float) -> set[str]:
        """Take a reloaded config: apps whose settings or files (``ca_file``, a PFX) changed
        start afresh, with a new msal client and a new token. Returns their names."""
        self._margin = margin
        changed = set()
        for name, app in apps.items():
            inputs = file_inputs(app)
            if self._apps.get(name) != app or self._inputs.get(name) != inputs:
                self._states[name] = _AppState()
                self._inputs[name] = inputs
                self._trusts.pop(name, None)
                changed.add(name)
        self._apps = dict(apps)
        if self.delegated is not None:
            self.delegated.drop_clients(changed)
        return changed

    def close(self) -> None:
        """Nothing to release: kept for callers (no temporary files, see trust())."""

    async def _refresh(self, app_name: str, state: _AppState) -> str:
        app = self._apps[app_name]
        ctx = self.context(app_name)
        state.requests += 1
        try:
            if state.client is None:
                state.client = await asyncio.to_thread(self._build, app_name, app)
            result = await asyncio.to_thread(self._acquire, state.client, app.scope)
        except Exception as exc:
            if not isinstance(exc, _request_errors()):
                raise
            state.failures += 1
            explanation = explain_connection_error(exc, stage="token", ctx=ctx)
            error = TokenError(f"token request for app {app_name!r} to {app.authority_url} "
                               f"failed: {type(exc).__name__}: {exc}", explanation=explanation)
            state.error = error.describe()
            state.failed = error
            log.warning("token app=%s failed: %s", app_name, error.describe())
            raise error from None
        if "access_token" not in result:
            state.failures += 1
            code = str(result.get("error", "unknown_error"))
            description = str(result.get("error_description", "")).split("\r\n")[0]
            explanation = explain_token_error(code, description, status=None, ctx=ctx)
            error = TokenError(f"Entra ID refused a token for app {app_name!r} "
                               f"(client_id {app.client_id}): {code}: {description}",
                               aadsts=aadsts_code(description), explanation=explanation)
            state.error = error.describe()
            state.failed = error
            log.error("token app=%s refused: %s", app_name, error.describe())
            raise error
        now = self._clock()
        lifetime = float(result.get("expires_in", 3600))
        state.token = str(result["access_token"])
        logsafe.register_token(state.token)
        state.expires_at = now + lifetime
        state.error, state.failed = "", None
        # Keep the margin, but never refresh more often than every half lifetime.
        margin = clouds.refresh_margin(self._margin, hve=app.hve)
        state.refresh_at = now + max(lifetime - margin, lifetime / 2)
        log.info("token app=%s acquired source=%s expires_in=%ds", app_name,
                 result.get("token_source", "identity_provider"), lifetime)
        return state.token

    def _build(self, app_name: str, app: App) -> Any:
        import msal

        from relay.tokens.httpsession import TimeoutSession

        credential = build_credential(app_name, app)
        host = urlsplit(app.authority_url).hostname or ""
        kwargs: dict[str, Any] = {}
        if host not in _MICROSOFT_HOSTS:
            kwargs["instance_discovery"] = False
        return msal.ConfidentialClientApplication(
            app.client_id,
            client_credential=credential,
            authority=app.authority_url,
            http_client=TimeoutSession(self._trust(app_name), self._timeout),
            **kwargs,
        )

    @staticmethod
    def _acquire(client: Any, scope: str) -> dict[str, Any]:
        import msal

        # Drop msal's cached access tokens: we decide when to refresh (with our margin),
        # and msal would otherwise hand back the same token until 5 minutes before expiry.
        cache = client.token_cache
        for item in list(cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN)):
            cache.remove_at(item)
        result: dict[str, Any] = client.acquire_token_for_client(scopes=[scope])
        return result


def trust(app: App) -> ssl.SSLContext | bool:
    """What HTTPS to the token endpoint (and Graph) trusts: requests' default (certifi, or
    REQUESTS_CA_BUNDLE) and, with ``ca_file``, that anchor too, in one SSL context built from
    the files as they are now. No temporary bundle file: a read-only root file system may
    have no writable /tmp (issue 13)."""
    if app.ca_file is None:
        return True
    import ssl

    import certifi

    context = ssl.create_default_context(
        cafile=os.environ.get("REQUESTS_CA_BUNDLE") or certifi.where())
    context.load_verify_locations(cafile=str(app.ca_file))
    return context


def file_inputs(app: App) -> bytes:
    """A digest of the files an app's clients are built from but its record only names by
    path; a secret or PEM given as {file: PATH} is in the record itself (read at load)."""
    paths: list[Path | None] = [app.ca_file]
    if app.certificate is not None:
        paths.append(app.certificate.pfx)
    return content_digest(paths)


def _request_errors() -> tuple[type[Exception], ...]:
    """What a failed token request raises (msal and requests are loaded by then: _build)."""
    import msal.exceptions
    import requests

    return (requests.RequestException, msal.exceptions.MsalError, OSError, ValueError)
