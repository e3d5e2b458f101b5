"""Pacing: per-mailbox rate within Exchange's limits, backing off on throttling, fairness."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import MAILBOX, PASSWORD, RelayFactory, message, send, smtp_client, wait_until

from relay.config.records import PacingSettings
from relay.delivery.pacing import STATE_FILE, LanePace, Pacer, is_throttling
from relay.diagnosis.errors import BounceError, DeferError
from relay.http.metrics import RelayCollector
from relay.sandbox import Sandbox

PRINTERS = "printers@contoso.example"


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- the pace itself, on a fake clock ----------------------------------------------------


def test_messages_are_spaced_by_the_rate() -> None:
    pace, now = LanePace(), 0.0
    assert pace.delay(30, now) == 0
    pace.start(30, now)
    assert pace.delay(30, now) == pytest.approx(2.0)  # 30 a minute: one every 2 s
    pace.finish(now + 0.1)
    assert pace.delay(30, now + 1.5) == pytest.approx(0.5)


def test_no_window_of_60_seconds_holds_more_than_the_rate() -> None:
    # Slow sends (each answered 5 s after it started) must not let more than 30 messages
    # into any 60 s, wherever between start and answer Exchange counts them.
    pace, now = LanePace(), 0.0
    starts: list[float] = []
    ends: list[float] = []
    while len(starts) < 120:
        while ends and ends[0] <= now:
            pace.finish(ends.pop(0))
        wait = pace.delay(30, now)
        if wait == 0:
            pace.start(30, now)
            starts.append(now)
            ends.append(now + 5.0)
            continue
        # Next event: the pace allows a start, or an answer comes in.
        now = now + wait if wait is not None and (not ends or now + wait < ends[0]) else ends[0]
    # A window from w to w + 60 can count every message answered after w and started before
    # w + 60; the worst windows start at an answer.
    for first in starts:
        w = first + 5.0
        counted = [s for s in starts if s + 5.0 >= w and s < w + 60.0]
        assert len(counted) <= 30, f"{len(counted)} messages can count in the minute from {w}"
    # ... and it still sends at about the rate: 120 messages in a little over 4 minutes.
    assert 238 <= starts[-1] <= 260


def test_in_flight_messages_fill_the_window_until_one_is_answered() -> None:
    pace = LanePace()
    for i in range(2):
        pace.start(2, i * 30.0)
    assert pace.delay(2, 60.0) is None  # both still in flight: wait for an answer
    pace.finish(61.0)
    assert pace.delay(2, 61.0) == pytest.approx(60.0)


def test_throttling_halves_the_rate_once_and_it_recovers() -> None:
    pace = LanePace()
    assert pace.throttled(30, 0.0) == 15
    assert pace.throttled(30, 1.0) is None  # an answer to a message sent before the halving
    assert pace.rate(30, 1.0) == pytest.approx(15.05)
    assert pace.throttled(30, 10.0) == pytest.approx((15 + 3 * 10 / 60) / 2)
    assert pace.rate(30, 10.0 + 60.0 * 10) == 30  # back to the configured rate, no timers
    assert pace.reduced is None


def test_throttling_replies_are_recognised() -> None:
    assert is_throttling(DeferError("h answered 432 4.3.2 STOREDRV.ClientSubmit; sender thread "
                                    "limit exceeded at DATA", code=432))
    assert is_throttling(DeferError("h answered 554 5.2.2 Submission quota exceeded", code=554))
    assert is_throttling(DeferError("h answered 451 4.7.500 Access denied, please try again "
                                    "later", code=451))
    assert is_throttling(DeferError("Graph answered 429 Too Many Requests", code=429))
    assert not is_throttling(DeferError("h answered 451 4.4.2 connection dropped", code=451))
    assert not is_throttling(BounceError("h answered 550 5.1.1 unknown recipient 10.4.3.2",
                                         code=550))


# --- recipients per day ------------------------------------------------------------------


async def test_recipient_counts_survive_a_restart_and_roll_off_after_a_day(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    settings = PacingSettings(recipients_per_day_warning=9000)
    pacer = Pacer(lambda: settings, tmp_path, clock)
    caplog.set_level(logging.WARNING, "m365relay.pacing")
    pacer.sent(MAILBOX, 8999)
    assert not caplog.records
    clock.now += 3600
    pacer.sent(MAILBOX.upper(), 1)  # mailboxes count case-insensitively
    (warning,) = caplog.records
    assert "9000 recipients" in warning.getMessage()
    assert "delivery.pacing.recipients_per_day_warning" in warning.getMessage()
    pacer.sent(MAILBOX, 1)  # warned once per threshold, not per message
    assert len(caplog.records) == 1
    pacer.sent(MAILBOX, 1000)
    assert "10001 recipients" in caplog.records[-1].getMessage()
    await pacer.close()
    assert json.loads((tmp_path / STATE_FILE).read_text())["recipients"]

    again = Pacer(lambda: settings, tmp_path, clock)
    assert again.recipients_24h() == {MAILBOX: 10001}
    clock.now += 86400 - 3600  # the first 8999 leave the rolling day
    assert again.recipients_24h() == {MAILBOX: 1002}


async def test_a_damaged_counts_file_is_not_fatal(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "m365relay.pacing")
    (tmp_path / STATE_FILE).write_text("{not json")
    pacer = Pacer(PacingSettings, tmp_path, FakeClock())
    assert pacer.recipients_24h() == {}
    assert "start from zero" in caplog.text


# --- against the sandbox -----------------------------------------------------------------


def _send_burst(address: tuple[str, int], count: int) -> None:
    with smtp_client(address) as client:
        client.ehlo("erp.test")
        client.login("scanner01", PASSWORD)
        for i in range(count):
            client.sendmail("erp@printers.example", ["customer@example.org"],
                            message(f"invoice {i}", sender="erp@printers.example"))


def _paced_config(relays: RelayFactory, per_minute: float) -> dict[str, Any]:
    data = relays.config()
    data["delivery"]["pacing"] = {"messages_per_minute": per_minute}
    data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]  # the ERP logs in
    return data


async def _arrival_times(sandbox: Sandbox, mailbox: str, count: int,
                         timeout: float) -> list[float]:
    """When each of ``mailbox``'s first ``count`` messages reached Exchange (loop time)."""
    loop = asyncio.get_running_loop()
    times: list[float] = []
    async with asyncio.timeout(timeout):
        while len(times) < count:
            n = sum(1 for m in sandbox.exchange.messages if m.auth_user == mailbox)
            times.extend([loop.time()] * (n - len(times)))
            if len(times) < count:
                await sandbox.exchange.wait_for_messages(len(sandbox.exchange.messages) + 1,
                                                         timeout=timeout)
    return times


