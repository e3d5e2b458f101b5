"""Pacing: keep each mailbox within Exchange Online's sending limits.

Exchange Online allows 30 messages a minute and 10,000 recipients in a rolling 24 hours per
mailbox, and answers a burst beyond that with throttling replies (``432 4.3.2``, ``4.7.5xx``,
``5.2.2 submission quota``). A relay that forwards an ERP's 500 invoices as fast as it can
trips those limits and then spends hours in backoff; pacing spreads the burst instead.

Per lane (app, mailbox) :class:`Pacer` admits one message every ``60 / messages_per_minute``
seconds, and never more than ``messages_per_minute`` in any 60 seconds, counting a message from
the moment it starts until 60 s after Exchange answered it: wherever in that span Exchange
counts it, its own 60-second window cannot hold more. A throttling reply halves the lane's rate,
which then recovers by a tenth of the configured rate per minute (AIMD), so the relay backs
off instead of hammering. Only one worker of a lane waits on a timer; its siblings queue on the
lane's gate, so 500 paced messages cost one timer, and lanes never wait for each other.

Recipients per mailbox are counted per minute over a rolling day, kept in ``pacing.json`` in
the spool directory (written atomically, a few seconds after a change) so a restart does not
forget them, and logged as a warning when a mailbox nears the 10,000 limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.config.records import PacingSettings
from relay.diagnosis.errors import DeliveryError
from relay.spool.base import SharedLimits

log = logging.getLogger("m365relay.pacing")

WINDOW = 60.0  # Exchange's message limit is per minute
DAY = 86400.0
DAILY_RECIPIENT_LIMIT = 10_000
MIN_RATE = 1.0  # messages a minute; a throttled lane never stops altogether
RECOVERY = 0.1  # of the configured rate, regained per minute without throttling
SAVE_DELAY = 5.0  # seconds between a count and writing pacing.json
STATE_FILE = "pacing.json"
SHARE_DELAY = 1.0  # seconds a cluster node gathers recipients before adding them up

# 432 4.3.2 (threads/connections), 4.7.500-699 (temporary restriction), X.2.2 (submission
# quota), and HTTP 429 from a Graph transport.
_THROTTLE_STATUS = re.compile(r"(?<![\w.])(4\.3\.2|[45]\.2\.2|4\.7\.[56]\d\d)(?![\w.])")
_THROTTLE_TEXT = re.compile(r"submission ?quota|thread limit|concurrent connection|throttl",
                            re.IGNORECASE)


def is_throttling(exc: DeliveryError) -> bool:
    """Whether Exchange (or Graph) told us to slow down, rather than something else failing."""
    if exc.code in (429, 432) or _THROTTLE_STATUS.fullmatch(exc.status):
        return True
    # The upstream's own reply words; an error built without them (a local one) by its text.
    text = exc.reply or str(exc)
    return bool(_THROTTLE_STATUS.search(text) or _THROTTLE_TEXT.search(text))


@dataclass
class LanePace:
    """One lane's pace. Pure bookkeeping on numbers, so tests can drive it with any clock."""

    next_start: float = 0.0
    in_flight: int = 0
    finished: deque[float] = field(default_factory=deque)  # within the last WINDOW
    reduced: float | None = None  # rate after a throttling reply, recovering
    reduced_at: float = 0.0
    throttles: int = 0
    sends: deque[int | None] = field(default_factory=deque)  # cluster admissions in flight
    gate: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def rate(self, base: float, now: float) -> float:
        """Messages a minute allowed now."""
        if self.reduced is None:
            return base
        rate = self.reduced + base * RECOVERY * max(now - self.reduced_at, 0.0) / 60.0
        if rate >= base:
            self.reduced = None
            return base
        return rate

    def delay(self, base: float, now: float) -> float | None:
        """Seconds until the next message may start; None: only when one in flight ends."""
        while self.finished and self.finished[0] <= now - WINDOW:
            self.finished.popleft()
        rate = self.rate(base, now)
        wait = max(self.next_start - now, 0.0)
        if self.in_flight + len(self.finished) >= max(int(rate), 1):
            if not self.finished:
                return None
            wait = max(wait, self.finished[0] + WINDOW - now)
        return wait

    def start(self, base: float, now: float) -> None:
        self.in_flight += 1
        self.next_start = now + 60.0 / self.rate(base, now)

    def finish(self, now: float) -> None:
        self.in_flight = max(self.in_flight - 1, 0)
        self.finished.append(now)
        self.changed.set()

    def throttled(self, base: float, now: float) -> float | None:
        """Halve the rate; None if this reply answers a message sent before the last halving."""
        self.throttles += 1
        current = self.rate(base, now)
        if self.reduced is not None and now - self.reduced_at < 60.0 / current:
            return None
        self.reduced = max(current / 2, MIN_RATE)
        self.reduced_at = now
        self.next_start = max(self.next_start, now + 60.0 / self.reduced)
        return self.reduced


