"""Delivery decisions against the fake Exchange: retry, bounce with DSN, restart, spool faults."""

from __future__ import annotations

import asyncio
import logging
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path

import pytest
from conftest import RelayFactory, message, send, wait_until

from relay.sandbox import Sandbox

SENDER = "device@printers.example"


def queued(spool: Path) -> list[Path]:
    folder = spool / "queue"
    return sorted(folder.iterdir()) if folder.exists() else []


async def test_retry_after_4xx(relays: RelayFactory, sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.exchange.inject("data", "451 4.3.0 Temporary server error. Please try again later")
    relay = await relays.start()
    code, _ = await asyncio.to_thread(send, relay.addresses["local"], message("retry"))
    assert code == 250
    (got,) = await sandbox.exchange.wait_for_messages(1)
    assert b"Subject: retry" in got.data
    assert relay.delivery.counters.deferred == 1
    await wait_until(lambda: not queued(tmp_path / "spool"))


async def test_throttling_reply_pauses_then_delivers(relays: RelayFactory,
                                                     sandbox: Sandbox) -> None:
    sandbox.exchange.inject("mail", "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit "
                                    "exceeded [Hostname=SANDBOX]")
    relay = await relays.start()
    await asyncio.to_thread(send, relay.addresses["local"], message("throttled"))
    (got,) = await sandbox.exchange.wait_for_messages(1)
    assert b"Subject: throttled" in got.data
    assert relay.delivery.counters.deferred == 1


async def test_5xx_bounces_with_dsn_and_keeps_copy(relays: RelayFactory, sandbox: Sandbox,
                                                   tmp_path: Path) -> None:
    sandbox.exchange.inject("data", "550 5.7.60 SMTP; Client does not have permissions to send "
                                    "as this sender")
    relay = await relays.start()
    code, reply = await asyncio.to_thread(send, relay.addresses["local"], message("bounce"))
    assert code == 250
    queue_id = reply.decode().rsplit(" ", 1)[1]
    (dsn,) = await sandbox.exchange.wait_for_messages(1)
    # The DSN goes to the device's envelope sender, sent through the account's mailbox.
    assert dsn.rcpt_tos == (SENDER,)
    report = message_from_bytes(dsn.data, policy=default_policy)
    assert report.get_content_type() == "multipart/report"
    assert "5.7.60" in dsn.data.decode("utf-8", "replace")
    assert relay.delivery.counters.bounced == 1
    kept = tmp_path / "spool" / "failed" / queue_id
    await wait_until(kept.exists)
    assert not (tmp_path / "spool" / "queue" / queue_id).exists()


async def test_partial_recipients(relays: RelayFactory, sandbox: Sandbox,
                                  tmp_path: Path) -> None:
    for gone in ("gone@example.org", "gone2@example.org"):
        sandbox.exchange.inject("rcpt", "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found",
                                rcpt=gone)
    sandbox.exchange.inject("rcpt", "452 4.5.3 Too many recipients", rcpt="later@example.org")
    # 4xx first, then 5xx on the retry: its DSN comes from the retry.
    sandbox.exchange.inject("rcpt", "451 4.4.0 DNS query failed", rcpt="flaky@example.org")
    sandbox.exchange.inject("rcpt", "550 5.4.1 Recipient address rejected: Access denied",
                            rcpt="flaky@example.org")
    relay = await relays.start()
    rcpts = ("ok@example.org", "gone@example.org", "later@example.org", "gone2@example.org",
             "flaky@example.org")
    await asyncio.to_thread(send, relay.addresses["local"], message("partial"), rcpts=rcpts)
    got = await sandbox.exchange.wait_for_messages(4)
    await wait_until(lambda: not queued(tmp_path / "spool"))
    dsns = [m for m in got if m.rcpt_tos == (SENDER,)]
    delivered = [m for m in got if m not in dsns]
    # ok@ in the first transaction, later@ in the retry, each once; no one else.
    assert sorted(r for m in delivered for r in m.rcpt_tos) == ["later@example.org",
                                                                 "ok@example.org"]
    # Each refused recipient is in exactly one DSN, and no accepted one is in any.
    named = [{r for r in rcpts if r.encode() in dsn.data} for dsn in dsns]
    assert sorted(map(sorted, named)) == [["flaky@example.org"],
                                          ["gone2@example.org", "gone@example.org"]]
    assert relay.delivery.counters.bounced == 3
    assert len(sandbox.exchange.messages) == 4  # nothing more arrives later


async def test_no_dsn_for_dsn(relays: RelayFactory, sandbox: Sandbox, tmp_path: Path) -> None:
    # Every DATA fails permanently: the original bounces, its DSN bounces, and that is the end.
    sandbox.exchange.inject("data", "554 5.2.0 STOREDRV.Submission.Exception:"
                                    "MessageSubmissionExceededException", times=2)
    relay = await relays.start()
    await asyncio.to_thread(send, relay.addresses["local"], message("loop"))
    # The spool writes the reason before it moves the message (spool.fail): wait for both.
    await wait_until(lambda: len(list((tmp_path / "spool" / "failed").glob("*.reason"))) == 2
                     and not queued(tmp_path / "spool"))
    assert relay.delivery.counters.bounced == 2
    assert sandbox.exchange.messages == []


async def test_restart_delivers_what_the_spool_holds(relays: RelayFactory, sandbox: Sandbox,
                                                     tmp_path: Path) -> None:
    data = relays.config()
    data["delivery"]["min_backoff"] = 3600  # the first relay must not retry by itself
    sandbox.exchange.inject("connect", "421 4.3.2 Service not available", times=1)
    first = await relays.start(data)
    for i in range(5):
        await asyncio.to_thread(send, first.addresses["local"], message(f"spooled {i}"))
    await wait_until(lambda: first.delivery.counters.deferred >= 1)
    await relays.stop(first)
    assert len(queued(tmp_path / "spool")) == 5

    second = await relays.start(relays.config())
    got = await sandbox.exchange.wait_for_messages(5)
    subjects = sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in got)
    assert subjects == [f"spooled {i}".encode() for i in range(5)]
    await wait_until(lambda: not queued(tmp_path / "spool"))
    assert second.delivery.counters.delivered == 5


