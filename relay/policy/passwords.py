"""Local client credentials: argon2 password hashes, verified off the event loop."""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from relay.config.records import Account, Config

if TYPE_CHECKING:
    from argon2 import PasswordHasher


@functools.cache
def _hasher() -> PasswordHasher:
    # argon2-cffi (and cffi) load only once someone logs in or hashes: a relay whose devices
    # are matched by address never needs them.
    from argon2 import PasswordHasher

    return PasswordHasher()


# Verifying against this when the username is unknown keeps the timing of a wrong username
# the same as a wrong password, so usernames cannot be probed.
# Hashed on first use, not at import: argon2 allocates 64 MiB, which start-up and every CLI
# command would otherwise pay for.
@functools.cache
def _dummy_hash() -> str:
    return _hasher().hash("m365relay-dummy-password")


def hash_password(password: str) -> str:
    return _hasher().hash(password)


def _verify(password_hash: str | None, password: bytes) -> bool:
    """In a worker thread: the import, the dummy hash and the check all take milliseconds."""
    from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

    try:
        return _hasher().verify(password_hash or _dummy_hash(), password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def password_hash_for(config: Config, username: bytes) -> tuple[Account | None, str | None]:
    """The account a user name logs in to, and the hash to check its password against."""
    try:
        name = username.decode("utf-8")
    except UnicodeDecodeError:
        name = ""
    account = config.account_for_user(name) if name else None
    return account, account.password_hash if account else None


async def verify(password_hash: str | None, password: bytes) -> bool:
    """One argon2 check, in a worker thread so it never stalls other SMTP sessions (None: the
    user name is unknown; a dummy hash is checked, so that takes as long as a wrong password)."""
    return await asyncio.to_thread(_verify, password_hash, password)


async def authenticate(config: Config, username: bytes, password: bytes) -> Account | None:
    """The account these credentials belong to, or None (no cache, no limits: see
    :class:`relay.limits.AuthGuard` for the listeners' path)."""
    account, password_hash = password_hash_for(config, username)
    ok = await verify(password_hash, password)
    return account if ok and account is not None else None


class CredentialCache:
    """Credentials that passed an argon2 check recently, as Dovecot's ``auth_cache`` keeps them.

    A device that logs in for every message (most printers and scanners do) would otherwise pay
    an argon2 check (tens of milliseconds of CPU, 64 MiB) per message. Kept: an HMAC, under a
    random key made at start and never stored, of (user name, password, stored hash), so
    neither a memory dump nor the key alone gives a password, a changed ``password_hash``
    misses by itself, and a reload clears it all. Only successes are added: a wrong password
    is checked (and counted by the failure limits) every time.
    """

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.clock = clock
        self.max_entries = max_entries
        self._key = secrets.token_bytes(32)
        self._expiry: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def key(self, username: bytes, password: bytes, password_hash: str) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (username, password, password_hash.encode()):
            mac.update(len(part).to_bytes(4, "big") + part)  # length-prefixed: no ambiguity
        return mac.digest()

    def hit(self, key: bytes) -> bool:
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if expiry <= self.clock():
            del self._expiry[key]
            return False
        return True

    def add(self, key: bytes) -> None:
        if self.ttl <= 0:
            return
        self._expiry[key] = self.clock() + self.ttl
        self._expiry.move_to_end(key)
        while len(self._expiry) > self.max_entries:
            self._expiry.popitem(last=False)

    def clear(self) -> None:
        self._expiry.clear()

    def __len__(self) -> int:
        return len(self._expiry)
