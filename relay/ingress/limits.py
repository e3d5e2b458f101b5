"""Abuse accounting for the listeners: connection slots, password guessing, log throttling.

State lives in small dicts keyed by client address (and user name for AUTH), each bounded, so a
flood or a guessing run from many addresses cannot grow memory without limit. Clocks are
injectable: tests run ten-minute windows in milliseconds.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.config.records import AuthLimits

log = logging.getLogger("m365relay.limits")

Clock = Callable[[], float]
_MAX_KEYS = 10_000
# argon2 (argon2-cffi defaults) takes 64 MiB and several threads per check: a guessing run
# must queue here, not fill memory and the thread pool the spool writes also use.
_CONCURRENT_HASHES = 2


class ConnectionSlots:
    """Open sessions of one listener, in total and per client address."""

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: dict[str, int] = {}

    def refusal(self, ip: str, max_total: int, max_per_ip: int) -> str | None:
        """Why a new connection from ``ip`` may not have a slot, or None if it may."""
        if self.total >= max_total:
            return (f"421 4.7.0 Too many connections to this relay (limit {max_total}), "
                    "try again later")
        if self.per_ip.get(ip, 0) >= max_per_ip:
            return (f"421 4.7.0 Too many connections from your address (limit {max_per_ip}), "
                    "try again later")
        return None

    def take(self, ip: str) -> None:
        self.total += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1

    def give_back(self, ip: str) -> None:
        self.total -= 1
        left = self.per_ip.get(ip, 0) - 1
        if left > 0:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)


@dataclass
class _Failures:
    times: collections.deque[float] = field(default_factory=collections.deque)
    pending: int = 0  # checks in flight: they count, or parallel sessions would all get a guess
    blocked_until: float = 0.0


class AuthGuard:
    """Failed logins per client address and per user name, shared by every listener.

    An address (or user name) with ``failures_per_ip`` (``failures_per_user``) failures inside
    ``window`` is refused for ``block`` without its password being checked, so it gets at most
    that many guesses per window. Successful logins reset nothing: a known password must not
    buy an attacker more guesses for other users.
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.hash_slots = asyncio.Semaphore(_CONCURRENT_HASHES)
        self._ips: collections.OrderedDict[str, _Failures] = collections.OrderedDict()
        self._users: collections.OrderedDict[str, _Failures] = collections.OrderedDict()

    def begin(self, limits: AuthLimits, ip: str, user: str) -> str | None:
        """Reserve a password check, or return why this attempt is refused (a 454 reply)."""
        now = self.clock()
        address = self._entry(self._ips, ip, limits, now)
        name = self._entry(self._users, user, limits, now)
        if self._full(address, limits.failures_per_ip, now):
            return "454 4.7.0 Too many failed logins from your address, try again later"
        if self._full(name, limits.failures_per_user, now):
            return "454 4.7.0 Too many failed logins for this user name, try again later"
        address.pending += 1
        name.pending += 1
        return None

    def end(self, limits: AuthLimits, ip: str, user: str, *, ok: bool) -> list[str]:
        """Finish a check begun with :meth:`begin`; returns what became blocked (for the log)."""
        now = self.clock()
        blocked = []
        for table, key, limit, what in ((self._ips, ip, limits.failures_per_ip, "address"),
                                        (self._users, user, limits.failures_per_user, "user")):
            entry = self._entry(table, key, limits, now)
            entry.pending = max(entry.pending - 1, 0)
            if ok or not limit:
                continue
            entry.times.append(now)
            if len(entry.times) >= limit:
                entry.blocked_until = now + limits.block
                entry.times.clear()  # the block is the penalty; afterwards a fresh window
                blocked.append(what)
        return blocked

    def blocked(self, ip: str) -> bool:
        entry = self._ips.get(ip)
        return entry is not None and entry.blocked_until > self.clock()

    @staticmethod
    def _full(entry: _Failures, limit: int, now: float) -> bool:
        if not limit:
            return False
        return entry.blocked_until > now or len(entry.times) + entry.pending >= limit

    @staticmethod
    def _entry(table: collections.OrderedDict[str, _Failures], key: str, limits: AuthLimits,
               now: float) -> _Failures:
        entry = table.get(key)
        if entry is None:
            entry = table[key] = _Failures()
            if len(table) > _MAX_KEYS:
                # Least recently seen first: an address still guessing keeps moving to the end.
                table.popitem(last=False)
        else:
            table.move_to_end(key)
        while entry.times and entry.times[0] <= now - limits.window:
            entry.times.popleft()
        return entry


class LogThrottle:
    """At most one log line per key and interval, so a flood cannot flood the log too."""

    def __init__(self, interval: float = 60.0, clock: Clock = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._seen: collections.OrderedDict[str, tuple[float, int]] = collections.OrderedDict()

    def allow(self, key: str) -> int | None:
        """None to stay quiet; else how many events were kept quiet since the last line."""
        now = self.clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        if len(self._seen) > _MAX_KEYS:
            self._seen.popitem(last=False)
        return last[1] if last is not None else 0


def raise_open_files_limit() -> None:
    """Lift the soft file-descriptor limit to the hard one (often 1024 → 524288 under systemd).

    A connection flood must meet our ``421``; at the soft limit asyncio's accept loop meets
    EMFILE instead and stops accepting anyone for a second at a time.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, 65536) if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or target <= soft:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-files limit from %s to %s: %s", soft, target, exc)
