"""`m365relay queue` against a running relay (in-process) and a stopped one.

The command runs as a real subprocess on the relay's spool, as an admin would run it. Upstream
is paused with injected connect failures and a one-hour backoff, so mail stays queued until a
queue command (or the test) lets it go; a message delivered "promptly" can only be explained by
the command. A TCP hop in front of the sandbox's Exchange stalls a delivery mid-attempt, to
act on a message while it is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import MAILBOX, PASSWORD, RelayFactory, message, send, wait_until

from relay.message import DeliveryState, Envelope
from relay.sandbox import Sandbox
from relay.spool.store import Spool, SpoolError

PAUSE = "421 4.3.2 Service not available"
SENDER = "device@printers.example"


# ---------------------------------------------------------------------- helpers


async def queue(spool: Path, *args: str, as_json: bool = True) -> tuple[int, Any, str]:
    """Run `python -m relay queue ARGS --spool DIR [--json]`; (exit code, output, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "queue", *args, "--spool", str(spool),
        *(["--json"] if as_json else []),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    text = out.decode()
    return proc.returncode, json.loads(text) if as_json else text, err.decode()


def paused_config(relays: RelayFactory, sandbox: Sandbox) -> dict[str, Any]:
    """Upstream refuses every connection, and a failed lane waits an hour."""
    sandbox.exchange.inject("connect", PAUSE, times=1000)
    data = relays.config()
    data["delivery"].update(min_backoff=3600, max_backoff=3600)
    # The scanner account logs in; on loopback without TLS for the test.
    data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]
    return data


async def submit(address: tuple[str, int], subject: str, **kwargs: Any) -> str:
    code, reply = await asyncio.to_thread(send, address, message(subject), **kwargs)
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def state_of(spool: Path, queue_id: str) -> dict[str, Any]:
    path = spool / "state" / f"{queue_id}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def subjects(sandbox: Sandbox) -> list[str]:
    """The Subject of each message Exchange accepted (a DSN's own, not the returned one's)."""
    return [str(message_from_bytes(m.data, policy=default_policy)["Subject"])
            for m in sandbox.exchange.messages]


def by_id(listing: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in listing["messages"]}


