"""Changes made outside delivery's schedule (``m365relay queue``; for a shared store, the other
nodes), as the store's change notification reports them, applied to the schedule: a held or
deleted message is forgotten, a released, retried or bounced one re-read and tried now."""

from __future__ import annotations

import logging

from relay.delivery.scheduler import Delivery
from relay.spool.base import Change, SpoolError

__all__ = ["follow"]

qlog = logging.getLogger("m365relay.queue")  # operators' changes, as `m365relay queue` logs
_DONE = {"retry": "retry now", "release": "released", "bounce": "bounce requested",
         "hold": "put on hold", "delete": "deleted", "commit": "accepted"}
_MAX_ID = 200  # how much of an unknown notice a log line repeats


async def follow(delivery: Delivery) -> None:
    """Apply the store's change notices (``m365relay queue``, other nodes) until cancelled;
    one at a time and in order: "hold X" then "release X" must not swap."""
    async for change in delivery.store.changes():
        try:
            await _apply(delivery, change)
        except Exception:
            qlog.exception("queue control: could not apply %s %s", change.verb,
                           change.queue_id[:_MAX_ID])


async def _apply(delivery: Delivery, change: Change) -> None:
    verb, queue_id = change.verb, change.queue_id
    if verb == "retry" and queue_id == "*":
        entries = await delivery.store.entries(mine=True)
        qlog.info("queue: every queued message (%d) to be tried now, as an operator asked",
                  len(entries))
        delivery.expedite(entries)
        return
    if verb not in _DONE:
        qlog.warning("queue control: ignored unknown notice %r", verb[:_MAX_ID])
        return
    try:
        entry = (None if verb in ("hold", "delete") else await delivery.store.entry(queue_id))
    except SpoolError as exc:
        qlog.warning("queue control: ignored %s %r: %s", verb, queue_id[:_MAX_ID], exc)
        return
    if verb != "commit":
        qlog.info("%s: %s by an operator (m365relay queue)", queue_id, _DONE[verb])
    if entry is None:
        delivery.forget({queue_id})
    elif verb == "commit":
        delivery.submit(entry)  # another node accepted it
    else:
        delivery.expedite([entry])
