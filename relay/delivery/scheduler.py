"""Delivery: take spooled messages to Exchange Online, retry, bounce.

Messages are grouped in *lanes*, one per (app, mailbox), because that is the unit Exchange
limits (3 concurrent connections per mailbox) and the unit that fails together (a missing
mailbox permission fails every message of that mailbox). Each lane runs up to
``connections_per_mailbox`` workers; a worker keeps its authenticated connection while there is
work, and through a pause of its lane, and closes it after ``idle_timeout``.

The spool entry is removed only after Exchange said 250 for every recipient. The exception
class decides the rest: :class:`DeferError` → backoff and retry, :class:`BounceError` → DSN and
``failed/``; a :class:`LaneError` (connect, TLS, token, login) or a 421 pauses the whole lane
instead of letting every queued message hammer a broken path.

The queue is a :class:`~relay.spool.base.Store`: per message, one call claims and loads it
(:meth:`~relay.spool.base.Store.checkout`; the file store verifies a large one and sends it
from the file in pieces), one removes it after the 250 (:meth:`~relay.spool.base.Store.checkin`).
That removal is the record that Exchange has the message, and a crash before it means one more
copy, so it comes first, before any logging, and the file store makes it at once on the loop
(an unlink) rather than behind other work in a thread: a crash sends again at most the
messages whose 250 was on its way or just arrived, one per upstream connection. Changes made
outside the schedule (``m365relay queue``, another node) arrive through the store's change
notification, which :func:`relay.delivery.changes.follow` applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import replace

from relay.config.records import Config
from relay.delivery.bounces import Bouncer
from relay.delivery.events import Events
from relay.delivery.intake import Schedule
from relay.delivery.lanes import Counters, Lane
from relay.delivery.pacing import Pacer
from relay.delivery.slots import SLOT_RETRY, SlotShares, borrowed
from relay.diagnosis.errors import (
    AuthRejected,
    BounceError,
    DeferError,
    DeliveryError,
    TokenError,
    accepted_reply,
    log_extra,
)
from relay.message import DeliveryState, Envelope, QueueEntry
from relay.spool.base import CheckOut, SharedLimits, SpoolMissingError, Store
from relay.tokens.provider import TokenProvider
from relay.upstream.counts import Opened
from relay.upstream.graph import GraphConnection
from relay.upstream.smtp import LaneError, UpstreamConnection

log = logging.getLogger("m365relay.delivery")
Upstream = UpstreamConnection | GraphConnection  # apps.<name>.transport: smtp | graph


class AppMissing(DeferError):
    """A reload removed the app queued messages were accepted for."""


class Delivery(Schedule):
    def __init__(self, config: Config, store: Store, tokens: TokenProvider, *,
                 clock: Callable[[], float] = time.time, hostname: str | None = None) -> None:
        self.config = config
        self.store = store
        self.tokens = tokens
        self.counters = Counters()
        self.events = Events()  # per-account outcomes and recent ones, for /metrics and /
        self.connections: set[Upstream] = set()  # held by workers, for /metrics
        self.opened = Opened()  # connections opened, both transports, passthrough's too
        super().__init__(clock)
        self._hostname = hostname or config.hostname or socket.gethostname()
        # Within Exchange's per-mailbox limits (delivery.pacing); reads the settings live so a
        # reload applies.
        self.pacer = Pacer(lambda: self.config.delivery.pacing, config.spool.directory, clock)
        # A store shared by several relays keeps Exchange's limits for all of them.
        self.limits: SharedLimits | None = getattr(store, "limits", None)
        self.pacer.shared = self.limits
        self.shares = None if self.limits is None else SlotShares(
            self.limits, lambda: list(self._lanes.values()),
            lambda: self.config.delivery.connections_per_mailbox, self._kick_ready)
        self._bouncer = Bouncer(self, store, self.events, self.counters, clock=clock,
                                hostname=self._hostname)

    def upstream(self, app_name: str, mailbox: str) -> Upstream | None:
        """A new connection as the workers make them (passthrough uses it); None if the app
        is no longer configured."""
        app = self.config.apps.get(app_name)
        if app is None:
            return None
        kind = GraphConnection if app.transport == "graph" else UpstreamConnection
        return kind(app_name=app_name, app=app, mailbox=mailbox, tokens=self.tokens,
                    timeout=self.config.delivery.timeout, local_hostname=self._hostname,
                    opened=self.opened)

    def slot_limit(self) -> int:
        """``delivery.connections_per_mailbox``, as it is after the last reload."""
        return self.config.delivery.connections_per_mailbox

    def delivered(self, mailbox: str, count: int) -> None:
        """Count recipients a passthrough transaction got accepted, as a worker would."""
        self.counters.delivered += count
        self.pacer.sent(mailbox, count)

    def borrow(self, app: str, mailbox: str, timeout: float
               ) -> contextlib.AbstractAsyncContextManager[bool]:
        """One of the mailbox's ``connections_per_mailbox`` slots for a passthrough transaction,
        shared with this lane's workers (and in cluster mode every node's) so Exchange never
        sees more; yields False if none came free within ``timeout``."""
        lane = self._lane(Envelope(mail_from="", rcpt_tos=(), account="", app=app,
                                   mailbox=mailbox, bounce_to="", client="", received_at=0.0))
        return borrowed(lane, self.config.delivery.connections_per_mailbox, timeout,
                        self.limits, lambda: self._kick_ready(lane))

    def _kick(self, lane: Lane) -> None:
        if lane.blocked_until > self._clock():
            return
        # A path that just failed gets one probe after its pause, not a worker per message.
        limit = 1 if lane.failures else self.config.delivery.connections_per_mailbox
        if lane.share is not None:  # other nodes wait for this mailbox's slots
            limit = min(limit, lane.share)
        if lane.idle:
            lane.wake.set()
        elif len(lane.workers) + lane.borrowed < limit and not lane.slot_retry:
            task = asyncio.create_task(self._worker(lane), name=f"deliver {lane.mailbox}")
            lane.workers.add(task)
            task.add_done_callback(lambda t: self._worker_done(lane, t))

    def _kick_ready(self, lane: Lane) -> None:
        """Kick a lane that has mail, unless delivery is stopping."""
        if lane.ready and not self._stopping:
            self._kick(lane)

    def _slot_retry(self, lane: Lane) -> None:
        lane.slot_retry = False
        self._kick_ready(lane)

    def _worker_done(self, lane: Lane, task: asyncio.Task[None]) -> None:
        lane.workers.discard(task)
        lane.freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery worker for %s crashed", lane.mailbox, exc_info=task.exception())
        self._kick_ready(lane)

    # --- workers -------------------------------------------------------------------------

    async def _worker(self, lane: Lane) -> None:
        """One upstream connection's life. In cluster mode it first leases one of the
        mailbox's connection slots, shared with every node: none free means another node
        holds them all, and the lane asks again in a moment."""
        limits = self.limits
        if limits is None or self.shares is None:
            await self._work(lane)
            return
        self.shares.start()
        slot = await limits.acquire_slot(lane.mailbox, self.config.delivery.connections_per_mailbox)
        if slot is None:
            if not self._stopping and not lane.slot_retry:
                lane.slot_retry = True  # one timer per lane, not one per kick (a query storm)
                asyncio.get_running_loop().call_later(SLOT_RETRY, self._slot_retry, lane)
            return
        try:
            await self._work(lane)
        finally:
            await limits.release_slot(lane.mailbox, slot)

    async def _work(self, lane: Lane) -> None:
        settings = self.config.delivery
        app = self.config.apps.get(lane.app)
        if app is None:
            # A reload renamed or removed the app these messages were accepted for. Without
            # this pause every kick would start a worker that fails at once, in a busy loop.
            self._block(lane, AppMissing(
                f"apps.{lane.app} is no longer in the configuration; messages for "
                f"{lane.mailbox} stay queued until it is back under that name (or give up "
                "on them: `m365relay queue bounce`)"))
            return
        upstream = GraphConnection if app.transport == "graph" else UpstreamConnection
        conn = upstream(app_name=lane.app, app=app, mailbox=lane.mailbox, tokens=self.tokens,
                        timeout=settings.timeout, local_hostname=self._hostname,
                        opened=self.opened)
        epoch = lane.epoch
        self.connections.add(conn)
        lane.active += 1
        try:
            while not self._stopping:
                if lane.share is not None and lane.active > lane.share:
                    return  # other nodes wait for this mailbox: its slot goes to them
                paused = lane.blocked_until > self._clock()
                if paused or not lane.ready:
                    if lane.waiting:
                        return  # an idle connection gives its slot to a waiting passthrough
                    if paused and not conn.connected:
                        return  # nothing to keep; the pause's end starts a worker (a probe)
                    # A paused lane's workers wait it out with their connections open, as idle
                    # ones do: each new one costs Exchange a STARTTLS and a login.
                    if not await self._idle(lane, settings.idle_timeout):
                        return
                    continue
                key = (lane.app, lane.mailbox.lower())
                if not await self.pacer.admit(key):
                    return
                try:
                    if not lane.ready or lane.blocked_until > self._clock():
                        continue  # emptied or paused while this worker waited for the pace
                    if lane.epoch != epoch:
                        return  # a reload changed the app: a new worker connects anew
                    entry = lane.ready.popleft()
                    self._attempting += 1
                    try:
                        await self._attempt(lane, conn, entry)
                    finally:
                        self._attempting -= 1
                finally:
                    self.pacer.done(key)
        except asyncio.CancelledError:
            conn.abort()  # the shutdown deadline passed mid-send: no polite QUIT to wait on
            raise
        finally:
            lane.active -= 1
            self.connections.discard(conn)
            await conn.close()

    @staticmethod
    async def _idle(lane: Lane, timeout: float) -> bool:
        """Wait for work (a kick, or the end of the lane's pause); False after ``timeout``."""
        lane.idle += 1
        lane.wake.clear()
        try:
            await asyncio.wait_for(lane.wake.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            lane.idle -= 1
        return True

    async def _attempt(self, lane: Lane, conn: Upstream, entry: QueueEntry) -> None:
        """One attempt under the message's claim, so ``m365relay queue`` never acts on it at
        the same moment."""
        out = await self.store.checkout(entry.id)
        if out.lock_error is not None:
            # e.g. no locks on this filesystem: delivering unlocked beats not delivering.
            log.warning("%s: cannot lock the queued message (%s); delivering anyway", entry.id,
                        out.lock_error)
        elif out.busy_for is not None:
            # A shared store: another holder's claim (an operator's command, or the lease of a
            # node that died mid-attempt) has not run out yet. Not gone: try again after it.
            self.submit(replace(entry, state=replace(
                entry.state, next_attempt_at=self._clock() + out.busy_for)))
            return
        elif out.missing:
            log.info("%s: no longer queued (delivered, held or deleted meanwhile); dropped from "
                     "the schedule", entry.id)
            return
        try:
            # The state in the store has the operator's changes (bounce); the one in memory is
            # newer only if saving it failed.
            if out.claim is not None and out.claim.state.attempts >= entry.state.attempts:
                entry = replace(entry, state=out.claim.state)
            await self._deliver(lane, conn, entry, out)
        finally:
            await self.store.checkin(out)  # a no-op when it was removed after delivery

    async def _deliver(self, lane: Lane, conn: Upstream, entry: QueueEntry, out: CheckOut
                       ) -> None:
        env, state = entry.envelope, entry.state
        rcpts = list(state.pending_rcpts if state.pending_rcpts is not None else env.rcpt_tos)
        reloads = self._reloads
        age = self._clock() - env.received_at
        if isinstance(out.error, SpoolMissingError):
            # Deleted by an operator, or damaged and already moved to corrupt/ by the spool.
            log.error("%s: dropped from the delivery schedule: %s", entry.id, out.error)
            return
        if out.error is not None or out.message is None:
            log.error("%s: cannot read spooled message: %s; it stays queued", entry.id,
                      out.error)
            await self._defer(entry, rcpts, DeferError(f"spool read failed: {out.error}"))
            return
        data = out.message
        given_up = self._bouncer.given_up(entry, age)
        if given_up is not None:  # an operator's bounce, or too old: handled like a 5xx
            await self._bouncer.bounce(entry, dict.fromkeys(rcpts, given_up), data)
            return
        try:
            refused, reply = await conn.send(env.mail_from, rcpts, data)
        except BounceError as exc:
            await self._bouncer.bounce(entry, dict.fromkeys(rcpts, exc.outcome()), data)
            return
        except DeferError as exc:
            self.pacer.throttled((lane.app, lane.mailbox.lower()), exc)
            # The path failed (connect, TLS, token, login), or a 421 closed the session for
            # whatever reason the server has: pause the lane. A 432 inside a working session
            # (Exchange's submission limit for the mailbox) defers only this message; the pacer
            # slows the mailbox down, and the lane keeps its authenticated connections.
            if self._reloads != reloads and reload_may_fix(exc):
                # It failed on what a reload replaced while it was in flight (the old CA, the
                # old secret): no pause, and the next try uses the new.
                await self._defer(entry, rcpts, exc, reloads=reloads)
                return
            if isinstance(exc, LaneError | AuthRejected | TokenError) or exc.code == 421:
                self._block(lane, exc)
            await self._defer(entry, rcpts, exc, reloads=reloads)
            return
        except Exception as exc:
            # A bug must not strand the message in memory: log it and retry on schedule.
            log.exception("%s: unexpected error while delivering", entry.id)
            await conn.close()
            await self._defer(entry, rcpts, DeferError(f"internal error: {exc!r}"))
            return
        await self._delivered(lane, conn, entry, out, rcpts=rcpts, refused=refused, reply=reply)

    async def _delivered(self, lane: Lane, conn: Upstream, entry: QueueEntry, out: CheckOut,
                         *, rcpts: list[str], refused: dict[str, DeliveryError], reply: str
                         ) -> None:
        """Exchange took the message: for every recipient, or refused some."""
        if not refused:
            # Record it before anything else: until the record is written a crash means one
            # more copy (the file store unlinks at once, on the loop: see FileStore.checkin).
            await self.store.checkin(out, remove=True)
        if lane.failures:
            lane.failures = 0
            for _ in range(len(lane.ready)):  # the path works again: back to full width
                self._kick(lane)
        await self._sent(lane, conn, entry, out, rcpts=rcpts, refused=refused, reply=reply)

    async def _sent(self, lane: Lane, conn: Upstream, entry: QueueEntry, out: CheckOut, *,
                    rcpts: list[str], refused: dict[str, DeliveryError], reply: str) -> None:
        """After Exchange took the message: count, log, and deal with refused recipients."""
        assert out.message is not None  # noqa: S101 -- it was just sent
        data = out.message
        age = self._clock() - entry.envelope.received_at
        accepted = [r for r in rcpts if r not in refused]
        sent = accepted_reply(reply)
        for rcpt in accepted:
            log.info("%s: to=<%s>, relay=%s, delay=%.1f, status=sent (%s)", entry.id, rcpt,
                     conn.relay, age, reply, extra=log_extra(sent))
            self.events.record("sent", entry, rcpt, sent)
        self.counters.delivered += len(accepted)
        self.pacer.sent(lane.mailbox, len(accepted))
        bounced = {r: e.outcome() for r, e in refused.items() if isinstance(e, BounceError)}
        later = [r for r, e in refused.items() if not isinstance(e, BounceError)]
        if bounced:
            await self._bouncer.bounce(entry, bounced, data, keep=later)
        if later:
            first = refused[later[0]]
            self.pacer.throttled((lane.app, lane.mailbox.lower()), first)
            await self._defer(entry, later, first, partly_sent=bool(accepted))
        if not refused:
            log.info("%s: removed", entry.id)

    def _block(self, lane: Lane, exc: DeliveryError) -> None:
        if lane.blocked_until > self._clock():
            return  # a sibling worker's attempt already paused the lane for this outage
        lane.failures += 1
        lane.pauses += 1
        lane.reload_may_fix = reload_may_fix(exc)
        wait = max(self._backoff(lane.failures), exc.retry_after)
        lane.blocked_until = self._clock() + wait
        log.warning("lane %s paused for %ds: %s", lane.mailbox, wait, exc.describe())
        asyncio.get_running_loop().call_later(wait, self._unblock, lane, lane.pauses)

    def _unblock(self, lane: Lane, pause: int) -> None:
        if pause != lane.pauses:
            return
        lane.blocked_until = 0.0
        self._kick_ready(lane)

    def _backoff(self, attempts: int) -> float:
        settings = self.config.delivery
        return float(min(settings.max_backoff, settings.min_backoff * 2 ** max(attempts - 1, 0)))

    async def _defer(self, entry: QueueEntry, rcpts: list[str], exc: DeliveryError, *,
                     reloads: int | None = None, partly_sent: bool = False) -> None:
        """Keep the message for a retry after its backoff; at once instead when a reload
        since ``reloads`` (the attempt's start) may have fixed what it failed on.
        ``partly_sent``: Exchange took the message for the others, and until the state naming
        who is left is saved a crash sends it to them again."""
        attempts = entry.state.attempts + 1
        wait = max(self._backoff(attempts), exc.retry_after)
        if reloads is not None and reloads != self._reloads and reload_may_fix(exc):
            wait = 0
        state = DeliveryState(attempts=attempts, next_attempt_at=self._clock() + wait,
                              pending_rcpts=tuple(rcpts), last_error=exc.describe()[:2000])
        self.counters.deferred += 1
        outcome = exc.outcome()
        for rcpt in rcpts:
            log.warning("%s: to=<%s>, %s, status=deferred (%s), retry in %ds", entry.id, rcpt,
                        self._bouncer.trail(entry), outcome.text, wait, extra=log_extra(outcome))
            self.events.record("deferred", entry, rcpt, outcome)
        try:
            # partly_sent: not behind other work (the file store: on its own thread, not
            # behind ingress's fsyncs in the shared pool).
            await self.store.save_state(entry.id, state, urgent=partly_sent)
        except OSError as exc2:
            # The message itself is safe; only its retry schedule is lost (it retries sooner).
            log.error("%s: cannot save retry state: %s", entry.id, exc2)
        if reloads is not None and reloads != self._reloads and reload_may_fix(exc):
            state = replace(state, next_attempt_at=0.0)  # reloaded while the state was saved
        self.submit(replace(entry, state=state))

    # --- lifecycle -----------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Stop taking work; let in-flight messages finish within ``timeout``, then cancel.

        A cancelled message stays in the spool and is retried on the next start (it may then
        be delivered twice, which is the safe side: never lost)."""
        self._stopping = True
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._later.clear()
        workers = [t for lane in self._lanes.values() for t in lane.workers]
        for lane in self._lanes.values():
            lane.wake.set()
        await self.pacer.close()  # wakes workers waiting for their pace; saves the counts
        if self.shares is not None:
            await self.shares.stop()
        if workers:
            await self._finish(workers, timeout)

    async def _finish(self, workers: list[asyncio.Task[None]], timeout: float) -> None:
        started = time.monotonic()
        _done, pending = await asyncio.wait(workers, timeout=timeout)
        if pending:
            # Idle workers only wait to say QUIT to Exchange: cancelling them loses nothing.
            if self._attempting:
                log.warning("shutdown: %d delivery attempt(s) in flight after %.1fs; cancelling "
                            "(the messages stay queued and are retried on the next start)",
                            self._attempting, time.monotonic() - started)
            else:
                log.debug("shutdown: closing %d idle upstream connection(s)", len(pending))
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=5)


def reload_may_fix(exc: DeliveryError) -> bool:
    """A path failure an admin fixes in the config or its files: a token (secret, certificate,
    CA), TLS or login problem, or an app the config lost. Not the server's own wait."""
    if exc.retry_after > 0 or exc.code == 421:
        return False
    return isinstance(exc, LaneError | AuthRejected | TokenError | AppMissing)