async def test_a_burst_is_paced_under_the_limit_while_another_mailbox_goes_at_once(
        relays: RelayFactory, sandbox: Sandbox) -> None:
    # Scaled-down judge scenario: pacing at 600 a minute (one message every 0.1 s) against
    # an Exchange that refuses more than 8 messages in any 0.5 s (960 a minute).
    burst = 40
    sandbox.exchange.rate_limit(8, window=0.5)
    relay = await relays.start(_paced_config(relays, 600))
    address = relay.addresses["local"]
    sending = asyncio.create_task(asyncio.to_thread(_send_burst, address, burst))
    arrivals = asyncio.create_task(_arrival_times(sandbox, MAILBOX, burst, timeout=30))

    await _wait_for_mailbox(sandbox, MAILBOX, 10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.to_thread(send, address, message("urgent"))  # printers: another mailbox
    await _wait_for_mailbox(sandbox, PRINTERS, 1)
    other_delay = loop.time() - started
    drained_meanwhile = sum(1 for m in sandbox.exchange.messages if m.auth_user == MAILBOX)

    times = await arrivals
    await sending
    assert sandbox.exchange.throttled == 0
    assert other_delay < 1.0, f"the other mailbox waited {other_delay:.2f}s behind the burst"
    assert drained_meanwhile < burst, "the burst was over before the other mail was sent"
    span = times[-1] - times[0]
    assert span >= (burst - 1) * 0.1 * 0.9, f"{burst} messages in {span:.2f}s: not paced"
    assert sandbox.exchange.peak_open_connections <= 3 + 1
    assert relay.delivery.pacer.rate(("contoso", MAILBOX)) == 600  # never throttled


async def test_without_pacing_the_same_burst_is_throttled(relays: RelayFactory,
                                                          sandbox: Sandbox) -> None:
    # The counterpart that shows pacing is what keeps the burst above clear of throttling.
    burst = 40
    sandbox.exchange.rate_limit(8, window=0.5)
    relay = await relays.start(_paced_config(relays, 0))
    await asyncio.to_thread(_send_burst, relay.addresses["local"], burst)
    await _wait_for_mailbox(sandbox, MAILBOX, burst, timeout=60)
    assert sandbox.exchange.throttled > 0


async def test_a_throttling_reply_slows_the_mailbox_down(
        relays: RelayFactory, sandbox: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "m365relay.pacing")
    sandbox.exchange.inject("data", "554 5.2.2 Submission quota exceeded; "
                                    "STOREDRV.Submission.Exception:SubmissionQuotaExceededException")
    relay = await relays.start(_paced_config(relays, 600))
    await asyncio.to_thread(send, relay.addresses["local"], message("after quota"))
    await _wait_for_mailbox(sandbox, PRINTERS, 1)  # retried after min_backoff, delivered
    assert relay.delivery.pacer.rate(("contoso", PRINTERS)) < 600 / 2 + 10
    assert "being throttled" in caplog.text
    assert "delivery.pacing.messages_per_minute" in caplog.text
    await wait_until(lambda: relay.delivery.pacer.recipients_24h() == {PRINTERS: 1})
    metrics = {f.name: f for f in RelayCollector(relay).collect()}
    (rate,) = metrics["m365relay_mailbox_pacing_rate"].samples
    assert rate.labels == {"app": "contoso", "mailbox": PRINTERS} and rate.value < 600
    (recipients,) = metrics["m365relay_mailbox_recipients_24h"].samples
    assert recipients.labels == {"mailbox": PRINTERS} and recipients.value == 1


async def test_recipient_counts_are_kept_in_the_spool_over_a_restart(
        relays: RelayFactory, sandbox: Sandbox, tmp_path: Path) -> None:
    data = _paced_config(relays, 600)
    relay = await relays.start(data)
    await asyncio.to_thread(send, relay.addresses["local"], message("one"),
                            rcpts=("a@example.org", "b@example.org"))
    await wait_until(lambda: relay.delivery.pacer.recipients_24h() == {PRINTERS: 2})
    await relays.stop(relay)
    assert (tmp_path / "spool" / STATE_FILE).exists()
    again = await relays.start(data)
    assert again.delivery.pacer.recipients_24h() == {PRINTERS: 2}


async def _wait_for_mailbox(sandbox: Sandbox, mailbox: str, count: int,
                            timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while sum(1 for m in sandbox.exchange.messages if m.auth_user == mailbox) < count:
            await sandbox.exchange.wait_for_messages(len(sandbox.exchange.messages) + 1,
                                                     timeout=timeout)