class Gate:
    """A TCP hop to the sandbox's Exchange. While ``stall`` is set, a new connection waits
    for :meth:`let_through` or :meth:`drop`, keeping that delivery attempt in flight."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.stall = False
        self.waiting = asyncio.Event()
        self._verdict: asyncio.Future[bool] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._verdict is not None and not self._verdict.done():
            self._verdict.set_result(False)
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()

    def let_through(self) -> None:
        assert self._verdict is not None
        self._verdict.set_result(True)

    def drop(self) -> None:
        assert self._verdict is not None
        self._verdict.set_result(False)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.stall:
            self._verdict = asyncio.get_running_loop().create_future()
            self.waiting.set()
            passed = await self._verdict
            self.stall = False
            if not passed:
                writer.close()
                return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()


@pytest.fixture
async def gate(sandbox: Sandbox) -> AsyncIterator[Gate]:
    # Request it before `relays`, so the relay stops (and says QUIT) before the hop closes.
    hop = Gate(sandbox.smtp_port)
    await hop.start()
    yield hop
    await hop.close()


# ---------------------------------------------------------------------- running relay


async def test_list_and_show_describe_queued_mail(relays: RelayFactory, sandbox: Sandbox,
                                                  tmp_path: Path) -> None:
    relay = await relays.start(paused_config(relays, sandbox))
    spool = tmp_path / "spool"
    first = await submit(relay.addresses["local"], "first scan",
                         rcpts=("alice@example.org", "bob@example.net"))
    await wait_until(lambda: state_of(spool, first).get("attempts") == 1)
    second = await submit(relay.addresses["local"], "second scan",
                          login=("scanner01", PASSWORD))

    code, listing, _ = await queue(spool, "list")
    assert code == 0
    assert listing["relay_running"] is True and listing["count"] == 2
    rows = by_id(listing)
    assert rows[first]["status"] == "deferred" and rows[first]["attempts"] == 1
    assert "421" in rows[first]["last_error"]
    assert rows[first]["recipients"] == ["alice@example.org", "bob@example.net"]
    assert rows[first]["mailbox"] == "printers@contoso.example"
    # An hour of backoff, as configured.
    assert 3000 < rows[first]["next_attempt_at"] - time.time() <= 3600
    # Another mailbox, so another lane: it is tried (and deferred) on its own.
    assert rows[second]["mailbox"] == MAILBOX and rows[second]["account"] == "scanner"

    code, text, _ = await queue(spool, "list", as_json=False)
    assert code == 0
    header, *lines = text.splitlines()
    assert header.split()[:6] == ["ID", "AGE", "SIZE", "TRIES", "STATUS", "NEXT"]
    row = next(line for line in lines if line.startswith(first))
    # Aligned columns: each value starts under its heading.
    assert row.index("deferred") == header.index("STATUS")
    assert row.index("in 59m") == header.index("NEXT")
    assert "alice@example.org (+1)" in row and "421" in row
    assert "2 message(s)" in text and "Relay running" in text

    code, shown, _ = await queue(spool, "show", first)
    assert code == 0
    assert {"name": "Subject", "value": "first scan"} in shown["headers"]
    assert shown["path"] == str(spool / "queue" / first)
    code, text, _ = await queue(spool, "show", first, as_json=False)
    assert "Subject: first scan" in text
    assert "alice@example.org (pending)" in text and "Last error:" in text
    code, raw, _ = await queue(spool, "show", first, "--raw", as_json=False)
    assert "Subject: first scan" in raw and "Scan attached." in raw

    code, _, err = await queue(spool, "show", "000000000000000", as_json=False)
    assert code == 1 and "is not queued" in err
    code, _, err = await queue(spool, "show", "../../etc/passwd", as_json=False)
    assert code == 1 and "not a valid queue id" in err


async def test_retry_delivers_now_despite_backoff(relays: RelayFactory, sandbox: Sandbox,
                                                  tmp_path: Path) -> None:
    relay = await relays.start(paused_config(relays, sandbox))
    spool = tmp_path / "spool"
    queue_id = await submit(relay.addresses["local"], "retry me")
    await wait_until(lambda: state_of(spool, queue_id).get("attempts") == 1)
    sandbox.exchange.reset()  # upstream works again; the relay would wait an hour

    code, result, _ = await queue(spool, "retry", queue_id)
    assert code == 0
    assert result["relay_running"] is True
    assert result["results"] == [{"id": queue_id, "action": "retry", "ok": True,
                                  "result": "ok", "detail": "due for delivery now"}]
    (got,) = await sandbox.exchange.wait_for_messages(1, timeout=10)
    assert b"Subject: retry me" in got.data
    await wait_until(lambda: not (spool / "queue" / queue_id).exists())


async def test_hold_keeps_mail_back_and_release_delivers_it(
        relays: RelayFactory, sandbox: Sandbox, tmp_path: Path) -> None:
    relay = await relays.start(paused_config(relays, sandbox))
    spool = tmp_path / "spool"
    held = await submit(relay.addresses["local"], "held one")
    await wait_until(lambda: state_of(spool, held).get("attempts") == 1)
    other = await submit(relay.addresses["local"], "other one")

    code, result, _ = await queue(spool, "hold", held)
    assert code == 0 and result["results"][0]["result"] == "ok"
    # The hint names this message and the program as it was run (`python -m relay` here).
    assert f" -m relay queue release {held} --spool {spool}`" in result["results"][0]["detail"]
    assert (spool / "hold" / held).exists() and not (spool / "queue" / held).exists()
    code, listing, _ = await queue(spool, "list")
    assert by_id(listing)[held]["status"] == "held"
    # Waiting behind the paused lane, never tried yet.
    assert by_id(listing)[other]["status"] == "queued" and by_id(listing)[other]["attempts"] == 0
    code, result, _ = await queue(spool, "hold", held)
    assert code == 1 and result["results"][0]["result"] == "wrong-state"

    # Upstream back, every queued message tried now: only the other one goes out.
    sandbox.exchange.reset()
    code, result, _ = await queue(spool, "retry", "--all")
    assert code == 0 and [r["id"] for r in result["results"]] == [other]
    (got,) = await sandbox.exchange.wait_for_messages(1, timeout=10)
    assert b"Subject: other one" in got.data
    await wait_until(lambda: not (spool / "queue" / other).exists())
    assert (spool / "hold" / held).exists()
    assert subjects(sandbox) == ["other one"]

    code, result, _ = await queue(spool, "release", held)
    assert code == 0 and result["results"][0]["result"] == "ok"
    # Released means due now, not an hour after its last failure.
    await sandbox.exchange.wait_for_messages(2, timeout=10)
    assert subjects(sandbox) == ["other one", "held one"]
    await wait_until(lambda: not (spool / "queue" / held).exists())
    assert not (spool / "state" / f"{held}.json").exists()


async def test_delete_removes_mail_for_good(relays: RelayFactory, sandbox: Sandbox,
                                            tmp_path: Path) -> None:
    relay = await relays.start(paused_config(relays, sandbox))
    spool = tmp_path / "spool"
    doomed = await submit(relay.addresses["local"], "doomed")
    await wait_until(lambda: state_of(spool, doomed).get("attempts") == 1)
    kept = await submit(relay.addresses["local"], "kept")

    code, result, _ = await queue(spool, "delete", doomed)
    assert code == 0 and result["results"][0]["result"] == "ok"
    assert not (spool / "queue" / doomed).exists()
    assert not (spool / "state" / f"{doomed}.json").exists()

    sandbox.exchange.reset()
    await queue(spool, "retry", "--all")
    await sandbox.exchange.wait_for_messages(1, timeout=10)
    await wait_until(lambda: not (spool / "queue" / kept).exists())
    assert subjects(sandbox) == ["kept"]

    code, result, _ = await queue(spool, "delete", doomed)
    assert code == 1 and result["results"][0]["result"] == "not-found"


async def test_bounce_returns_mail_with_a_dsn(relays: RelayFactory, sandbox: Sandbox,
                                              tmp_path: Path) -> None:
    relay = await relays.start(paused_config(relays, sandbox))
    spool = tmp_path / "spool"
    queue_id = await submit(relay.addresses["local"], "give up")
    await wait_until(lambda: state_of(spool, queue_id).get("attempts") == 1)
    sandbox.exchange.reset()  # so the DSN can go out; the message itself waits an hour

    code, result, _ = await queue(spool, "bounce", queue_id)
    assert code == 0
    assert f"<{SENDER}>" in result["results"][0]["detail"]
    (dsn,) = await sandbox.exchange.wait_for_messages(1, timeout=10)
    assert dsn.rcpt_tos == (SENDER,)
    text = " ".join(dsn.data.decode().split())  # unfold wrapped lines
    assert "multipart/report" in text and "Status: 5.0.0" in text
    assert "returned to the sender by the relay's administrator" in text
    assert "421 4.3.2" in text  # the last delivery error, for the sender
    await wait_until((spool / "failed" / queue_id).exists)
    assert not (spool / "queue" / queue_id).exists()
    assert subjects(sandbox) == ["Undelivered Mail Returned to Sender"]


async def test_summary_counts_by_mailbox(relays: RelayFactory, sandbox: Sandbox,
                                         tmp_path: Path) -> None:
    relay = await relays.start(paused_config(relays, sandbox))
    spool = tmp_path / "spool"
    for n in range(2):
        await submit(relay.addresses["local"], f"printer {n}")
    await submit(relay.addresses["local"], "scanner", login=("scanner01", PASSWORD),
                 rcpts=("a@example.org", "b@example.net"))

    code, shape, _ = await queue(spool, "summary")
    assert code == 0
    assert shape["total"]["count"] == 3 and shape["total"]["counts"][0] == 3
    assert [(r["key"], r["count"]) for r in shape["rows"]] == [
        ("printers@contoso.example", 2), (MAILBOX, 1)]
    code, shape, _ = await queue(spool, "summary", "--by", "domain")
    assert {r["key"]: r["count"] for r in shape["rows"]} == {
        "example.org": 3, "example.net": 1}
    assert shape["total"]["count"] == 3  # each message once


async def test_delete_waits_for_the_attempt_in_flight_that_delivers(
        gate: Gate, relays: RelayFactory, sandbox: Sandbox, tmp_path: Path) -> None:
    data = relays.config()
    data["apps"]["contoso"]["smtp_port"] = gate.port
    relay = await relays.start(data)
    spool = tmp_path / "spool"
    gate.stall = True
    queue_id = await submit(relay.addresses["local"], "in flight")
    await asyncio.wait_for(gate.waiting.wait(), 10)
    assert Spool(spool).is_claimed(queue_id)
    code, listing, _ = await queue(spool, "list")
    assert code == 0 and by_id(listing)[queue_id]["status"] == "active"

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "queue", "delete", queue_id, "--spool", str(spool),
        "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None and proc.stdout is not None
    line = await asyncio.wait_for(proc.stderr.readline(), 30)
    assert b"being delivered right now" in line
    gate.let_through()  # the attempt completes while the delete waits
    out = await asyncio.wait_for(proc.stdout.read(), 30)
    assert await proc.wait() == 1
    (result,) = json.loads(out)["results"]
    assert result["result"] == "gone" and "was delivered" in result["detail"]
    assert subjects(sandbox) == ["in flight"]


async def test_delete_after_a_failed_attempt_in_flight_wins(
        gate: Gate, relays: RelayFactory, sandbox: Sandbox, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="m365relay.queue")
    data = relays.config()
    data["apps"]["contoso"]["smtp_port"] = gate.port
    relay = await relays.start(data)
    spool = tmp_path / "spool"
    gate.stall = True
    queue_id = await submit(relay.addresses["local"], "doomed in flight")
    await asyncio.wait_for(gate.waiting.wait(), 10)

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "queue", "delete", queue_id, "--spool", str(spool),
        "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None and proc.stdout is not None
    assert b"being delivered" in await asyncio.wait_for(proc.stderr.readline(), 30)
    gate.drop()  # this attempt fails: deferred, so the delete goes ahead
    out = await asyncio.wait_for(proc.stdout.read(), 30)
    assert await proc.wait() == 0
    assert json.loads(out)["results"][0]["result"] == "ok"
    assert not (spool / "queue" / queue_id).exists()

    # The relay carries on and never brings the deleted message back.
    await submit(relay.addresses["local"], "after")
    await sandbox.exchange.wait_for_messages(1, timeout=10)
    await wait_until(lambda: not any((spool / "queue").iterdir()))
    assert subjects(sandbox) == ["after"]
    assert f"{queue_id}: deleted by an operator" in caplog.text


async def test_busy_message_times_out_with_tempfail(relays: RelayFactory, sandbox: Sandbox,
                                                    tmp_path: Path) -> None:
    relay = await relays.start(paused_config(relays, sandbox))
    spool = tmp_path / "spool"
    queue_id = await submit(relay.addresses["local"], "locked")
    await wait_until(lambda: state_of(spool, queue_id).get("attempts") == 1)
    # The same claim a delivery attempt takes.
    claim = Spool(spool).claim(queue_id)
    assert claim is not None
    with claim:
        code, result, err = await queue(spool, "hold", queue_id, "--wait", "0.3")
    assert code == 75
    assert result["results"][0]["result"] == "busy" and "being delivered" in err
    assert (spool / "queue" / queue_id).exists()


# ---------------------------------------------------------------------- stopped relay


async def test_stopped_relay_applies_changes_at_next_start(
        relays: RelayFactory, sandbox: Sandbox, tmp_path: Path) -> None:
    data = paused_config(relays, sandbox)
    relay = await relays.start(data)
    spool = tmp_path / "spool"
    ids = {}
    for subject in ("held", "deleted", "bounced", "retried"):
        ids[subject] = await submit(relay.addresses["local"], subject)
    await wait_until(lambda: state_of(spool, ids["held"]).get("attempts") == 1)
    await relays.stop(relay)

    # Through the config file, as an admin would: only spool.directory is read.
    config_file = tmp_path / "relay.yaml"
    config_file.write_text(yaml.safe_dump({**data, "spool": {"directory": "spool"}}))

    async def run(*args: str) -> tuple[int, Any]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "queue", *args, "--config", str(config_file),
            "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, json.loads(out)

    code, listing = await run("list")
    assert code == 0 and listing["relay_running"] is False and listing["count"] == 4
    for action, subject in (("hold", "held"), ("delete", "deleted"), ("bounce", "bounced"),
                            ("retry", "retried")):
        code, result = await run(action, ids[subject])
        assert code == 0, result
        assert result["relay_running"] is False
    code, text, _ = await queue(spool, "retry", ids["retried"], as_json=False)
    assert "not running; it applies these changes when it starts" in text

    sandbox.exchange.reset()
    relay = await relays.start(data)
    # Retried: due now despite the hour of backoff; bounced: DSN to the sender.
    got = await sandbox.exchange.wait_for_messages(2, timeout=10)
    assert sorted(subjects(sandbox)) == ["Undelivered Mail Returned to Sender", "retried"]
    assert any(m.rcpt_tos == (SENDER,) for m in got)
    await wait_until((spool / "failed" / ids["bounced"]).exists)
    # The held message kept its retry state across the restart and was not scheduled.
    code, shown, _ = await queue(spool, "show", ids["held"])
    assert shown["status"] == "held" and shown["attempts"] == 1
    assert len(sandbox.exchange.messages) == 2

    code, result, _ = await queue(spool, "release", "--all")
    assert code == 0 and result["relay_running"] is True
    await sandbox.exchange.wait_for_messages(3, timeout=10)
    assert "held" in subjects(sandbox) and "deleted" not in subjects(sandbox)


async def test_summary_buckets_by_age(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir)
    spool.open()
    now = time.time()
    ages_min = {"a@contoso.example": [1, 2, 30], "b@contoso.example": [200, 3000]}
    for mailbox, ages in ages_min.items():
        for minutes in ages:
            env = Envelope(mail_from=mailbox, rcpt_tos=("x@example.org",), account="acct",
                           app="app", mailbox=mailbox, bounce_to="", client="local",
                           received_at=now - minutes * 60)
            spool.save_state(spool.commit(env, b"Subject: x\r\n\r\nx\r\n"),
                             DeliveryState(attempts=1, next_attempt_at=now + 60))

    code, shape, _ = await queue(spool_dir, "summary")
    assert code == 0
    labels = [b["label"] for b in shape["buckets"]]
    assert labels[:3] == ["0-5m", "5-10m", "10-20m"] and labels[-1] == "1280m+"
    rows = {r["key"]: r["counts"] for r in shape["rows"]}
    #                               5  10 20 40 80 160 320 640 1280 1280+
    assert rows["a@contoso.example"] == [2, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert rows["b@contoso.example"] == [0, 0, 0, 0, 0, 0, 1, 0, 0, 1]
    assert shape["total"]["counts"] == [2, 0, 0, 1, 0, 0, 1, 0, 0, 1]

    code, text, _ = await queue(spool_dir, "summary", as_json=False)
    header, total, *rows_text = text.splitlines()
    assert header.split() == ["mailbox", "T", "5m", "10m", "20m", "40m", "80m", "160m", "320m",
                              "640m", "1280m", "1280m+"]
    assert total.split() == ["TOTAL", "5", "2", "0", "0", "1", "0", "0", "1", "0", "0", "1"]
    assert [row.split()[:3] for row in rows_text] == [["a@contoso.example", "3", "2"],
                                                      ["b@contoso.example", "2", "0"]]
    assert len({len(line) for line in text.splitlines()}) == 1  # right-aligned columns


async def test_usage_errors_say_what_to_do(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "queue", "list", stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 2 and b"--config FILE" in err and b"--spool DIR" in err
    code, _, err = await queue(tmp_path / "nowhere", "list", as_json=False)
    assert code == 1 and "no spool at" in err and "spool.directory" in err


# ---------------------------------------------------------------------- spool primitives


def queued_message(spool: Spool) -> str:
    env = Envelope(mail_from="a@contoso.example", rcpt_tos=("x@example.org",), account="acct",
                   app="app", mailbox="a@contoso.example", bounce_to="", client="local",
                   received_at=time.time())
    return spool.commit(env, b"Subject: x\r\n\r\nx\r\n")


def test_claim_sees_a_message_moved_while_it_waited(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    queue_id = queued_message(spool)
    spool.save_state(queue_id, DeliveryState(attempts=2, last_error="451 busy"))
    first = spool.claim(queue_id)
    assert first is not None and first.state.attempts == 2
    assert spool.is_claimed(queue_id)
    # A second claimant (another process, or a second delivery copy) cannot get in meanwhile.
    with pytest.raises(SpoolError, match="still being delivered"):
        spool.claim(queue_id, wait=0)
    spool.hold(queue_id)  # the holder moves it; its lock travels with the file
    first.release()
    assert spool.claim(queue_id) is None  # no longer in queue/
    held = spool.claim(queue_id, held=True)
    assert held is not None and held.state.last_error == "451 busy"
    held.release()

    # open() neither schedules held mail nor drops its retry state as an orphan.
    assert Spool(tmp_path / "spool").open() == []
    (entry,) = spool.held_entries()
    assert entry.state.attempts == 2
    claim = spool.claim(queue_id, held=True)
    assert claim is not None
    with claim:
        spool.release(queue_id)
    (entry,) = spool.entries()
    assert entry.state.attempts == 2 and entry.state.next_attempt_at == 0.0


def test_bounce_reason_survives_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    queue_id = queued_message(spool)
    spool.save_state(queue_id, DeliveryState(attempts=1, bounce_reason="5.0.0 given up"))
    (entry,) = Spool(tmp_path / "spool").open()
    assert entry.state.bounce_reason == "5.0.0 given up"


def test_files_written_for_another_owner_get_that_owner(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing file owners needs root")
    Spool(tmp_path / "spool").open()
    spool = Spool(tmp_path / "spool", owner=(4321, 4321))
    queue_id = queued_message(spool)
    spool.save_state(queue_id, DeliveryState(attempts=1))
    for path in (tmp_path / "spool" / "queue" / queue_id,
                 tmp_path / "spool" / "state" / f"{queue_id}.json"):
        assert (path.stat().st_uid, path.stat().st_gid) == (4321, 4321), path
