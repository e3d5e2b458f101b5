"""``python -m bench.pgdriver``: asyncpg against psycopg 3 (async) on the cluster queue's two
hot shapes, side by side on one throwaway PostgreSQL server (bench/database.py):

* **commit**: a message accepted: the relay's own ``INSERT`` (relay/spool/pgqueue.py: the row
  and its chunks in one statement, an 8 KiB message in one ``bytea[]`` element), its own
  transaction, so one commit and one WAL flush (fsync on) before the client's 250;
* **claim**: a delivery attempt taking the oldest unclaimed message with ``UPDATE ... WHERE
  id = (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING`` and its chunks (over a partial
  index of the unclaimed rows, which only this benchmark adds: the relay claims by id).

``N`` operations of each, spread over ``--tasks`` concurrent tasks, per variant and round; the
order of the variants rotates each round. Variants: each driver with a connection per task
(the driver alone), and asyncpg's pool acquired per operation as the relay does it, with its
default reset on release (one more round trip: ``SELECT pg_advisory_unlock_all(); CLOSE ALL;
UNLISTEN *; RESET ALL``) and with a no-op reset.

psycopg is not a dependency of the project: without ``--no-install`` it is installed into the
running virtualenv (``pip install psycopg[binary]``) for this benchmark only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from bench import procstat
from bench.database import BenchDatabase
from bench.harness import percentile
from relay.spool import pgqueue
from relay.spool.pgschema import upgrade

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 8 * 1024 + 130  # the burst scenario's messages as spooled (headers + 8 KiB)
CLAIM = """
WITH c AS (
    UPDATE m365relay.messages SET claimed_by = $1, lease_until = now() + interval '30 s'
    WHERE id = (SELECT id FROM m365relay.messages
                WHERE status = 'queued' AND claimed_by IS NULL
                ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING id, size, sha256)
SELECT c.*, (SELECT array_agg(data ORDER BY seq) FROM m365relay.chunks
             WHERE message_id = c.id) AS data
FROM c
"""
VARIANTS = ("asyncpg", "psycopg", "asyncpg-pool", "asyncpg-pool-noreset")

Op = Callable[[str, tuple[Any, ...]], Awaitable[Any]]


def _psycopg_sql(sql: str) -> str:
    """``$1, $2, ...`` (each once, in order, in these statements) as psycopg's ``%s``."""
    numbers = [int(n) for n in re.findall(r"\$(\d+)", sql)]
    assert numbers == list(range(1, len(numbers) + 1)), numbers  # our own SQL
    return re.sub(r"\$\d+", "%s", sql.replace("%", "%%"))


def _insert_args(i: int, body: bytes) -> tuple[Any, ...]:
    envelope = json.dumps({"mail_from": "bench-mailbox-0@contoso.example",
                           "rcpt_tos": ["bench-rcpt@example.org"]})
    return (f"M{i:012d}", envelope, "bench", "bench-mailbox-0@contoso.example", len(body),
            hashlib.sha256(body).hexdigest(), time.time(), "bench-a", [body])


class Variant:
    """Opens what one variant needs and runs one statement as that variant does."""

    def __init__(self, name: str, dsn: str, tasks: int) -> None:
        self.name = name
        self.dsn = dsn
        self.tasks = tasks
        self.conns: list[Any] = []
        self.pool: Any = None

    async def __aenter__(self) -> Variant:
        if self.name == "psycopg":
            import psycopg  # installed for this benchmark only

            self.conns = [await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
                          for _ in range(self.tasks)]
        elif self.name == "asyncpg":
            self.conns = [await asyncpg.connect(self.dsn) for _ in range(self.tasks)]
        else:
            async def no_reset(_conn: Any) -> None:
                return None

            # As relay/spool/postgres.py makes it (min 1, max 10), warmed to `tasks`.
            self.pool = await asyncpg.create_pool(
                self.dsn, min_size=self.tasks, max_size=max(10, self.tasks),
                reset=no_reset if self.name.endswith("noreset") else None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in self.conns:
            await conn.close()
        if self.pool is not None:
            await self.pool.close()

    async def run(self, task: int, sql: str, args: tuple[Any, ...]) -> Any:
        if self.name == "psycopg":
            cur = await self.conns[task].execute(_psycopg_sql(sql), args)
            return await cur.fetchone() if cur.description else None
        if self.name == "asyncpg":
            return await self.conns[task].fetchrow(sql, *args)
        async with self.pool.acquire() as conn:
            return await conn.fetchrow(sql, *args)


async def _phase(variant: Variant, n: int, make: Callable[[int], tuple[str, tuple[Any, ...]]],
                 check: Callable[[Any], bool]) -> dict[str, float]:
    latencies: list[float] = []
    counter = iter(range(n))

    async def worker(task: int) -> None:
        for i in counter:
            sql, args = make(i)
            started = time.perf_counter()
            row = await variant.run(task, sql, args)
            latencies.append(time.perf_counter() - started)
            if not check(row):
                raise RuntimeError(f"{variant.name}: unexpected result {row!r}")

    started = time.perf_counter()
    await asyncio.gather(*(worker(t) for t in range(variant.tasks)))
    wall = time.perf_counter() - started
    p99 = percentile(latencies, 0.99) or 0.0
    return {"ops_per_s": n / wall, "p50_ms": (percentile(latencies, 0.5) or 0.0) * 1000,
            "p99_ms": p99 * 1000}


async def one_round(dsn: str, name: str, n: int, tasks: int
                    ) -> dict[str, Any]:
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute("TRUNCATE m365relay.messages, m365relay.chunks")
        await admin.execute("CHECKPOINT")  # each variant starts from the same clean WAL state
    finally:
        await admin.close()
    body = os.urandom(SIZE)
    async with Variant(name, dsn, tasks) as variant:
        # A few untimed statements first, so both drivers have prepared them.
        for t in range(tasks):
            await variant.run(t, pgqueue.INSERT, _insert_args(10**9 + t, body))
            await variant.run(t, CLAIM, (f"warm-{t}",))
        insert = await _phase(variant, n, lambda i: (pgqueue.INSERT, _insert_args(i, body)),
                              lambda row: row is None)
        claim = await _phase(variant, n, lambda i: (CLAIM, (f"node-{i % tasks}",)),
                             lambda row: row is not None and len(row[3][0]) == SIZE)
    return {"variant": name, "commit": insert, "claim": claim}


def _install() -> None:
    if importlib.util.find_spec("psycopg") is None:
        print("installing psycopg[binary] into this virtualenv (for this benchmark only) ...",
              flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", "psycopg[binary]"], check=True)


def table(runs: list[dict[str, Any]], markdown: bool = False) -> str:
    heads = ["driver", "commit ops/s", "commit p50 ms", "commit p99 ms", "claim ops/s",
             "claim p50 ms", "claim p99 ms"]
    rows = []
    for name in VARIANTS:
        mine = [r for r in runs if r["variant"] == name]
        if not mine:
            continue
        row = [name]
        for phase in ("commit", "claim"):
            for key, fmt in (("ops_per_s", "{:.0f}"), ("p50_ms", "{:.2f}"), ("p99_ms", "{:.2f}")):
                values = [r[phase][key] for r in mine]
                cell = fmt.format(statistics.median(values))
                if len(values) > 1:
                    cell += f" ({fmt.format(min(values))}-{fmt.format(max(values))})"
                row.append(cell)
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(len(heads))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                     for r in [heads, *rows])


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    layout = procstat.plan_layout(pin=not args.no_pin)
    procstat.pin_process(os.getpid(), layout.load)
    db = await asyncio.to_thread(BenchDatabase.start, layout.sut)
    runs: list[dict[str, Any]] = []
    try:
        _, dsn = await asyncio.to_thread(db.new_database)
        conn = await asyncpg.connect(dsn)
        try:
            await upgrade(conn, node="bench")  # the relay's real schema
            # The relay claims by id; a "next unclaimed" claim needs this index, or each claim
            # walks past every row claimed before it (2,000 claims: quadratic, and the
            # server's scan, not the driver, is what gets measured).
            await conn.execute("CREATE INDEX bench_unclaimed ON m365relay.messages (id) "
                               "WHERE status = 'queued' AND claimed_by IS NULL")
        finally:
            await conn.close()
        variants = list(args.variant or VARIANTS)
        for round_no in range(args.rounds):
            shift = round_no % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                result = await one_round(dsn, variant, args.n, args.tasks)
                result["round"] = round_no
                runs.append(result)
                print(f"round {round_no} {variant:>20}: commit "
                      f"{result['commit']['ops_per_s']:.0f}/s p99 "
                      f"{result['commit']['p99_ms']:.2f} ms, claim "
                      f"{result['claim']['ops_per_s']:.0f}/s p99 "
                      f"{result['claim']['p99_ms']:.2f} ms", flush=True)
    finally:
        await asyncio.to_thread(db.destroy)
    import psycopg

    return {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "n": args.n,
            "tasks": args.tasks, "rounds": args.rounds, "layout": layout.describe(),
            "asyncpg": asyncpg.__version__, "psycopg": psycopg.__version__,
            "psycopg_impl": psycopg.pq.__impl__, "loadavg": os.getloadavg(), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pgdriver", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000, help="operations per shape (2000)")
    parser.add_argument("--tasks", type=int, default=10, help="concurrent tasks (10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, order rotated (3)")
    parser.add_argument("--variant", action="append", choices=VARIANTS)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--no-install", action="store_true",
                        help="do not pip-install psycopg if it is missing")
    parser.add_argument("--json", type=Path, default=RESULTS / "pgdriver.json")
    args = parser.parse_args(argv)
    if not args.no_install:
        _install()
    data = asyncio.run(main_async(args))
    print()
    print(f"{args.n} operations per shape, {args.tasks} tasks, median (min-max) over "
          f"{args.rounds} rounds")
    print(table(data["runs"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    with contextlib.suppress(OSError):
        args.json.with_suffix(".md").write_text(table(data["runs"], markdown=True) + "\n",
                                                encoding="utf-8")
    print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