async def test_spool_full_answers_452(relays: RelayFactory, sandbox: Sandbox,
                                      tmp_path: Path) -> None:
    data = relays.config()
    data["spool"]["min_free_space"] = "1000000GB"
    relay = await relays.start(data)
    code, reply = await asyncio.to_thread(send, relay.addresses["local"], message("full"))
    assert (code, reply[:5]) == (452, b"4.3.1")
    assert not queued(tmp_path / "spool")


async def test_spool_write_failure_answers_451(relays: RelayFactory, tmp_path: Path) -> None:
    relay = await relays.start()
    # A real write failure: tmp/ replaced by a plain file, so creating the message file fails.
    tmp_dir = tmp_path / "spool" / "tmp"
    tmp_dir.rmdir()
    tmp_dir.write_text("not a directory")
    code, reply = await asyncio.to_thread(send, relay.addresses["local"], message("broken"))
    assert (code, reply[:5]) == (451, b"4.3.0")
    assert not queued(tmp_path / "spool")


async def test_token_endpoint_outage_defers(relays: RelayFactory, sandbox: Sandbox,
                                            caplog: pytest.LogCaptureFixture) -> None:
    sandbox.entra.inject(503, {"error": "temporarily_unavailable",
                               "error_description": "AADSTS90033: service unavailable"})
    relay = await relays.start()
    with caplog.at_level(logging.WARNING):
        await asyncio.to_thread(send, relay.addresses["local"], message("after outage"))
        # msal itself holds a 5xx answer for 5 s before asking again.
        (got,) = await sandbox.exchange.wait_for_messages(1, timeout=30)
    assert b"Subject: after outage" in got.data
    assert relay.delivery.counters.deferred >= 1


