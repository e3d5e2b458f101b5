"""Delegated sign-ins shared by a cluster's relays, in the queue's database
(``relay.spool.pgsignins``), encrypted with ``token_store.key`` as the files are.

One node at a time refreshes an account (a lease on its row); the others wait for it and then
read what it wrote, so a rotated refresh token never strands another node with a retired one.
Every node needs the same ``token_store.key``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Protocol

from relay.tokens.signins import SignInsUnavailable
from relay.tokens.store import Sealer

__all__ = ["SharedSignIns"]

# A refresh is one HTTPS request to Entra (msal's timeout applies); the lease outlives it
# generously, and a node that dies holding it blocks the account for at most this long.
REFRESH_LEASE = 60.0
# Polling, not LISTEN: a waiter waits for one HTTPS round trip of another node, rarely; a
# notification channel per account would cost more than the few queries it saves.
POLL = 0.1


class SignInRows(Protocol):
    """The rows, as :class:`relay.spool.pgsignins.PgSignins` keeps them (the token layer
    sits above the spool but the senders must not depend on it, so only its shape here)."""

    async def get(self, account: str) -> tuple[bytes, int] | None: ...
    async def generation(self, account: str) -> int | None: ...
    async def accounts(self) -> set[str]: ...
    async def login(self, account: str, data: bytes) -> int: ...
    async def refreshed(self, account: str, data: bytes, generation: int) -> int | None: ...
    async def lease(self, account: str, seconds: float) -> bool: ...
    async def release(self, account: str) -> None: ...


class SharedSignIns:
    shared = True

    def __init__(self, rows: SignInRows, sealer: Sealer, where: str) -> None:
        self.rows = rows
        self.sealer = sealer
        self._where = where
        self._known: set[str] = set()

    def where(self, account: str) -> str:
        return f"the queue database ({self._where}), account {account!r}"

    def signed_in(self, account: str) -> bool:
        return account in self._known

    def _seen(self, account: str, present: bool) -> None:
        if present:
            self._known.add(account)
        else:
            self._known.discard(account)

    def _down(self, exc: BaseException) -> SignInsUnavailable:
        return SignInsUnavailable(
            f"cannot reach the sign-ins in the queue database {self._where} "
            f"({type(exc).__name__}: {exc}); mail waits in the queue. Check spool.postgres and "
            "that the database is up")

    async def refresh_known(self) -> None:
        """Which accounts have a sign-in, for the status page before the first delivery."""
        try:
            self._known = await self.rows.accounts()
        except Exception as exc:
            raise self._down(exc) from exc

    async def version(self, account: str) -> int | None:
        try:
            generation = await self.rows.generation(account)
        except Exception as exc:
            raise self._down(exc) from exc
        self._seen(account, generation is not None)
        return generation

    async def load(self, account: str) -> tuple[str | None, int | None]:
        try:
            row = await self.rows.get(account)
        except Exception as exc:
            raise self._down(exc) from exc
        self._seen(account, row is not None)
        if row is None:
            return None, None
        blob, generation = row
        return self.sealer.unseal(blob, account, self.where(account)), generation

    async def save(self, account: str, text: str, version: int | None) -> int | None:
        if version is None:
            return None  # there was no sign-in when the refresh began: a login since wins
        try:
            return await self.rows.refreshed(account, self.sealer.seal(text), version)
        except Exception as exc:
            raise self._down(exc) from exc

    async def login(self, account: str, text: str) -> None:
        """A new sign-in (``m365relay login``): replaces the account's, whatever its version."""
        try:
            await self.rows.login(account, self.sealer.seal(text))
        except Exception as exc:
            raise self._down(exc) from exc
        self._known.add(account)

    async def _take(self, account: str) -> bool:
        """The refresh lease (True), or no sign-in to refresh (False); raises after waiting
        for another node's refresh longer than a refresh can take."""
        deadline = time.monotonic() + REFRESH_LEASE
        try:
            while not await self.rows.lease(account, REFRESH_LEASE):
                if await self.rows.generation(account) is None:
                    return False  # nothing to hold: the refresh says "not signed in"
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(POLL)
            else:
                return True
        except Exception as exc:
            raise self._down(exc) from exc
        raise SignInsUnavailable(
            f"another relay has been refreshing {self.where(account)} for {REFRESH_LEASE:g} s "
            "without finishing; mail waits. Its lease runs out by itself if that relay died")

    @contextlib.asynccontextmanager
    async def refreshing(self, account: str) -> AsyncIterator[None]:
        held = await self._take(account)
        try:
            yield
        finally:
            if held:
                with contextlib.suppress(Exception):  # the lease runs out by itself
                    await self.rows.release(account)
