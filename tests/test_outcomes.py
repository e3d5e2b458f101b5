"""Typed outcomes end to end: the upstream's reply code, enhanced status, AADSTS number or Graph
error code travel as fields from the transport to the DSN, the events, /metrics and the JSON log,
and nothing reads them back out of the relay's own text."""

from __future__ import annotations

import asyncio
import json
import logging
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path

import pytest
from conftest import RelayFactory, message, send, wait_until

from relay.diagnosis.errors import BounceError, DeferError, Outcome, aadsts_code, error_for
from relay.diagnosis.explain import Context, explain_smtp
from relay.sandbox import Sandbox
from relay.service.logs import _JsonFormatter

SENDER = "device@printers.example"


def test_error_for_keeps_the_reply_as_fields() -> None:
    reply = "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
    explanation = explain_smtp(550, reply, stage="rcpt", ctx=Context())
    exc = error_for(f"h:587 refused <a@b.example>: 550 {reply}", explanation, code=550,
                    reply=reply, stage="rcpt")
    assert isinstance(exc, BounceError)
    assert (exc.code, exc.status, exc.reply) == (550, "5.1.10", f"550 {reply}")
    outcome = exc.outcome()
    assert (outcome.label, outcome.dsn_status, outcome.permanent) == ("550", "5.1.10", True)
    # The text says "answered 451" but no code field was given: the count says so too.
    assert DeferError("h:587 answered 451 4.7.0 busy").outcome().label == "none"
    assert Outcome("expired", status="5.4.7", permanent=True).dsn_status == "5.4.7"
    assert aadsts_code("AADSTS7000215: Invalid client secret provided.") == "AADSTS7000215"


async def test_a_bounce_carries_the_upstream_status_to_dsn_events_and_log(
        relays: RelayFactory, sandbox: Sandbox, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="m365relay.delivery")
    reply = "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found"
    sandbox.exchange.inject("rcpt", reply, rcpt="gone@example.org")
    relay = await relays.start()
    await asyncio.to_thread(send, relay.addresses["local"], message("typed"),
                            rcpts=("gone@example.org",))
    (dsn,) = await sandbox.exchange.wait_for_messages(1)
    assert dsn.rcpt_tos == (SENDER,)
    report = message_from_bytes(dsn.data, policy=default_policy)
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    fields = status.get_payload()[1]  # the per-recipient block
    assert fields["Status"] == "5.1.10"
    assert " ".join(str(fields["Diagnostic-Code"]).split()) == f"smtp; {reply}"
    await wait_until(lambda: any(e.status == "bounced" for e in relay.delivery.events.recent))
    (event,) = [e for e in relay.delivery.events.recent if e.status == "bounced"]
    assert event.code == "550"
    assert relay.delivery.events.outcomes[("bounced", "printers", "550")] == 1
    (record,) = [r for r in caplog.records if "status=bounced" in r.getMessage()]
    logged = json.loads(_JsonFormatter().format(record))
    assert logged["code"] == "550" and logged["enhanced_status"] == "5.1.10"
