"""Deliveries recorded together: the DELETEs of messages Exchange took within a few
milliseconds of each other go to the database as one statement (``id = ANY($1)``), one round
trip and one commit for all of them, instead of one each. Each caller still waits for the
commit that covers its message, so "recorded" means what it meant; the window only adds those
milliseconds to the time a crash could send the message again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

__all__ = ["Batch"]

WINDOW = 0.003  # seconds: about one delivery's gap at a few hundred messages a second


class Batch:
    """``run(ids)`` does the statement for a batch; its exception reaches every caller."""

    def __init__(self, run: Callable[[list[str]], Awaitable[None]],
                 window: float = WINDOW) -> None:
        self._run = run
        self._window = window
        self._pending: list[tuple[str, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def add(self, queue_id: str) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((queue_id, done))
        if self._timer is None:
            self._timer = loop.call_later(self._window, self._flush)
        await done

    def _flush(self) -> None:
        self._timer = None
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[str, asyncio.Future[None]]]) -> None:
        try:
            await self._run([queue_id for queue_id, _ in batch])
        except Exception as exc:
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for _, done in batch:
            if not done.done():
                done.set_result(None)
