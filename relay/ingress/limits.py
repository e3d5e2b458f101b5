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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from relay.config.records import AuthLimits
from relay.policy.passwords import CredentialCache

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
    blocked_until: float = 0.0


@dataclass(frozen=True)
class Refusal:
    """A login refused without its password being checked, and why."""

    cause: str  # "blocked" (too many failures) or "busy" (no password-check slot in time)
    reply: str  # the 454 the client gets
    why: str  # for the log: what happened, with the config key


@dataclass(frozen=True)
class Verdict:
    ok: bool
    refusal: Refusal | None = None  # set when the password was not checked
    cached: bool = False  # recognised by the credential cache: no argon2 check ran
    blocked: tuple[str, ...] = ()  # "address"/"user": blocked by this failure (for the log)


class AuthGuard:
    """Password checks for every listener: failure limits, check slots, the credential cache.

    An address (or user name) with ``failures_per_ip`` (``failures_per_user``) failed checks
    inside ``window`` is blocked for ``block``: its logins are refused without their password
    being checked. Only failures count: checks in flight do not (counting them refused the
    sixth concurrent *correct* login from an application server's pool), so the bound is
    enforced where the guess would be evaluated instead: a check that got its hashing slot
    looks at the failures again before it runs. An address thus gets at most ``failures_per_ip``
    wrong guesses evaluated per window, plus the checks already hashing (``_CONCURRENT_HASHES``).
    Successful logins reset nothing: a known password must not buy an attacker more guesses
    for other users.
    """

    def __init__(self, clock: Clock = time.monotonic, *, slot_wait: float = 30.0) -> None:
        self.clock = clock
        self.hash_slots = asyncio.Semaphore(_CONCURRENT_HASHES)
        # A login that waits longer for a slot is refused as busy (clients give up on a reply
        # after a minute or so; a retry later is better than a hung session).
        self.slot_wait = slot_wait
        # Through self.clock, which tests replace after construction.
        self.cache = CredentialCache(ttl=3600.0, clock=lambda: self.clock())  # noqa: PLW0108
        self._ips: collections.OrderedDict[str, _Failures] = collections.OrderedDict()
        self._users: collections.OrderedDict[str, _Failures] = collections.OrderedDict()
        # For /metrics and the bench: what logins cost.
        self.password_checks = 0  # argon2 verifications run
        self.cache_hits = 0
        self.refusals: dict[str, int] = {"blocked": 0, "busy": 0}

    async def check(self, limits: AuthLimits, ip: str, user: str, cache_key: bytes | None,
                    verify: Callable[[], Awaitable[bool]]) -> Verdict:
        """Decide one login: ``verify`` runs the password check, ``cache_key`` (None for an
        unknown user) names the credentials in the cache."""
        self.cache.ttl = limits.cache_ttl
        refusal = self._refusal(limits, ip, user)
        if refusal is None and cache_key is not None and self.cache.hit(cache_key):
            self.cache_hits += 1
            return Verdict(ok=True, cached=True)
        if refusal is None:
            try:
                async with asyncio.timeout(self.slot_wait):
                    await self.hash_slots.acquire()
            except TimeoutError:
                refusal = Refusal("busy", "454 4.7.0 Temporary authentication failure: the "
                                  "relay is busy checking other logins, try again shortly",
                                  f"busy: no password-check slot within {self.slot_wait:g}s")
        if refusal is not None:
            self.refusals[refusal.cause] += 1
            return Verdict(ok=False, refusal=refusal)
        try:
            # Checks that finished while this one waited may have blocked it, or cached it.
            refusal = self._refusal(limits, ip, user)
            if refusal is not None:
                self.refusals[refusal.cause] += 1
                return Verdict(ok=False, refusal=refusal)
            if cache_key is not None and self.cache.hit(cache_key):
                self.cache_hits += 1
                return Verdict(ok=True, cached=True)
            self.password_checks += 1
            ok = await verify()
        finally:
            self.hash_slots.release()
        if ok and cache_key is not None:
            self.cache.add(cache_key)
        return Verdict(ok=ok, blocked=tuple(self._record(limits, ip, user, ok=ok)))

    def _refusal(self, limits: AuthLimits, ip: str, user: str) -> Refusal | None:
        now = self.clock()
        for table, key, limit, what in ((self._ips, ip, limits.failures_per_ip, "address"),
                                        (self._users, user, limits.failures_per_user, "user")):
            entry = self._entry(table, key, limits, now)
            if limit and (entry.blocked_until > now or len(entry.times) >= limit):
                setting = "failures_per_ip" if what == "address" else "failures_per_user"
                left = max(entry.blocked_until - now, 0.0)
                return Refusal(
                    "blocked", f"454 4.7.0 Too many failed logins "
                    f"{'from your address' if what == 'address' else 'for this user name'}, "
                    "try again later",
                    f"blocked: {limit} failed logins for this {what} within "
                    f"{limits.window:g}s, {left:.0f}s left (auth_limits.{setting}, "
                    "auth_limits.block)")
        return None

    def _record(self, limits: AuthLimits, ip: str, user: str, *, ok: bool) -> list[str]:
        """Count a finished check; returns what became blocked (for the log)."""
        if ok:
            return []
        now = self.clock()
        blocked = []
        for table, key, limit, what in ((self._ips, ip, limits.failures_per_ip, "address"),
                                        (self._users, user, limits.failures_per_user, "user")):
            if not limit:
                continue
            entry = self._entry(table, key, limits, now)
            entry.times.append(now)
            if len(entry.times) >= limit:
                entry.blocked_until = now + limits.block
                entry.times.clear()  # the block is the penalty; afterwards a fresh window
                blocked.append(what)
        return blocked

    def reload(self) -> None:
        """A new config (SIGHUP): accounts or their hashes may have changed; forget them all."""
        self.cache.clear()

    def blocked(self, ip: str) -> bool:
        entry = self._ips.get(ip)
        return entry is not None and entry.blocked_until > self.clock()

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
