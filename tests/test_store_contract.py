"""The storage seam's contract (relay/spool/base.py): what delivery, passthrough, ingress, the
queue commands and the status page rely on, checked against every store. Today that is the file
store; a second store (PostgreSQL, issue 15) adds itself to ``STORES`` and must pass as is.

Each store comes as a pair: the relay's handle (opened, listening for changes) and a second
handle on the same queue, as a queue command or another node has it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from conftest import base_config, message, send

from relay.config import records as config_mod
from relay.message import Content, DeliveryState, Envelope
from relay.sandbox import Sandbox
from relay.service.lifecycle import Relay
from relay.spool.base import (
    Change,
    SpoolBusyError,
    SpoolError,
    SpoolMissingError,
    SpoolUnavailableError,
    Store,
)
from relay.spool.filestore import FileStore
from relay.spool.store import INLINE_LIMIT


@dataclass
class Pair:
    relay: Store  # opened: the relay's own handle
    other: Store  # a queue command's, or another node's


def file_pair(tmp_path: Path) -> tuple[Store, Callable[[], Store]]:
    directory = tmp_path / "spool"
    return FileStore(directory), lambda: FileStore(directory, listen=False)


def postgres_pair(dsn: str) -> tuple[Store, Callable[[], Store]]:
    pytest.importorskip("asyncpg")
    from relay.spool.postgres import PgStore

    def settings(node: str) -> config_mod.SpoolSettings:
        return config_mod.SpoolSettings.model_validate({"postgres": dsn, "node": node})
    return PgStore(settings("a")), lambda: PgStore(settings("a"), listen=False)


STORES = {"file": file_pair, "postgres": postgres_pair}


@pytest.fixture(params=sorted(STORES))
async def pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Pair]:
    where = request.getfixturevalue("pg_dsn") if request.param == "postgres" else tmp_path
    relay, other = STORES[request.param](where)
    assert await relay.open() == []
    second = other()
    try:
        yield Pair(relay, second)
    finally:
        await second.close()
        await relay.close()


def envelope(*rcpts: str) -> Envelope:
    return Envelope(mail_from="scanner@contoso.example", rcpt_tos=rcpts or ("a@example.org",),
                    account="scanner", app="contoso", mailbox="scanner@contoso.example",
                    bounce_to="device@printers.example", client="192.0.2.7",
                    received_at=1_764_000_000.0, original_from="device@printers.example")


BODY = b"Subject: contract\r\n\r\nline one\r\n.dot line\r\nGr\xc3\xbc\xc3\x9fe\r\n"


async def test_commit_then_entries_and_load_give_back_what_went_in(pair: Pair) -> None:
    queue_id = await pair.relay.commit(envelope("a@example.org", "b@example.org"),
                                       (BODY[:10], memoryview(BODY)[10:]))
    (entry,) = await pair.other.entries()
    assert entry.id == queue_id and entry.size == len(BODY)
    assert entry.envelope == envelope("a@example.org", "b@example.org")
    assert entry.state == DeliveryState()
    assert await pair.other.entry(queue_id) == entry
    assert await pair.other.locate(queue_id) == "queue"
    assert await pair.other.read(queue_id) == BODY
    out = await pair.relay.checkout(queue_id)
    try:
        assert out.claim is not None and out.message is not None and out.error is None
        assert out.message.size == len(BODY) and out.message.read_all() == BODY
        assert out.message.eightbit and out.claim.state == DeliveryState()
    finally:
        await pair.relay.checkin(out)


async def test_a_large_message_is_read_in_pieces(pair: Pair) -> None:
    big = (b"x" * 999 + b"\r\n") * (INLINE_LIMIT // 1000 + 50)
    queue_id = await pair.relay.commit(envelope(), big)
    out = await pair.relay.checkout(queue_id)
    try:
        message = out.message
        assert message is not None and message.size == len(big)
        pieces = [await asyncio.to_thread(message.read_at, start, 65536)
                  for start in range(0, len(big), 65536)]
        assert b"".join(pieces) == big
    finally:
        await pair.relay.checkin(out)


async def test_a_claim_is_exclusive_until_checked_in(pair: Pair) -> None:
    queue_id = await pair.relay.commit(envelope(), BODY)
    out = await pair.relay.checkout(queue_id)
    assert out.claim is not None
    assert await pair.other.is_claimed(queue_id)
    with contextlib.suppress(SpoolBusyError):  # "busy" or None: either way, not yours
        assert await pair.other.claim(queue_id, wait=0) is None
    await pair.relay.checkin(out)
    assert not await pair.other.is_claimed(queue_id)
    claim = await pair.other.claim(queue_id, wait=5)
    assert claim is not None and claim.id == queue_id
    await pair.other.unclaim(claim)


async def test_save_state_is_what_the_next_claim_sees(pair: Pair) -> None:
    queue_id = await pair.relay.commit(envelope("a@example.org", "b@example.org"), BODY)
    state = DeliveryState(attempts=2, next_attempt_at=1_764_000_600.0,
                          pending_rcpts=("b@example.org",), last_error="421 4.3.2 try later")
    await pair.relay.save_state(queue_id, state)
    (entry,) = await pair.other.entries()
    assert entry.state == state
    claim = await pair.other.claim(queue_id, wait=5)
    assert claim is not None and claim.state == state
    await pair.other.unclaim(claim)
    with pytest.raises(SpoolMissingError):
        await pair.relay.save_state("0" * len(queue_id), state)


async def test_delivered_messages_are_gone(pair: Pair) -> None:
    queue_id = await pair.relay.commit(envelope(), BODY)
    await pair.relay.checkin(await pair.relay.checkout(queue_id), remove=True)
    assert await pair.other.entries() == [] and await pair.other.locate(queue_id) is None
    again = await pair.relay.checkout(queue_id)
    assert again.missing and again.claim is None and again.message is None
    await pair.relay.checkin(again)
    await pair.relay.remove(queue_id)  # removing what is gone is not an error


async def test_fail_keeps_it_aside_with_its_reason(pair: Pair) -> None:
    queue_id = await pair.relay.commit(envelope(), BODY)
    where = await pair.relay.fail(queue_id, "<a@example.org>: 550 5.1.10 not found")
    assert isinstance(where, str) and queue_id in where
    assert await pair.other.entries() == [] and await pair.other.locate(queue_id) == "failed"
    assert (await pair.other.kept_aside())["failed"] == 1
    with pytest.raises(SpoolMissingError):
        await pair.relay.fail(queue_id, "twice")


async def test_hold_release_and_delete(pair: Pair) -> None:
    queue_id = await pair.relay.commit(envelope(), BODY)
    await pair.relay.save_state(queue_id, DeliveryState(attempts=1, next_attempt_at=2e9))
    claim = await pair.other.claim(queue_id, wait=5)
    assert claim is not None
    await pair.other.hold(queue_id)
    await pair.other.unclaim(claim)
    assert await pair.relay.entries() == [] and await pair.relay.locate(queue_id) == "hold"
    assert [e.id for e in await pair.relay.held_entries()] == [queue_id]
    assert (await pair.relay.checkout(queue_id)).missing  # delivery cannot take a held one
    claim = await pair.other.claim(queue_id, held=True, wait=5)
    assert claim is not None
    await pair.other.release(queue_id)
    await pair.other.unclaim(claim)
    (entry,) = await pair.relay.entries()
    assert entry.state == replace(DeliveryState(attempts=1), next_attempt_at=0.0)  # due now
    claim = await pair.other.claim(queue_id, wait=5)
    assert claim is not None
    await pair.other.delete(queue_id)
    await pair.other.unclaim(claim)
    assert await pair.relay.entries() == [] and await pair.relay.locate(queue_id) is None


async def test_changes_reach_the_relay_in_order(pair: Pair) -> None:
    assert await pair.other.relay_running()
    sent = [Change("hold", "1K1N1EEH0NZ5BZR"), Change("release", "1K1N1EEH0NZ5BZR"),
            Change("retry", "*")]
    assert await pair.other.announce(sent)
    changes = pair.relay.changes()
    got = [await asyncio.wait_for(anext(changes), 10) for _ in sent]
    assert got == sent


async def test_nobody_listens_to_a_store_no_relay_opened(tmp_path: Path) -> None:
    (tmp_path / "spool" / "queue").mkdir(parents=True)
    alone = FileStore(tmp_path / "spool", listen=False)
    assert not await alone.relay_running()
    assert not await alone.announce([Change("retry", "*")])


async def test_a_store_that_cannot_write_refuses_before_the_client_gets_250(
        tmp_path: Path) -> None:
    def dev_full(path: str, flags: int, mode: int) -> int:
        import os
        return os.open("/dev/full", os.O_WRONLY)

    store = FileStore(tmp_path / "spool", opener=dev_full)
    await store.open()
    try:
        with pytest.raises(SpoolError):
            await store.commit(envelope(), BODY)
        assert await store.entries() == []
        assert await store.probe() is None  # the probe writes without the opener
    finally:
        await store.close()


class Outage(FileStore):
    """A store that is down while ``down`` is set, as a database behind the seam can be: each
    commit raises SpoolUnavailableError instead of storing."""

    down = False

    async def commit(self, envelope: Envelope, content: Content) -> str:
        if self.down:
            raise SpoolUnavailableError("the queue database is unreachable (test outage)")
        return await super().commit(envelope, content)


async def test_a_store_outage_is_a_4xx_and_mail_flows_again_after(
        sandbox: Sandbox, tmp_path: Path, password_hash: str) -> None:
    # The relay runs on another Store implementation passed in: ingress and delivery do not
    # know which; an unavailable store never lets a client see 250.
    config = config_mod.parse(base_config(sandbox, tmp_path, password_hash), base_dir=tmp_path)
    store = Outage(tmp_path / "spool")
    relay = Relay(config, store=store)
    await relay.start()
    try:
        store.down = True
        code, reply = await asyncio.to_thread(send, relay.addresses["local"], message("during"))
        assert (code, reply[:5]) == (451, b"4.3.0")
        assert sandbox.exchange.messages == [] and await store.entries() == []
        store.down = False
        code, _ = await asyncio.to_thread(send, relay.addresses["local"], message("after"))
        assert code == 250
        (got,) = await sandbox.exchange.wait_for_messages(1)
        assert b"Subject: after" in got.data
    finally:
        await relay.stop(timeout=5)
