"""Connection slots for passthrough transactions (``delivery: passthrough``): one of the
mailbox's ``connections_per_mailbox``, shared with the lane's workers, and in cluster mode one of
the cluster's slots too, so spooled and passthrough mail on every node together never open more
connections for a mailbox than Exchange allows."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from relay.delivery.lanes import Lane
from relay.spool.base import SharedLimits

__all__ = ["SLOT_RETRY", "borrowed", "cluster_slot"]

# Seconds before asking again for a cluster connection slot that another node held.
SLOT_RETRY = 0.5


async def cluster_slot(limits: SharedLimits, mailbox: str, limit: int, deadline: float
                       ) -> int | None:
    """A cluster slot for the mailbox, waiting for one until ``deadline`` (loop time)."""
    loop = asyncio.get_running_loop()
    while True:
        slot = await limits.acquire_slot(mailbox, limit)
        if slot is not None or loop.time() + SLOT_RETRY > deadline:
            return slot
        await asyncio.sleep(SLOT_RETRY)  # another node holds them all: its lease, polled


@contextlib.asynccontextmanager
async def borrowed(lane: Lane, limit: int, timeout: float, limits: SharedLimits | None,
                   kick: Callable[[], None]) -> AsyncIterator[bool]:
    """Yields True holding a slot, False if none came free within ``timeout``. ``kick``
    restarts the lane's workers once the slot is given back."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    lane.waiting += 1
    try:
        while len(lane.workers) + lane.borrowed >= limit:
            lane.freed.clear()
            if lane.idle:
                lane.wake.set()  # an idle worker hangs up and makes room
            try:
                await asyncio.wait_for(lane.freed.wait(), deadline - loop.time())
            except TimeoutError:
                break
    finally:
        lane.waiting -= 1
    if len(lane.workers) + lane.borrowed >= limit:
        yield False
        return
    lane.borrowed += 1
    slot: int | None = None
    try:
        if limits is not None:
            slot = await cluster_slot(limits, lane.mailbox, limit, deadline)
        yield limits is None or slot is not None
    finally:
        if limits is not None and slot is not None:
            await limits.release_slot(lane.mailbox, slot)
        lane.borrowed -= 1
        lane.freed.set()
        kick()


class SlotShares:
    """Cluster mode: gives other nodes their share of a mailbox's connection slots. Without it
    a node keeps a slot for as long as its own queue for the mailbox lasts and then for its
    idle_timeout, while a scan accepted by another node waits for all of that.

    Once a second it asks the database which of the mailboxes this node holds slots of other
    nodes are waiting for, and sets each such lane's ``share``: the connection limit divided
    among the nodes that want it (none when they outnumber the slots). Workers over the share
    leave after their current message (idle ones at once), releasing their slots for the
    waiting nodes to take; the lane starts no new worker until the next look."""

    INTERVAL = 1.0

    def __init__(self, limits: SharedLimits, lanes: Callable[[], list[Lane]],
                 limit: Callable[[], int], kick: Callable[[Lane], None]) -> None:
        self._limits = limits
        self._lanes = lanes
        self._limit = limit
        self._kick = kick
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="m365relay-slot-shares")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.INTERVAL)
            self.apply(await self._limits.wanted())

    def apply(self, wanted: dict[str, int]) -> None:
        limit = self._limit()
        for lane in self._lanes():
            others = wanted.get(lane.mailbox.lower())
            # 0 when there are more nodes than slots: this node lets go, and once it holds
            # none it asks again like the others (time-sharing, a message at a time).
            before, lane.share = lane.share, None if others is None else limit // (others + 1)
            if lane.share is not None and lane.idle and lane.active > lane.share:
                lane.wake.set()  # an idle worker over the share leaves now
            elif before is not None and (lane.share is None or lane.share > before):
                self._kick(lane)  # it may start workers again (it does if it has mail)
