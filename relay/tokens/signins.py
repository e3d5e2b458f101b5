"""Where delegated sign-ins live, as :class:`~relay.tokens.delegated.DelegatedTokens` sees it:
one encrypted file per account (one relay), or rows in the cluster's database
(:mod:`relay.tokens.shared`).

Each copy has a version (the file's mtime, the row's generation): a refresh writes its rotated
refresh token back only over the version it read, so a new ``m365relay login`` that landed
meanwhile always wins over a refresh that started before it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # cryptography costs memory; serve imports this module before any sign-in
    from relay.tokens.store import TokenStore

__all__ = ["FileSignIns", "SignIns", "SignInsUnavailable"]


class SignInsUnavailable(Exception):
    """The sign-ins cannot be read or written right now (the database is away); mail waits.
    The message says what to check."""


class SignIns(Protocol):
    # True when other relays use the same copies: a refresh then happens under a lease, and a
    # cached access token another node just obtained is used rather than refreshed again.
    shared: bool

    def where(self, account: str) -> str:
        """Where the account's sign-in is, for messages."""

    def signed_in(self, account: str) -> bool:
        """Whether the account has a sign-in, as last seen (never blocks)."""

    async def version(self, account: str) -> int | None: ...

    async def load(self, account: str) -> tuple[str | None, int | None]:
        """(the msal cache as text or None, its version)."""

    async def save(self, account: str, text: str, version: int | None) -> int | None:
        """Write over ``version``; the new version, or None if another sign-in replaced it."""

    def refreshing(self, account: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Held while the account's refresh token is used and its successor written."""


class FileSignIns:
    """The token store's files, for one relay (the file spool)."""

    shared = False

    def __init__(self, store: TokenStore) -> None:
        self.store = store
        self.directory = store.directory

    def where(self, account: str) -> str:
        return str(self.store.path(account))

    def signed_in(self, account: str) -> bool:
        return self.store.path(account).exists()

    async def version(self, account: str) -> int | None:
        return self.store.mtime(account)

    async def load(self, account: str) -> tuple[str | None, int | None]:
        def read() -> tuple[str | None, int | None]:
            version = self.store.mtime(account)
            return self.store.load(account), version
        return await asyncio.to_thread(read)

    async def save(self, account: str, text: str, version: int | None) -> int | None:
        def write() -> int | None:
            if self.store.mtime(account) != version:
                return None  # a new `m365relay login` wrote the file meanwhile: it wins
            self.store.save(account, text)
            return self.store.mtime(account)
        return await asyncio.to_thread(write)

    @contextlib.asynccontextmanager
    async def refreshing(self, account: str) -> AsyncIterator[None]:
        yield  # one relay: the account's asyncio lock in DelegatedTokens is enough
