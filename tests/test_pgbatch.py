"""relay/spool/pgbatch.py: deliveries recorded together, each caller waiting for its own."""

from __future__ import annotations

import asyncio

import pytest

from relay.spool.pgbatch import Batch


async def test_callers_within_the_window_share_one_statement_and_each_waits_for_it() -> None:
    statements: list[list[str]] = []
    release = asyncio.Event()

    async def run(ids: list[str]) -> None:
        statements.append(ids)
        await release.wait()

    batch = Batch(run, window=0.01)
    calls = [asyncio.create_task(batch.add(f"m{n}")) for n in range(5)]
    async with asyncio.timeout(5):
        while not statements:
            await asyncio.sleep(0.005)
    assert statements == [["m0", "m1", "m2", "m3", "m4"]]
    assert not any(call.done() for call in calls)  # not recorded until the commit is
    release.set()
    await asyncio.gather(*calls)
    await batch.add("m5")  # a later one gets a statement of its own
    assert statements[-1] == ["m5"]


async def test_a_failed_statement_fails_every_caller_of_its_batch() -> None:
    async def run(ids: list[str]) -> None:
        raise OSError(f"database away ({len(ids)})")

    batch = Batch(run, window=0.01)
    results = await asyncio.gather(batch.add("a"), batch.add("b"), return_exceptions=True)
    assert [str(r) for r in results] == ["database away (2)"] * 2
    with pytest.raises(OSError):
        await batch.add("c")
