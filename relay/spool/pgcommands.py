"""The queue commands on the cluster queue (``m365relay queue hold|release|delete|bounce|...``):
the operator's half of :class:`~relay.spool.postgres.PgStore`. A command claims a message as
a node's attempt does (its own holder name, the same lease), so neither acts on it at the same
moment, whichever node runs it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from relay.config.pgdsn import PgDsn
from relay.config.records import SpoolSettings
from relay.message import DeliveryState, Message
from relay.spool import pgqueue
from relay.spool.base import Claim as AnyClaim
from relay.spool.base import SpoolBusyError, SpoolMissingError
from relay.spool.pgrows import DOWN, state_from, unavailable

__all__ = ["PgClaim", "PgCommands"]


@dataclass
class PgClaim:
    id: str
    state: DeliveryState
    holder: str
    size: int = 0
    sha256: str = ""
    first: list[bytes] | None = None  # a small message's chunks, read with the claim


class PgCommands:
    """Mixed into PgStore, which provides these."""

    dsn: PgDsn
    settings: SpoolSettings

    async def _pool(self) -> Any:
        raise NotImplementedError

    async def _claim(self, queue_id: str, status_: str, *, owned: bool, inline: int
                     ) -> PgClaim | None:
        raise NotImplementedError

    async def _exec(self, sql: str, *args: Any, what: str) -> str:
        raise NotImplementedError

    async def _message(self, claim: PgClaim) -> Message:
        raise NotImplementedError

    # --- the queue commands

    async def claim(self, queue_id: str, *, held: bool = False, wait: float | None = None
                    ) -> PgClaim | None:
        status_ = "held" if held else "queued"
        deadline = time.monotonic() + (wait if wait is not None else self.settings.lease * 2)
        while True:
            try:
                claim = await self._claim(queue_id, status_, owned=False, inline=0)
                if claim is not None:
                    return claim
                if not await self._holds(queue_id, status_):
                    return None
            except DOWN as exc:
                raise unavailable(self.dsn, exc, f"claim message {queue_id}") from exc
            if time.monotonic() >= deadline:
                raise SpoolBusyError(f"message {queue_id} is being delivered (claimed by "
                                     "another node or command); try again in a moment")
            await asyncio.sleep(0.1)  # another holder's lease: poll it with the deadline

    async def _holds(self, queue_id: str, status_: str) -> bool:
        async with (await self._pool()).acquire() as conn:
            return bool(await conn.fetchval(pgqueue.IN_STATUS, queue_id, status_))

    async def unclaim(self, claim: AnyClaim) -> None:
        if isinstance(claim, PgClaim) and claim.holder:
            holder, claim.holder = claim.holder, ""
            await self._exec(pgqueue.UNCLAIM, claim.id, holder, what="release")

    async def load(self, queue_id: str, *, claim: AnyClaim | None = None, held: bool = False
                   ) -> Message:
        row = await self._row(queue_id, "held" if held else "queued")
        if row is None:
            raise SpoolMissingError(f"message {queue_id} is not in the queue at "
                                    f"{self.dsn.shown}")
        fake = PgClaim(queue_id, state_from(row), "", row["size"], row["sha256"])
        return await self._message(fake)

    async def _row(self, queue_id: str, status_: str | None) -> Any:
        try:
            async with (await self._pool()).acquire() as conn:
                return await conn.fetchrow(pgqueue.ROW, queue_id, status_)
        except DOWN as exc:
            raise unavailable(self.dsn, exc, f"read message {queue_id}") from exc

    async def read(self, queue_id: str, *, held: bool = False) -> bytes:
        message = await self.load(queue_id, held=held)
        return message.data if message.data is not None else await asyncio.to_thread(
            message.read_all)

    async def remove(self, queue_id: str) -> None:
        await self._exec(pgqueue.DELETE, queue_id, what="record the delivery")

    async def hold(self, queue_id: str) -> None:
        await self._move(queue_id, "queued", "held", "put on hold")

    async def release(self, queue_id: str) -> None:
        await self._move(queue_id, "held", "queued", "released")

    async def _move(self, queue_id: str, src: str, dest: str, what: str) -> None:
        done = await self._exec(pgqueue.MOVE, queue_id, src, dest, what=what)
        if done == "UPDATE 0":
            raise SpoolMissingError(f"message {queue_id} is not {src}")

    async def delete(self, queue_id: str, *, held: bool = False) -> None:
        done = await self._exec(pgqueue.DELETE_IN, queue_id, "held" if held else "queued",
                                what="delete")
        if done == "DELETE 0":
            raise SpoolMissingError(f"message {queue_id} is not "
                                    f"{'held' if held else 'queued'}")
