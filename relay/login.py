"""`m365relay login ACCOUNT`: device-code sign-in for an account whose app has `flow: delegated`.

The device-code flow needs no browser on this machine (SSH, containers): it prints a URL and a
code, the person signs in anywhere, and we poll Entra until they have. The resulting msal
cache (with the refresh token) goes to the account's encrypted file in ``token_store``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import msal

from relay.config import commands
from relay.config import records as config_mod
from relay.queue.ops import QueueOps
from relay.spool.base import Change, Store
from relay.spool.filestore import FileStore
from relay.spool.open import open_store
from relay.tokens.delegated import build_client
from relay.tokens.provider import TokenProvider
from relay.tokens.shared import SharedSignIns
from relay.tokens.signins import SignInsUnavailable
from relay.tokens.store import Sealer, TokenStore, TokenStoreError, new_key

DEFAULT_CONFIG = commands.DEFAULT_CONFIG  # the packaged service's config, as doctor's
EX_CONFIG = 78
EX_UNAVAILABLE = 69


class LoginError(Exception):
    """Sign-in did not complete; the message says why and what to do."""


def poll_device_flow(client: Any, flow: dict[str, Any], *,
                     sleep: Callable[[float], None] = time.sleep,
                     clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Poll until the person finishes, honouring ``interval`` and RFC 8628's slow_down.

    Our own loop (one msal attempt per round) so tests can pass a fake ``sleep``."""
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # msal's "Attempted too soon" under a fake sleep
            result: dict[str, Any] = client.acquire_token_by_device_flow(
                flow, exit_condition=lambda _flow: True)
        # msal itself adds 5 s to flow["interval"] on slow_down.
        if result.get("error") not in ("authorization_pending", "slow_down"):
            return result
        if clock() >= float(flow.get("expires_at", 0)):
            return {"error": "expired_token",
                    "error_description": "the code expired before sign-in finished"}
        sleep(float(flow.get("interval", 5)))


def run_login(config: config_mod.Config, config_path: Path | None, account_name: str, *,
              out: TextIO = sys.stdout, sleep: Callable[[float], None] = time.sleep) -> str:
    """Sign ``account_name`` in; returns the signed-in address. Raises LoginError."""
    account = next((a for a in config.accounts if a.name == account_name), None)
    if account is None:
        known = ", ".join(a.name for a in config.accounts)
        raise LoginError(f"no account named {account_name!r} (accounts: {known})")
    app = config.apps[account.app]
    if app.flow != "delegated" or config.token_store is None:
        raise LoginError(f"account {account_name!r} uses app {account.app!r}, which has no "
                         "`flow: delegated`; only delegated apps sign in with a person")
    provider = TokenProvider(config.apps)
    try:
        cache = msal.SerializableTokenCache()
        client = build_client(app, cache, provider.http_session(account.app))
        flow = client.initiate_device_flow(scopes=[app.scope])
        if "user_code" not in flow:
            raise LoginError(f"Entra ID refused to start a sign-in for app {app.client_id}: "
                             f"{flow.get('error')}: {flow.get('error_description')}. Check that "
                             "the app registration allows public client flows (Authentication "
                             "> Allow public client flows) and has the delegated SMTP.Send "
                             "permission")
        print(flow.get("message") or f"Open {flow['verification_uri']} and enter the code "
              f"{flow['user_code']}", file=out, flush=True)
        print(f"Sign in as {account.mailbox}. Waiting...", file=out, flush=True)
        result = poll_device_flow(client, flow, sleep=sleep)
    finally:
        provider.close()
    if "access_token" not in result:
        error = result.get("error")
        hint = ("the code expired: run the command again and finish within the time shown"
                if error == "expired_token" else "run the command again")
        raise LoginError(f"sign-in failed: {error}: "
                         f"{str(result.get('error_description', '')).splitlines()[0:1]}; {hint}")
    user = str((result.get("id_token_claims") or {}).get("preferred_username", ""))
    if user and user.casefold() != account.mailbox.casefold():
        raise LoginError(f"signed in as {user}, but accounts[{account_name}].mailbox is "
                         f"{account.mailbox}: Outlook accepts XOAUTH2 only for the signed-in "
                         "address; sign in as that mailbox or change `mailbox`")
    where = save_signin(config, account.name, cache.serialize(),
                        login=lambda a: commands.command("login", a, config=config_path))
    print(f"Signed in as {user or account.mailbox}; sign-in stored in {where} (a running "
          "relay picks it up by itself).", file=out, flush=True)
    try:
        waiting = retry_waiting(config, account.app, account.mailbox)
    except (OSError, ValueError) as exc:
        print(f"Could not reschedule queued mail ({exc}); it goes out at its next retry, or "
              f"now with `{commands.command('queue', 'retry', '--all', config=config_path)}`.",
              file=out)
    else:
        if waiting:
            print(f"{waiting} queued message(s) for {account.mailbox} are due now.", file=out)
    return user or account.mailbox


