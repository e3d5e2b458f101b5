"""AUTH PLAIN and LOGIN on a device's session: the SASL answers decoded (and refused when
malformed or over-long), the password checked off the loop through the listener's
:class:`~relay.ingress.limits.AuthGuard` (a few at a time, with per-session, per-address and
per-user failure limits), and the account it logs in as. :class:`relay.ingress.session.RelaySMTP`
is built on it."""

from __future__ import annotations

import asyncio
import logging
from base64 import b64decode
from typing import TYPE_CHECKING, Any, Protocol

from aiosmtpd.smtp import MISSING, AuthResult, LoginPassword

from relay.config.records import Account
from relay.ingress.compat import CompatSMTP
from relay.ingress.peers import safe
from relay.policy import passwords as auth

if TYPE_CHECKING:
    from relay.config.records import Config
    from relay.ingress.limits import AuthGuard, LogThrottle

log = logging.getLogger("m365relay.listener")


class AuthHost(Protocol):
    """What AUTH needs from the listener: the accounts, the guard, the log throttle."""

    config: Config
    guard: AuthGuard
    quiet: LogThrottle

    def login_failed(self) -> None:
        """A login was refused (counted for /metrics)."""
        ...


class AuthSMTP(CompatSMTP):
    """The AUTH part of a session; the session (RelaySMTP) sets these in its ``__init__``."""

    # aiosmtpd 1.4.6 sends "User Name\x00"; Xerox printers, Go and curl give up on the NUL.
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    relay_handler: AuthHost
    client: str
    account: Account | None       # authenticated account
    _busy: bool                   # a check is running: not idle (no timeout, no reclaim)
    _auth_failures: int
    _close_after_reply: bool

    # AUTH PLAIN/LOGIN as in aiosmtpd, but the password check is awaited (argon2 runs in a
    # thread) instead of aiosmtpd's synchronous authenticator callback.
    async def challenge_auth(self, challenge: str | bytes, encode_to_b64: bool = True,
                             log_client_response: bool = False) -> Any:
        """aiosmtpd's challenge, but an over-long answer is refused instead of crashing the
        command with a ValueError (StreamReader.readline raises it past the buffer limit)."""
        try:
            return await super().challenge_auth(challenge, encode_to_b64)
        except ValueError as exc:
            # readline() has dropped what it buffered; when the line's LF had not arrived
            # yet, the rest of that line is still to come: drop it up to its LF.
            while "not found" in str(exc):
                try:
                    await self._reader.readuntil(b"\n")
                    break
                except asyncio.LimitOverrunError as more:
                    await self._reader.read(more.consumed)
            await self.push("501 5.5.2 Authentication answer too long")
            return MISSING

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return self._aborted()
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return self._aborted()
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return self._aborted()
        return await self._check("PLAIN", parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if login is MISSING:
                return self._aborted()
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return self._aborted()
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return self._aborted()
        return await self._check("LOGIN", login, password)

    @staticmethod
    def _aborted() -> AuthResult:
        # Malformed or cancelled (and already answered): no password was tried, so it is no
        # guess; repeated, it meets the error limit.
        return AuthResult(success=False, handled=True)

    def _failed(self, reply: str) -> AuthResult:
        """A refused password (or a refused attempt): the session gets a few of them."""
        self._auth_failures += 1
        if self._auth_failures >= self.relay_handler.config.auth_limits.failures_per_session:
            log.warning("%s: %d failed AUTH attempts, closing the session "
                        "(auth_limits.failures_per_session)", self.client, self._auth_failures)
            reply += f"; {self._auth_failures} failures, closing"
            self._close_after_reply = True
        return AuthResult(success=False, handled=False, message=reply)

    async def _check(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        handler = self.relay_handler
        guard = handler.guard
        limits = handler.config.auth_limits
        name = login.decode("utf-8", errors="replace")
        user = safe(name, 64)
        account, password_hash = auth.password_hash_for(handler.config, login)
        key = None if password_hash is None else guard.cache.key(login, password, password_hash)
        self._busy = True  # a login waiting for its check is not idle (no timeout, no reclaim)
        try:
            verdict = await guard.check(limits, self.client, name, key,
                                        lambda: auth.verify(password_hash, password))
        finally:
            self._busy = False
        refusal = verdict.refusal
        if refusal is not None:
            quiet = handler.quiet.allow(f"auth-{refusal.cause} {self.client} {user}")
            if quiet is not None:
                more = f" ({quiet} more since the last report)" if quiet else ""
                log.warning("%s: AUTH %s for user %r refused without checking the password, "
                            "%s%s", self.client, mechanism, user, refusal.why, more)
            if refusal.cause == "busy":  # not the client's fault: no failure counted
                return AuthResult(success=False, handled=False, message=refusal.reply)
            return self._failed(refusal.reply)
        for what in verdict.blocked:
            key_name = "failures_per_ip" if what == "address" else "failures_per_user"
            # (Worded so the log redactor does not take "AUTH <word> <word>" for credentials.)
            log.warning("AUTH: too many failed logins for %s %s; its logins are refused for "
                        "%gs (auth_limits.%s, auth_limits.block)",
                        what, self.client if what == "address" else repr(user), limits.block,
                        key_name)
        if not verdict.ok or account is None:
            log.warning("%s: AUTH %s failed for user %r", self.client, mechanism, user)
            handler.login_failed()
            return self._failed("535 5.7.8 Authentication credentials invalid")
        log.info("%s: AUTH %s ok user=%r account=%s%s", self.client, mechanism, user,
                 account.name, " (cached)" if verdict.cached else "")
        self.account = account
        return AuthResult(success=True, auth_data=LoginPassword(login, b""))
