"""Delivery's schedule: which messages wait for their retry time, which are ready, per lane
(app, mailbox), and what an operator's command or a reload changes in it. The workers that
take ready messages upstream are :class:`relay.delivery.scheduler.Delivery`'s."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import replace

from relay.delivery.lanes import Lane
from relay.message import Envelope, QueueEntry

__all__ = ["Schedule"]

log = logging.getLogger("m365relay.delivery")


class Schedule:
    """The in-memory schedule; :meth:`_kick` (the subclass's) starts or wakes a lane's
    workers."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._attempting = 0  # workers in the middle of an attempt (not idle, not pacing)
        self._lanes: dict[tuple[str, str], Lane] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._reloads = 0  # SIGHUPs so far: an attempt begun before one used the old files
        self._later: dict[str, QueueEntry] = {}  # what each timer will submit
        self._stopping = False

    def _kick(self, lane: Lane) -> None:
        raise NotImplementedError

    # --- intake ------------------------------------------------------------------------

    def submit(self, entry: QueueEntry) -> None:
        """Schedule a spooled entry: now, or at its ``next_attempt_at``."""
        if self._stopping:
            return  # it stays in the spool; the next start picks it up
        stale = self._timers.pop(entry.id, None)  # one schedule per message, the newest
        if stale is not None:
            stale.cancel()
        delay = entry.state.next_attempt_at - self._clock()
        if delay > 0:
            loop = asyncio.get_running_loop()
            self._timers[entry.id] = loop.call_later(delay, self._timer_fired, entry)
            self._later[entry.id] = entry
            return
        lane = self._lane(entry.envelope)
        lane.ready.append(entry)
        self._kick(lane)

    def pending(self) -> int:
        """Entries waiting or in flight in memory (not counting ones on a timer)."""
        return sum(len(lane.ready) + len(lane.workers) - lane.idle for lane in self._lanes.values())

    def workers(self) -> int:
        """Delivery workers running (each holds at most one upstream connection)."""
        return sum(len(lane.workers) for lane in self._lanes.values())

    def inflight(self) -> int:
        """Workers in the middle of a delivery attempt (the others are idle or pacing)."""
        return self._attempting

    def forget(self, ids: Collection[str]) -> None:
        """Drop messages from the in-memory schedule (``m365relay queue hold/delete``).

        One in flight finishes its attempt first: it holds the message's spool claim, which
        the operator's command waits for."""
        for queue_id in ids:
            self._later.pop(queue_id, None)
            handle = self._timers.pop(queue_id, None)
            if handle is not None:
                handle.cancel()
        for lane in self._lanes.values():
            if any(e.id in ids for e in lane.ready):
                lane.ready = deque(e for e in lane.ready if e.id not in ids)

    def expedite(self, entries: Iterable[QueueEntry]) -> None:
        """Try now, even on a paused lane: an operator asked (``queue retry/release/bounce``)."""
        entries = list(entries)
        self.forget({e.id for e in entries})
        for entry in entries:
            self._lane(entry.envelope).blocked_until = 0.0
            self.submit(replace(entry, state=replace(entry.state, next_attempt_at=0.0)))

    def reloaded(self, changed_apps: Collection[str]) -> None:
        """After SIGHUP: lanes of apps whose settings or files changed reconnect, and lanes
        paused for a cause the reload may have fixed are tried now, with their messages
        waiting on a retry timer, instead of at the end of their backoff. A lane that still
        fails pauses again (one probe first: ``failures`` is kept until a delivery works)."""
        now = self._clock()
        self._reloads += 1
        retry: list[QueueEntry] = []
        for key, lane in self._lanes.items():
            if lane.app in changed_apps:
                lane.epoch += 1
            if lane.blocked_until <= now or not lane.reload_may_fix:
                continue
            lane.blocked_until, lane.reload_may_fix = 0.0, False
            lane.pauses += 1  # the old pause's timer must not end a later one
            log.info("lane %s: pause ended by the reload; trying again now", lane.mailbox)
            retry += [e for e in self._later.values()
                      if (e.envelope.app, e.envelope.mailbox.lower()) == key]
            if lane.ready:
                self._kick(lane)
        if retry:
            self.expedite(retry)

    def _timer_fired(self, entry: QueueEntry) -> None:
        self._timers.pop(entry.id, None)
        self._later.pop(entry.id, None)
        self.submit(replace(entry, state=replace(entry.state, next_attempt_at=0.0)))

    def _lane(self, envelope: Envelope) -> Lane:
        key = (envelope.app, envelope.mailbox.lower())
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = Lane(envelope.app, envelope.mailbox)
        return lane