def save_signin(config: config_mod.Config, account: str, text: str, *,
                login: Callable[[str], str]) -> str:
    """Store a new sign-in where the relay reads it; returns where that is. ``login``: the
    sign-in command, for the message when the key does not fit."""
    settings = config.token_store
    assert settings is not None  # noqa: S101 -- the caller checked
    if not config.spool.clustered:
        assert settings.directory is not None  # noqa: S101 -- Config checks it
        store = TokenStore(settings.directory, settings.key.value, login=login)
        store.save(account, text)
        return str(store.path(account))
    sealer = Sealer(settings.key.value, login=login)

    async def to_database() -> str:
        store = open_store(config.spool, listen=False)
        try:
            shared = SharedSignIns(store.signins, sealer,  # type: ignore[attr-defined]
                                   config.spool.postgres.shown)  # type: ignore[union-attr]
            await shared.login(account, text)
            return shared.where(account)
        except SignInsUnavailable as exc:
            raise LoginError(f"the sign-in worked but cannot be stored: {exc}") from None
        finally:
            await store.close()
    return asyncio.run(to_database())


def _queue_store(config: config_mod.Config) -> Store | None:
    """The queue as a command sees it (no listening, no node lease), or None if there is
    none yet."""
    if config.spool.clustered:
        return open_store(config.spool, listen=False)
    directory = config.spool.directory
    if directory is None or not directory.is_dir():
        return None
    st = directory.stat()
    # Files we rewrite must stay the relay's when an admin runs this as root.
    owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 and st.st_uid != 0 else None
    # Never Store.open(): it cleans a live relay's tmp/; and only the relay listens.
    return FileStore(directory, owner=owner, listen=False)


def retry_waiting(config: config_mod.Config, app: str, mailbox: str) -> int:
    """Make the mailbox's deferred mail due now and tell a running relay, as `m365relay queue
    retry` does, so a new sign-in does not wait out the backoff (up to delivery.max_backoff)."""
    store = _queue_store(config)
    if store is None:
        return 0

    async def retry() -> int:
        ops = QueueOps(store, wait=0)
        ids = [e.id for e in await store.entries(quarantine=False)
               if e.envelope.app == app and e.envelope.mailbox.casefold() == mailbox.casefold()]
        done = [o.id for o in [await ops.retry(i, wait=0) for i in ids] if o.result == "ok"]
        try:
            if done:
                await store.announce([Change("retry", i) for i in done])
            return len(done)
        finally:
            await store.close()
    return asyncio.run(retry())


def cmd_login(args: argparse.Namespace) -> int:
    if args.new_key:
        print(new_key())
        return 0
    if not args.account:
        print("m365relay login: name the ACCOUNT to sign in (or use --new-key)", file=sys.stderr)
        return 2
    try:
        config = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    try:
        run_login(config, args.config, args.account)
    except (LoginError, TokenStoreError) as exc:
        print(f"m365relay login: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, msal.exceptions.MsalError) as exc:
        print(f"m365relay login: cannot reach Entra ID: {type(exc).__name__}: {exc}; check "
              "the network and `apps.<app>.authority`", file=sys.stderr)
        return EX_UNAVAILABLE
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "login", help="sign an account of a `flow: delegated` app in (device code)",
        description="Print a URL and a code; sign in with them in any browser. The sign-in is "
                    "stored encrypted in token_store.directory (cluster mode: in the queue "
                    "database) for the relay to use.")
    p.add_argument("account", nargs="?", help="accounts[].name to sign in")
    p.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG,
                   help=f"YAML config file (default {DEFAULT_CONFIG})")
    p.add_argument("--new-key", action="store_true",
                   help="print a new token_store key and exit")
    p.set_defaults(func=cmd_login)
