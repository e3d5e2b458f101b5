"""Local client credentials: argon2 password hashes, verified off the event loop."""

from __future__ import annotations

import asyncio
import functools
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


async def authenticate(config: Config, username: bytes, password: bytes) -> Account | None:
    """The account these credentials belong to, or None. Hashing runs in a worker thread so
    one slow argon2 check never stalls other SMTP sessions."""
    try:
        name = username.decode("utf-8")
    except UnicodeDecodeError:
        name = ""
    account = config.account_for_user(name) if name else None
    password_hash = account.password_hash if account else None
    ok = await asyncio.to_thread(_verify, password_hash, password)
    return account if ok and account is not None else None