async def test_bad_secret_keeps_mail_and_explains(relays: RelayFactory, sandbox: Sandbox,
                                                  tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    secret = tmp_path / "wrong-secret"
    secret.write_text("not-the-secret\n")
    data = relays.config()
    data["apps"]["contoso"]["client_secret"] = {"file": str(secret)}
    with caplog.at_level(logging.WARNING):
        relay = await relays.start(data)
        await asyncio.to_thread(send, relay.addresses["local"], message("waits"))
        await wait_until(lambda: relay.delivery.counters.deferred >= 1)
    assert len(queued(tmp_path / "spool")) == 1  # never bounced for our own setup problem
    assert relay.delivery.counters.bounced == 0
    text = caplog.text
    assert "AADSTS7000215" in text
    assert "apps.contoso.client_secret" in text or "client_secret" in text
    assert "not-the-secret" not in text


async def test_rejected_token_is_replaced_once(relays: RelayFactory, sandbox: Sandbox) -> None:
    data = relays.config()
    data["delivery"]["idle_timeout"] = 0.1
    relay = await relays.start(data)
    await asyncio.to_thread(send, relay.addresses["local"], message("first"))
    await sandbox.exchange.wait_for_messages(1)
    await wait_until(lambda: relay.delivery.workers() == 0)  # pooled connection closed
    sandbox.entra.revoke_all()  # Exchange now answers 535 5.7.3 to the cached token
    await asyncio.to_thread(send, relay.addresses["local"], message("second"))
    got = await sandbox.exchange.wait_for_messages(2)
    assert b"Subject: second" in got[1].data
    assert sandbox.entra.token_request_count == 2
    assert relay.delivery.counters.deferred == 0  # the fresh token worked on the same attempt


async def test_message_older_than_max_age_bounces(relays: RelayFactory, sandbox: Sandbox,
                                                  tmp_path: Path) -> None:
    # One temporary failure; the retry comes after min_backoff, when the message is already
    # older than max_age, so it bounces instead of being tried again.
    sandbox.exchange.inject("data", "451 4.7.500 Server busy, please try again later")
    data = relays.config()
    data["delivery"].update(max_age=0.3, min_backoff=0.6, max_backoff=0.6)
    relay = await relays.start(data)
    await asyncio.to_thread(send, relay.addresses["local"], message("too old"))
    (dsn,) = await sandbox.exchange.wait_for_messages(1, timeout=20)
    assert dsn.rcpt_tos == (SENDER,)
    assert b"5.4.7" in dsn.data and b"expired" in dsn.data
    await wait_until(lambda: not queued(tmp_path / "spool"))
    assert len(list((tmp_path / "spool" / "failed").glob("*.reason"))) == 1


async def test_throttling_at_data_defers_one_message_and_keeps_the_connection(
        relays: RelayFactory, sandbox: Sandbox, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="m365relay")
    # Exchange's "sender thread limit" inside a working session: that message waits for its
    # retry, the others go on over the same authenticated connection (no new login each time).
    sandbox.exchange.inject("data", "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit "
                                    "exceeded [Hostname=SANDBOX]")
    data = relays.config()
    data["delivery"]["connections_per_mailbox"] = 1
    relay = await relays.start(data)
    for i in range(3):
        await asyncio.to_thread(send, relay.addresses["local"], message(f"paced {i}"))
    await sandbox.exchange.wait_for_messages(3)
    await wait_until(lambda: not queued(tmp_path / "spool"))
    assert relay.delivery.counters.deferred == 1
    assert sandbox.exchange.connections == 1
    assert sandbox.exchange.auth_attempts == 1
    assert "paused" not in caplog.text  # the mailbox's other mail did not wait


async def test_workers_keep_their_connections_through_a_pause(relays: RelayFactory,
                                                              sandbox: Sandbox,
                                                              tmp_path: Path) -> None:
    # A 421 ends one session and pauses the lane; the other worker's session is still good,
    # and waits out the pause instead of being closed and made again afterwards.
    sandbox.exchange.inject("data", "421 4.3.2 Service not available, closing transmission "
                                    "channel")
    data = relays.config()
    data["delivery"]["connections_per_mailbox"] = 2
    relay = await relays.start(data)
    await asyncio.gather(*(asyncio.to_thread(send, relay.addresses["local"],
                                             message(f"pair {i}")) for i in range(2)))
    await sandbox.exchange.wait_for_messages(2)
    await wait_until(lambda: not queued(tmp_path / "spool"))
    assert relay.delivery.counters.deferred == 1
    # Two sessions at the start (or one, if the first was done before the second arrived),
    # and at most one made again for the 421'd one.
    assert sandbox.exchange.connections <= 2
