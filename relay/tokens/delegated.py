"""Delegated (user) tokens: a person signs in once with `m365relay login`, the relay refreshes.

* One msal token cache per account, in ``token_store.directory``, Fernet-encrypted with
  ``token_store.key`` and written atomically with mode 0600 (relay/tokens/store.py).
* The daemon re-reads an account's cache whenever the file changes, so a new `m365relay login`
  takes effect without a restart.
* Refreshes are single-flight per account with the app tokens' margin; a revoked or expired
  refresh token defers mail (TokenError is a DeferError) and names the login command to run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msal
import msal.exceptions
import requests

from relay import logsafe
from relay.config.commands import command
from relay.config.records import Account, App, Config
from relay.diagnosis.errors import TokenError, aadsts_code
from relay.diagnosis.explain import (
    Context,
    Explanation,
    Verdict,
    explain_connection_error,
    explain_token_error,
)
from relay.tokens.signins import FileSignIns, SignIns, SignInsUnavailable
from relay.tokens.store import TokenStore

log = logging.getLogger("m365relay.delegated")

_MICROSOFT_HOSTS = frozenset({
    "login.microsoftonline.com", "login.microsoftonline.us", "login.partner.microsoftonline.cn",
    "login.chinacloudapi.cn", "login.microsoft.com",
})


def login_command(account: str, config_path: Path | None) -> str:
    return command("login", account, config=config_path)


class _ConfidentialDeviceClient(msal.ConfidentialClientApplication):  # type: ignore[misc]
    """msal offers the device-code flow only on public clients, but Entra accepts it from a
    confidential client that also sends its secret; msal's two methods use nothing of
    PublicClientApplication's but this constant, so borrow them (checked against msal 1.3x)."""

    DEVICE_FLOW_CORRELATION_ID = msal.PublicClientApplication.DEVICE_FLOW_CORRELATION_ID
    initiate_device_flow = msal.PublicClientApplication.initiate_device_flow
    acquire_token_by_device_flow = msal.PublicClientApplication.acquire_token_by_device_flow


def build_client(app: App, cache: msal.SerializableTokenCache, http_client: Any) -> Any:
    """A public client, or a confidential one when the app has a secret."""
    kwargs: dict[str, Any] = {"authority": app.authority_url, "token_cache": cache,
                              "http_client": http_client}
    if (urlsplit(app.authority_url).hostname or "") not in _MICROSOFT_HOSTS:
        kwargs["instance_discovery"] = False  # or msal would ask login.microsoftonline.com
    if app.client_secret is not None:
        return _ConfidentialDeviceClient(
            app.client_id, client_credential=app.client_secret.value, **kwargs)
    return msal.PublicClientApplication(app.client_id, **kwargs)


@dataclass
class _AccountState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    client: Any = None
    cache: msal.SerializableTokenCache | None = None
    loaded_version: int | None = None  # the stored copy's version the cache came from
    token: str = ""
    refresh_at: float = 0.0
    expires_at: float = 0.0
    requests: int = 0
    failures: int = 0
    error: str = ""
    needs_login: bool = False
    failed: TokenError | None = None


@dataclass(frozen=True)
class SignInStatus:
    account: str
    app: str
    mailbox: str
    signed_in: bool
    needs_login: bool
    expires_at: float
    error: str
    login_command: str