class RecipientLedger:
    """Recipients per mailbox per minute over a rolling day."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.counts: dict[str, dict[int, int]] = {}
        self.warned: dict[str, int] = {}  # mailbox -> threshold it was warned about

    def load(self, now: float) -> None:
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            counts = {str(box): {int(m): int(n) for m, n in minutes}
                      for box, minutes in data["recipients"].items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("cannot read %s (%s); recipient counts for the last 24 h start from "
                        "zero. The file is rewritten on the next delivery.", self.path, exc)
            return
        self.counts = counts
        self.prune(now)

    def prune(self, now: float) -> None:
        oldest = int((now - DAY) // 60)
        for box in list(self.counts):
            minutes = self.counts[box]
            for minute in [m for m in minutes if m <= oldest]:
                del minutes[minute]
            if not minutes:
                del self.counts[box]

    def add(self, mailbox: str, recipients: int, now: float) -> int:
        minutes = self.counts.setdefault(mailbox.lower(), {})
        minute = int(now // 60)
        minutes[minute] = minutes.get(minute, 0) + recipients
        return self.total(mailbox, now)

    def total(self, mailbox: str, now: float) -> int:
        oldest = int((now - DAY) // 60)
        minutes = self.counts.get(mailbox.lower(), {})
        return sum(n for m, n in minutes.items() if m > oldest)

    def totals(self, now: float) -> dict[str, int]:
        return {box: self.total(box, now) for box in sorted(self.counts)}

    def snapshot(self) -> str:
        return json.dumps({"recipients": {box: sorted(minutes.items())
                                          for box, minutes in self.counts.items()}})

    def save(self, text: str) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        # 0600 like every spool file (it names the mailboxes); fchmod for a leftover tmp file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(fd, 0o600)
            f.write(text)
            f.flush()
            os.fsync(fd)
        tmp.replace(self.path)


class Pacer:
    """Admission per lane, throttling feedback and recipient counts for :class:`Delivery`."""

    def __init__(self, settings: Callable[[], PacingSettings], directory: Path | None,
                 clock: Callable[[], float],
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock  # wall time, for the rolling day that survives restarts
        # Pacing runs on a clock that never steps back: a wall clock set back an hour (NTP at
        # boot on a device without RTC) must not stall a mailbox for that hour.
        self._monotonic = monotonic
        self.lanes: dict[tuple[str, str], LanePace] = {}
        # Throttling replies per lane, also with pacing off: /metrics and the throttling alert.
        self.throttle_replies: dict[tuple[str, str], int] = {}
        self.ledger = RecipientLedger(directory / STATE_FILE if directory is not None else None)
        self.ledger.load(clock())
        self._closed = False
        self._save_timer: asyncio.TimerHandle | None = None
        self._saving: asyncio.Task[None] | None = None
        # Cluster mode: the same limits counted for every node (relay/spool/pglimits.py).
        self.shared: SharedLimits | None = None
        self._unshared: dict[str, int] = {}  # recipients not yet added to the cluster's count
        self._share_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _lane(self, key: tuple[str, str]) -> LanePace:
        pace = self.lanes.get(key)
        if pace is None:
            pace = self.lanes[key] = LanePace()
        return pace

    async def admit(self, key: tuple[str, str]) -> bool:
        """Wait until the lane may start a message; False if delivery is stopping.

        A True admission must be followed by :meth:`done` once the attempt is over."""
        if self._settings().messages_per_minute <= 0:
            return not self._closed
        pace = self._lane(key)
        async with pace.gate:  # one waiter per lane holds a timer; the others wait here
            while True:
                base = self._settings().messages_per_minute
                if self._closed:
                    return False
                now = self._monotonic()
                if base <= 0:
                    return True  # switched off by a reload meanwhile
                wait = pace.delay(base, now)
                if wait == 0:
                    break
                pace.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pace.changed.wait(), wait)
            pace.start(base, now)
            if self.shared is not None:
                return await self._admit_shared(pace, key[1], base)
            return True

    async def _admit_shared(self, pace: LanePace, mailbox: str, base: float) -> bool:
        """The cluster's window too: every node's sends for the mailbox in the last minute.
        Waited for under the lane's gate, so one worker per lane asks."""
        assert self.shared is not None  # noqa: S101 -- the caller checked
        while not self._closed:
            wait, send_id = await self.shared.admit(mailbox, max(1, int(base)))
            if wait <= 0:
                pace.sends.append(send_id)
                return True
            pace.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pace.changed.wait(), wait)
        pace.finish(self._monotonic())  # admitted locally, then stopped: not in flight
        return False

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def done(self, key: tuple[str, str]) -> None:
        pace = self.lanes.get(key)
        if pace is not None:
            pace.finish(self._monotonic())
            if self.shared is not None and pace.sends:
                self._background(self.shared.sent(pace.sends.popleft()))

    def throttled(self, key: tuple[str, str], exc: DeliveryError) -> None:
        """Feedback from a failed attempt: slow the lane down if it was throttling."""
        if not is_throttling(exc):
            return
        self.throttle_replies[key] = self.throttle_replies.get(key, 0) + 1
        base = self._settings().messages_per_minute
        if base <= 0:
            return
        if self.shared is not None:  # every node slows this mailbox down
            self._background(self.shared.throttled(key[1], str(exc)))
        rate = self._lane(key).throttled(base, self._monotonic())
        if rate is not None:
            log.warning("mailbox %s is being throttled by Exchange Online (%s); pacing it at "
                        "%.1f messages a minute for now, recovering to %g "
                        "(delivery.pacing.messages_per_minute) over the next minutes",
                        key[1], str(exc)[:200], rate, base)

    def sent(self, mailbox: str, recipients: int) -> None:
        """Count recipients Exchange accepted for ``mailbox``; warn near the daily limit."""
        if recipients <= 0:
            return
        now = self._clock()
        total = self.ledger.add(mailbox, recipients, now)
        self._schedule_save()
        if self.shared is not None and self._settings().messages_per_minute > 0:
            # Counted in the database a second later, per mailbox: one statement per mailbox
            # per second under load rather than a round trip per message. (With pacing off
            # the cluster keeps no send rows to count on: each node warns by its own count.)
            box = mailbox.lower()
            self._unshared[box] = self._unshared.get(box, 0) + recipients
            if self._share_timer is None:
                self._share_timer = asyncio.get_running_loop().call_later(
                    SHARE_DELAY, self._share)
            return
        self._warn(mailbox, total)

    def _share(self) -> None:
        self._share_timer = None
        counts, self._unshared = self._unshared, {}
        for box, recipients in counts.items():
            self._background(self._shared_sent(box, recipients))

    async def _shared_sent(self, mailbox: str, recipients: int) -> None:
        assert self.shared is not None  # noqa: S101 -- the caller checked
        total = await self.shared.recipients(mailbox, recipients)
        if total is not None:  # the cluster's day, not only this node's
            self._warn(mailbox, total)

    def _warn(self, mailbox: str, total: int) -> None:
        threshold = self._settings().recipients_per_day_warning
        box = mailbox.lower()
        if threshold <= 0 or total < threshold:
            self.ledger.warned.pop(box, None)
            return
        level = DAILY_RECIPIENT_LIMIT if total >= DAILY_RECIPIENT_LIMIT else threshold
        if self.ledger.warned.get(box, 0) >= level:
            return
        self.ledger.warned[box] = level
        log.warning("mailbox %s sent to %d recipients in the last 24 hours; Exchange Online "
                    "refuses more than %d a rolling day per mailbox (5.2.2 submission quota) "
                    "and m365relay then keeps the mail queued until the window passes. Spread "
                    "the devices over more mailboxes or send less (warning at "
                    "delivery.pacing.recipients_per_day_warning = %d)", mailbox, total,
                    DAILY_RECIPIENT_LIMIT, threshold)

    def recipients_24h(self) -> dict[str, int]:
        return self.ledger.totals(self._clock())

    def rate(self, key: tuple[str, str]) -> float:
        """The lane's current messages a minute (0: not paced)."""
        base = self._settings().messages_per_minute
        pace = self.lanes.get(key)
        if base <= 0 or pace is None:
            return base
        return pace.rate(base, self._monotonic())

    def _schedule_save(self) -> None:
        if self._save_timer is not None or self.ledger.path is None:
            return
        if self._closed:
            # An attempt that finished during shutdown: no loop left to write later.
            try:
                self.ledger.save(self.ledger.snapshot())
            except OSError as exc:
                log.warning("cannot write %s (%s)", self.ledger.path, exc)
            return
        self._save_timer = asyncio.get_running_loop().call_later(SAVE_DELAY, self._save_soon)

    def _save_soon(self) -> None:
        self._save_timer = None
        if self._saving is None or self._saving.done():
            self._saving = asyncio.create_task(self._save())
        else:
            self._schedule_save()  # one write at a time; the next one picks up this change

    async def _save(self) -> None:
        self.ledger.prune(self._clock())
        try:
            await asyncio.to_thread(self.ledger.save, self.ledger.snapshot())
        except OSError as exc:
            log.warning("cannot write %s (%s); recipient counts would be lost on a restart",
                        self.ledger.path, exc)

    async def close(self) -> None:
        """Wake every waiting worker (they return False) and write the counts."""
        self._closed = True
        for pace in self.lanes.values():
            pace.changed.set()
        if self._share_timer is not None:
            self._share_timer.cancel()
            self._share()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._save_timer is not None:
            self._save_timer.cancel()
            self._save_timer = None
            if self._saving is not None:
                await asyncio.wait([self._saving])
            await self._save()
        elif self._saving is not None:
            await asyncio.wait([self._saving])
