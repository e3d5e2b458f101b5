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