class DelegatedTokens:
    """Per-account user tokens for the apps with ``flow: delegated``."""

    def __init__(self, config: Config, config_path: Path | None, *, margin: float,
                 session: Callable[[str], requests.Session],
                 clock: Callable[[], float] = time.time) -> None:
        self._session = session
        self._clock = clock
        self._states: dict[str, _AccountState] = {}
        self._store: SignIns | None = None
        self.configure(config, config_path, margin=margin)

    def share(self, signins: SignIns) -> None:
        """Keep the sign-ins where every node of the cluster finds them (relay/tokens/shared.py),
        instead of in ``token_store.directory``."""
        self._store = signins
        for state in self._states.values():
            state.client, state.token, state.refresh_at = None, "", 0.0

    def configure(self, config: Config, config_path: Path | None, *, margin: float) -> None:
        old: Config | None = getattr(self, "_config", None)
        if old is not None:
            # A reloaded config that changes an account's app (client id, authority, ...)
            # must not keep using the msal client built from the old settings.
            for account in old.accounts:
                new = next((a for a in config.accounts if a.name == account.name), None)
                if new is None or new != account or config.apps.get(new.app) != old.apps.get(
                        account.app):
                    self._states.pop(account.name, None)
        self._config = config
        self._config_path = config_path
        self._margin = margin
        store = config.token_store
        if self._store is not None and self._store.shared:
            pass  # the cluster's database: set once by share(), for the process's life
        elif store is not None and store.directory is not None:
            self._store = FileSignIns(TokenStore(
                store.directory, store.key.value, login=lambda a: login_command(a, config_path)))
        else:
            self._store = None
        names = {a.name for a in self._accounts()}
        self._states = {n: s for n, s in self._states.items() if n in names}
        for name in names:
            self._states.setdefault(name, _AccountState())

    def client(self, account: str) -> Any:
        """The account's msal client, None until its next refresh builds one (for tests)."""
        state = self._states.get(account)
        return state.client if state is not None else None

    def drop_clients(self, apps: Collection[str]) -> None:
        """The files these apps' clients were built from changed (SIGHUP): build anew on the
        next refresh; the sign-ins themselves stay in the token store."""
        for account in self._accounts():
            state = self._states.get(account.name)
            if state is not None and account.app in apps:
                state.client = None

    def _accounts(self) -> list[Any]:
        apps = self._config.apps
        return [a for a in self._config.accounts
                if a.app in apps and apps[a.app].flow == "delegated"]

    def account_for(self, app_name: str, mailbox: str) -> str:
        for account in self._accounts():
            if account.app == app_name and account.mailbox.casefold() == mailbox.casefold():
                return str(account.name)
        raise TokenError(f"no account uses delegated app {app_name!r} with mailbox {mailbox!r}")

    def statuses(self) -> list[SignInStatus]:
        out = []
        for account in self._accounts():
            state = self._states[account.name]
            signed_in = self._store is not None and self._store.signed_in(account.name)
            out.append(SignInStatus(
                account.name, account.app, account.mailbox, signed_in,
                state.needs_login or not signed_in, state.expires_at, state.error,
                login_command(account.name, self._config_path)))
        return out

    def invalidate(self, app_name: str, mailbox: str, token: str) -> None:
        state = self._states.get(self.account_for(app_name, mailbox))
        if state is not None and state.token == token:
            state.token, state.refresh_at = "", 0.0

    async def token(self, app_name: str, mailbox: str) -> str:
        name = self.account_for(app_name, mailbox)
        state = self._states[name]
        if state.token and self._clock() < state.refresh_at and not await self._changed(
                name, state):
            return state.token
        async with state.lock:
            # A waiter shares the answer of the refresh it queued behind.
            if state.token and self._clock() < state.refresh_at:
                return state.token
            return await self._refresh(name, app_name, state)

    async def _changed(self, name: str, state: _AccountState) -> bool:
        if self._store is None:
            return False
        try:
            return await self._store.version(name) != state.loaded_version
        except SignInsUnavailable as exc:
            raise TokenError(str(exc)) from None

    async def _refresh(self, name: str, app_name: str, state: _AccountState) -> str:
        app = self._config.apps[app_name]
        account = next(a for a in self._accounts() if a.name == name)
        ctx = Context(mailbox=account.mailbox, app=app_name, client_id=app.client_id,
                      tenant=app.tenant, smtp_host=app.smtp_host,
                      authority_host=urlsplit(app.authority_url).netloc)
        if state.failed is not None and state.needs_login and not await self._changed(
                name, state):
            # Entra will refuse the same refresh token again; wait for a new sign-in.
            raise TokenError(str(state.failed), explanation=state.failed.explanation)
        if self._store is None:  # config requires token_store
            raise TokenError(f"account {name!r} has no token_store to keep its sign-in")
        try:
            async with self._store.refreshing(name):
                return await self._refresh_held(account, app, state, ctx)
        except SignInsUnavailable as exc:
            state.failures += 1
            state.error = str(exc)
            log.warning("token account=%s: %s", name, exc)
            raise TokenError(str(exc), explanation=Explanation(
                Verdict.RETRY, str(exc), "the relay retries by itself once the database "
                "answers")) from None

    async def _refresh_held(self, account: Account, app: App, state: _AccountState,
                            ctx: Context) -> str:
        """The refresh itself, under the store's refresh lease (a cluster's: one node)."""
        assert self._store is not None  # noqa: S101 -- the caller checked
        name, app_name = account.name, account.app
        command = login_command(name, self._config_path)
        shared = self._store.shared
        state.requests += 1
        try:
            if state.client is None or await self._changed(name, state):
                text, version = await self._store.load(name)
                await asyncio.to_thread(self._build, app_name, app, state, text)
                state.loaded_version = version
            # One relay refreshes on its own schedule. In a cluster another node may have just
            # refreshed: its access token, in the copy read above, serves as it is.
            result = await asyncio.to_thread(self._acquire, state, app.scope, account.mailbox,
                                             not shared)
            if shared and result is not None and result.get("token_source") == "cache" \
                    and float(result.get("expires_in", 0)) <= self._margin:
                result = await asyncio.to_thread(self._acquire, state, app.scope,
                                                 account.mailbox, True)
        except (requests.RequestException, msal.exceptions.MsalError, OSError,
                ValueError) as exc:
            state.failures += 1
            explanation = explain_connection_error(exc, stage="token", ctx=ctx)
            error = TokenError(f"token refresh for account {name!r} to {app.authority_url} "
                               f"failed: {type(exc).__name__}: {exc}", explanation=explanation)
            state.error = error.describe()
            log.warning("token account=%s failed: %s", name, error.describe())
            raise error from None
        if result is None:
            return self._fail(name, state, TokenError(
                f"account {name!r} ({account.mailbox}) has not signed in yet: run `{command}` "
                "once, as the relay's user, and follow the printed instructions"))
        if "access_token" not in result:
            code = str(result.get("error", "unknown_error"))
            description = str(result.get("error_description", "")).split("\r\n")[0]
            explanation = explain_token_error(code, description, status=None, ctx=ctx)
            return self._fail(name, state, TokenError(
                f"Entra ID refused to refresh the sign-in of account {name!r} "
                f"({account.mailbox}): {code}: {description}. Mail waits in the queue; "
                f"run `{command}` to sign in again", aadsts=aadsts_code(description),
                explanation=explanation))
        if state.cache is not None and state.cache.has_state_changed:
            # Refresh tokens rotate: persist the new one before using the access token.
            try:
                await self._save(name, state)
            except OSError as exc:
                raise self._unsaved(name, state, exc) from None
        now = self._clock()
        lifetime = float(result.get("expires_in", 3600))
        state.token = str(result["access_token"])
        logsafe.register_token(state.token)
        state.expires_at = now + lifetime
        state.error, state.needs_login, state.failed = "", False, None
        state.refresh_at = now + max(lifetime - self._margin, lifetime / 2)
        log.info("token account=%s refreshed expires_in=%ds", name, lifetime)
        return state.token

    def _unsaved(self, name: str, state: _AccountState, exc: OSError) -> TokenError:
        """The refresh worked but its rotated sign-in cannot be saved: an admin's fix (the
        file system), explained; the new refresh token stays in memory for the next try."""
        assert isinstance(self._store, FileSignIns)  # noqa: S101 - only files raise OSError
        directory = self._store.directory
        reason = exc.strerror or type(exc).__name__
        summary = (f"The sign-in of account {name!r} was refreshed, but the relay cannot save "
                   f"it in `token_store.directory` ({directory}): {reason}. Mail waits in the "
                   "queue.")
        fix = (f"Let the relay's user write {directory}. Under the shipped systemd unit "
               "(ProtectSystem=strict) only /var/lib/m365relay (StateDirectory=) and "
               "/var/spool/m365relay are writable: set `token_store.directory` to "
               "/var/lib/m365relay/tokens, or add the directory to ReadWritePaths= in a "
               "drop-in (`systemctl edit m365relay`). Otherwise check its owner and mode "
               "(`chown -R m365relay: DIR`, `chmod 700 DIR`). Queued mail is retried.")
        error = TokenError(f"cannot save the refreshed sign-in of account {name!r} in "
                           f"token_store.directory {directory}: {type(exc).__name__}: {exc}",
                           explanation=Explanation(Verdict.DEFER_ADMIN, summary, fix))
        state.failures += 1
        state.token, state.refresh_at = "", 0.0
        state.error = error.describe()
        log.error("token account=%s cannot be saved: %s", name, error.describe())
        return error

    def _fail(self, name: str, state: _AccountState, error: TokenError) -> str:
        state.failures += 1
        state.needs_login = True
        state.token, state.refresh_at = "", 0.0
        state.error = error.describe()
        state.failed = error
        log.error("token account=%s needs sign-in: %s", name, error.describe())
        raise error

    def _build(self, app_name: str, app: App, state: _AccountState, text: str | None) -> None:
        cache = msal.SerializableTokenCache()
        if text:
            cache.deserialize(text)
        state.cache = cache
        state.client = build_client(app, cache, self._session(app_name))
        state.token, state.refresh_at = "", 0.0

    async def _save(self, name: str, state: _AccountState) -> None:
        assert self._store is not None and state.cache is not None  # noqa: S101
        version = await self._store.save(name, state.cache.serialize(), state.loaded_version)
        if version is None:
            return  # a new `m365relay login` wrote its sign-in meanwhile: it wins
        state.loaded_version = version
        state.cache.has_state_changed = False

    @staticmethod
    def _acquire(state: _AccountState, scope: str, mailbox: str, force: bool
                 ) -> dict[str, Any] | None:
        client = state.client
        accounts = client.get_accounts(username=mailbox) or client.get_accounts()
        if not accounts:
            return None
        # force_refresh: we decide when to refresh (our margin), not msal's 5-minute rule.
        result: dict[str, Any] | None = client.acquire_token_silent_with_error(
            [scope], account=accounts[0], force_refresh=force)
        return result
