"""One benchmark run: a scenario against one target, measured and verified.

A run resets the fakes, starts a fresh target process (its cold start is measured on the way),
drives the load, waits until every acknowledged message is in the fake store (and the relay's
spool is empty, or for the PostgreSQL targets the shared queue table, so a late duplicate cannot
slip past), then checks every message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench import database, procstat
from bench.database import BenchDatabase
from bench.load import Connector, Outcome, close_all, hold_idle, run_load
from bench.messages import Message, mailbox_name, make, verify
from bench.scenarios import Scenario
from bench.targets import BENCH_VENV, PG_TARGETS, ROOT, Server, is_relay, start

STALL = 20.0  # longer than the relay's longest retry delay in the bench config (2 s)


class FakesProcess:
    """``python -m bench.fakes`` on its own core, spoken to over a pipe."""

    def __init__(self, proc: asyncio.subprocess.Process, hello: dict[str, Any]) -> None:
        self.proc = proc
        self.info = hello
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, directory: Path, cpus: frozenset[int]) -> FakesProcess:
        command = [sys.executable, "-m", "bench.fakes", "--dir", str(directory)]
        proc = await asyncio.create_subprocess_exec(
            *procstat.pinned_command(command, cpus), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, cwd=ROOT, limit=1 << 28,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not line:
            raise RuntimeError("the fakes process exited during start (see its stderr above)")
        return cls(proc, json.loads(line))

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            await self.proc.stdin.drain()
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fakes process has gone away")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    async def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
    return ordered[index]


def build_plan(scenario: Scenario, run_id: str, seed: int
               ) -> tuple[list[tuple[int, list[Message]]], dict[str, Message]]:
    """Client c sends messages c, c + C, c + 2C, ... all for mailbox c mod M."""
    rng = random.Random(seed)
    plan: list[tuple[int, list[Message]]] = [(c % scenario.mailboxes, [])
                                             for c in range(scenario.clients)]
    sent: dict[str, Message] = {}
    for i in range(scenario.messages):
        mailbox, batch = plan[i % scenario.clients]
        message = make(run_id, i, mailbox_name(mailbox), scenario.size, rng)
        batch.append(message)
        sent[message.id] = message
    return plan, sent


class Run:
    """Measures one (scenario, target, round)."""

    def __init__(self, scenario: Scenario, target: str, round_no: int, *, fakes: FakesProcess,
                 layout: procstat.Layout, work: Path, profile: bool = False,
                 db: BenchDatabase | None = None) -> None:
        self.scenario = scenario
        self.target = target
        self.round = round_no
        self.fakes = fakes
        self.layout = layout
        self.dir = work / f"{scenario.name}-{target}-{round_no}"
        self.profile = profile
        self.result: dict[str, Any] = {"scenario": scenario.name, "target": target,
                                       "round": round_no}
        self.server: Server | None = None  # the first (the only one but in m365relay-pg2)
        self.servers: list[Server] = []
        # The PostgreSQL targets: the bench run's server, this run's database in it, and two
        # connections of the harness's own: to the run's database for the queue-empty check,
        # to the `postgres` database for the counters (so they never count as the relay's).
        self.db = db if target in PG_TARGETS else None
        self.dbname = ""
        self._queue_conn: Any = None
        self._stats_conn: Any = None
        self._polls = 0
        self.sent: dict[str, Message] = {}
        self.outcome = Outcome()
        self._spy: asyncio.subprocess.Process | None = None
        self._conn: Connector | None = None

    async def execute(self) -> dict[str, Any]:
        scenario = self.scenario
        await self.fakes.call("reset")
        if scenario.drop or scenario.data_432:
            await self.fakes.call("faults", drop=scenario.drop, data_432=scenario.data_432,
                                  seed=1000 + self.round)
        # In direct runs the load generator is what talks TLS + XOAUTH2: give it the SUT core.
        me = os.getpid()
        procstat.pin_process(me, self.layout.sut if self.target == "direct"
                             else self.layout.load)
        counters: database.Snapshot | None = None
        try:
            async with asyncio.timeout(scenario.timeout):
                dsn = None
                if self.db is not None:
                    self.dbname, dsn = await asyncio.to_thread(self.db.new_database)
                    self._stats_conn = await asyncpg.connect(self.db.admin_dsn())
                    # Before the relays start: what the run costs the database includes their
                    # start (the schema) and their stop, a few statements for 1,000 messages.
                    counters = await self.db.snapshot(self._stats_conn, self.dbname)
                self.servers = await start(self.target, self.fakes.info, self.dir,
                                           max(scenario.mailboxes, 1), self.layout.sut,
                                           auth=scenario.auth, postgres=dsn,
                                           cpus2=self.layout.sut2)
                self.server = self.servers[0] if self.servers else None
                if dsn is not None:
                    self._queue_conn = await asyncpg.connect(dsn)
                if self.server is not None:
                    self.result["cold_start_s"] = (max(s.ready_at for s in self.servers)
                                                   - min(s.spawned_at for s in self.servers))
                    self.result["relays"] = len(self.servers)
                    # emailproxy dials Exchange for every client, our readiness probe too.
                    probe = await self.fakes.call("stats")
                    self.result["probe_connections"] = (
                        probe["connections"] if self.target == "emailproxy" else 0)
                    self.result["ready_rss"] = procstat.rss_bytes(self.server.pid)
                    await self._start_profiler()
                await getattr(self, f"_{scenario.kind}")()
                await self._settle()
                await self._collect()
        except TimeoutError:
            self.result["error"] = f"run did not finish within {scenario.timeout:.0f} s"
        except Exception as exc:
            self.result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            await self._stop_profiler()
            if self.server is not None:
                self.result["log"] = str(self.server.log)
            await asyncio.gather(*(server.stop() for server in self.servers))
            if self.servers:
                self.result.update(_summed([log_errors(s.log) for s in self.servers]))
                if self.scenario.auth and is_relay(self.target):
                    self.result.update(_summed([auth_stats(s.log) for s in self.servers]))
            await self._close_database(counters)
        return self.result

    async def _close_database(self, before: database.Snapshot | None) -> None:
        """The database's counters once the relays have gone (a backend reports its last
        statistics when it exits), then the run's database dropped."""
        try:
            if self._queue_conn is not None:
                await self._queue_conn.close()
            if self._stats_conn is not None and before is not None and self.db is not None:
                after = await self.db.snapshot(self._stats_conn, self.dbname)
                self.result.update(database.usage(
                    before, after, int(self.result.get("accepted", 0)), self._polls))
        except (OSError, asyncpg.PostgresError) as exc:
            self.result.setdefault("error", f"database counters: {type(exc).__name__}: {exc}")
        finally:
            if self._stats_conn is not None:
                await self._stats_conn.close()
            if self.db is not None and self.dbname:
                # Left behind, its dead rows could only wake autovacuum in a later run.
                with contextlib.suppress(RuntimeError):
                    await asyncio.to_thread(self.db.drop_database, self.dbname)

    async def _backlog(self) -> int:
        """Messages the relay still holds: its spool's queue/ entries, or the shared queue's
        rows (any status) for the PostgreSQL targets."""
        if self._queue_conn is not None:
            self._polls += 1
            return int(await self._queue_conn.fetchval(database.BACKLOG_SQL))
        return sum(s.spool_backlog() for s in self.servers)

    # -- scenario kinds ------------------------------------------------------------------

    def _connector(self) -> Connector:
        """One per run, so a direct client's token is fetched once and reused throughout."""
        if self._conn is None:
            self._conn = Connector(self.target, self.fakes.info,
                                   [s.port for s in self.servers], auth=self.scenario.auth)
        return self._conn

    def _snapshot(self) -> dict[str, float]:
        snap = {"client_cpu": procstat.cpu_seconds(os.getpid()),
                "fakes_cpu": procstat.cpu_seconds(self.fakes.pid), "t": time.monotonic()}
        if self.servers:
            snap["sut_cpu"] = sum(procstat.cpu_seconds(s.pid) for s in self.servers)
        if self.db is not None:
            cpu = self.db.cpu()
            # Backends started during the run count from 0; one that exits is lost (the
            # pool keeps its connections, so only autovacuum workers come and go).
            snap.update({f"db_cpu_{pid}": t for pid, t in cpu.items()})
        return snap

    async def _load(self) -> None:
        scenario = self.scenario
        plan, sent = build_plan(scenario, self.dir.name, seed=self.round)
        self.sent.update(sent)
        before = self._snapshot()
        outcome = await run_load(self._connector(), plan, scenario.per_connection)
        self._merge(outcome)
        stats = await self._wait_delivered()
        after = self._snapshot()
        self._measure(before, after, outcome, stats, len(sent))

    async def _large(self) -> None:
        await self._warm_up()
        if self.server is not None:
            self.result["peak_reset"] = procstat.reset_peak_rss(self.server.pid)
        await self._load()
        self.result["large_size"] = max(len(m.data) for m in self.sent.values())

    async def _idle(self) -> None:
        await self._warm_up()
        assert self.server is not None, "the idle scenario needs a server"
        pid = self.server.pid
        baseline = procstat.rss_bytes(pid)
        writers, failures = await hold_idle(self.server.port, self.scenario.idle_connections)
        try:
            # Sample for a moment: late session objects and thread stacks show up in RSS a
            # little after the banner.
            held = 0
            for _ in range(10):
                held = max(held, procstat.rss_bytes(pid))
                await asyncio.sleep(0.1)
            self.result.update({
                "idle_connections": len(writers), "idle_connection_failures": failures,
                "rss_before_idle": baseline, "rss_with_idle": held,
                "idle_added_bytes": held - baseline,
                "sut_threads_with_idle": procstat.threads(pid),
                "upstream_open_with_idle": (await self.fakes.call("stats"))["open_connections"],
            })
        finally:
            await close_all(writers)

    async def _cold(self) -> None:
        assert self.server is not None, "the cold-start scenario needs a server"
        await self._load()
        self.result["first_delivery_s"] = self.result["end_s"] + (
            self.result["t0"] - self.server.spawned_at)

    async def _warm_up(self) -> None:
        """One small message end to end, so 'idle' means a relay that has worked once."""
        warm = Scenario("warm", "load", messages=1)
        plan, sent = build_plan(warm, f"{self.dir.name}-warm", seed=self.round)
        self.sent.update(sent)
        outcome = await run_load(self._connector(), plan, 1)
        self._merge(outcome)
        await self._wait_delivered(len(self.outcome.accepted))
        if self.server is not None:
            self.result["idle_rss"] = procstat.rss_bytes(self.server.pid)

    # -- measuring -------------------------------------------------------------------------

    def _merge(self, outcome: Outcome) -> None:
        total = self.outcome
        total.accepted |= outcome.accepted
        total.unknown = (total.unknown | outcome.unknown) - total.accepted
        total.given_up |= outcome.given_up
        total.deferred += outcome.deferred
        total.disconnects += outcome.disconnects
        total.connections += outcome.connections
        total.errors.update(outcome.errors)

    async def _wait_delivered(self, n: int | None = None) -> dict[str, Any]:
        n = len(self.outcome.accepted) if n is None else n
        stats = await self._wait_for(n)
        # The relay may still hold a copy it is about to send twice: wait for an empty spool
        # (a directory has no event to wait on, so poll, bounded by the run's timeout).
        for _ in range(int(self.scenario.timeout / 0.05)):
            if not self.servers or not await self._backlog():
                break
            await asyncio.sleep(0.05)
        return stats

    async def _wait_for(self, n: int) -> dict[str, Any]:
        """Until ``n`` messages are stored; gives up early once arrivals stall for STALL s
        (a target that bounced or lost messages would otherwise cost the whole timeout)."""
        deadline = time.monotonic() + self.scenario.timeout
        last_count, last_change = -1, time.monotonic()
        stats: dict[str, Any] = {}
        while time.monotonic() < deadline:
            stats = await self.fakes.call("wait", n=n, timeout=1.0)
            if stats["messages"] >= n:
                break
            if stats["messages"] != last_count:
                last_count, last_change = stats["messages"], time.monotonic()
            elif time.monotonic() - last_change > STALL:
                break
        return stats

    def _measure(self, before: dict[str, float], after: dict[str, float], outcome: Outcome,
                 stats: dict[str, Any], count: int) -> None:
        t0 = before["t"]
        last = stats.get("last_arrival") or after["t"]
        wall = max(last - t0, 1e-9)
        latencies = outcome.latencies
        self.result.update({
            "t0": t0,
            "messages": count,
            "accepted": len(outcome.accepted),
            "end_s": wall,
            "msgs_per_s": len(outcome.accepted) / wall if outcome.accepted else 0.0,
            "ack_msgs_per_s": (len(outcome.accepted) / max(outcome.last_ack - t0, 1e-9)
                               if outcome.accepted else 0.0),
            "ack_p50_ms": _ms(percentile(latencies, 0.50)),
            "ack_p99_ms": _ms(percentile(latencies, 0.99)),
            "ack_mean_ms": _ms(statistics.fmean(latencies) if latencies else None),
            "client_cpu_s": after["client_cpu"] - before["client_cpu"],
            "fakes_cpu_s": after["fakes_cpu"] - before["fakes_cpu"],
            "client_deferred": outcome.deferred,
            "client_disconnects": outcome.disconnects,
            "client_connections": outcome.connections,
            "client_login_refused": outcome.login_refused,
        })
        if "sut_cpu" in after:
            self.result["sut_cpu_s"] = after["sut_cpu"] - before["sut_cpu"]
        if self.db is not None:
            self.result["db_cpu_s"] = sum(t - before.get(key, 0.0) for key, t in after.items()
                                          if key.startswith("db_cpu_"))

    async def _settle(self) -> None:
        if self.servers:
            # Per relay process (the largest, when there are two), as the column says.
            self.result["sut_peak_rss"] = max(procstat.peak_rss_bytes(s.pid)
                                              for s in self.servers)
            self.result["sut_rss_end"] = max(procstat.rss_bytes(s.pid) for s in self.servers)
            self.result["sut_cpu_total_s"] = sum(procstat.cpu_seconds(s.pid)
                                                 for s in self.servers)
            self.result["spool_backlog"] = await self._backlog()

    async def _collect(self) -> None:
        report = await self.fakes.call("report")
        received = report.pop("received")
        outcome = self.outcome
        verdict = verify(self.sent, outcome.accepted, received, outcome.unknown)
        per_mailbox: dict[str, set[int]] = {}
        for item in received:
            per_mailbox.setdefault(item["mailbox"].lower(), set()).add(item["connection"])
        mailboxes = max(len(per_mailbox), 1)
        upstream = report["connections"] - self.result.get("probe_connections", 0)
        self.result.update({
            "verified": verdict.as_dict(),
            "ok": verdict.ok and not outcome.given_up and "error" not in self.result,
            "given_up": len(outcome.given_up),
            "token_requests": report["token_requests"],
            "upstream_connections": upstream,
            "upstream_connections_per_mailbox": upstream / mailboxes,
            "max_delivering_connections_per_mailbox": max(
                (len(c) for c in per_mailbox.values()), default=0),
            "upstream_peak_open": report["peak_open_connections"],
            "upstream_auth_failures": report["auth_failures"],
            "faults_injected": report["faults"],
            "client_errors": dict(outcome.errors.most_common(6)),
        })

    # -- profiling -------------------------------------------------------------------------

    async def _start_profiler(self) -> None:
        spy = BENCH_VENV / "bin" / "py-spy"
        if not self.profile or self.server is None or not spy.exists():
            return
        output = self.dir / f"profile-{self.target}.folded"
        self._spy = await asyncio.create_subprocess_exec(
            str(spy), "record", "--pid", str(self.server.pid), "--rate", "200",
            "--format", "raw", "--output", str(output), "--nonblocking",
            *(["--threads"] if self.target == "emailproxy" else []),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        self.result["profile"] = str(output)

    async def _stop_profiler(self) -> None:
        spy, self._spy = self._spy, None
        if spy is None or spy.returncode is not None:
            return
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            await asyncio.wait_for(spy.wait(), 30)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                spy.kill()
            await spy.wait()


# Lines in a target's log that mean something went wrong inside it.
_LOG_ERRORS = (" ERROR ", "Traceback", "Caught asyncore exception", "exception in thread")


def log_errors(log: Path) -> dict[str, Any]:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return {}
    bad = [line for line in lines if any(mark in line for mark in _LOG_ERRORS)]
    return {"log_error_lines": len(bad), "log_error_sample": bad[0][:300] if bad else ""}


def auth_stats(log: Path) -> dict[str, Any]:
    """Logins the relay accepted, and how many cost an argon2 check (the rest were recognised
    by its credential cache), from its log ("AUTH PLAIN ok ... (cached)")."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return {}
    ok = [line for line in lines if ": AUTH PLAIN ok " in line]
    cached = sum(line.endswith("(cached)") for line in ok)
    return {"auth_logins": len(ok), "auth_checks": len(ok) - cached}


def _summed(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Log figures of several relays as one: counts added, the first sample kept."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, int) and not isinstance(value, bool):
                out[key] = out.get(key, 0) + value
            elif value and not out.get(key):
                out[key] = value
            else:
                out.setdefault(key, value)
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
