"""The Microsoft Graph transport (apps.<name>.transport: graph) against the sandbox's fake Graph
over HTTPS: real relay, real SMTP client, real msal token requests."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import os
import smtplib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import RelayFactory, message, wait_until

from relay.config import records as config_mod
from relay.diagnosis.explain import Context, Verdict
from relay.diagnosis.graph import explain_graph
from relay.doctor.command import diagnose
from relay.doctor.report import Status
from relay.message import DeliveryState, Envelope, QueueEntry
from relay.sandbox import DEMO_APP, Sandbox
from relay.service.lifecycle import Relay
from relay.upstream.graph_api import with_envelope_recipients

MAILBOX = "printers@contoso.example"


async def _graph_sandbox(tmp_path: Path, **app: Any) -> Sandbox:
    box = Sandbox(tmp_path / "sandbox", apps=(replace(DEMO_APP, **app),), graph=True)
    await box.start()
    return box


@pytest.fixture
async def gbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    box = await _graph_sandbox(tmp_path)
    yield box
    await box.stop()


def graph_config(factory: RelayFactory) -> dict[str, Any]:
    data = factory.config()
    data["apps"]["contoso"]["transport"] = "graph"
    data["apps"]["contoso"]["graph_endpoint"] = factory.sandbox.graph_url
    return data


@pytest.fixture
async def grelays(gbox: Sandbox, tmp_path: Path, password_hash: str
                  ) -> AsyncIterator[RelayFactory]:
    factory = RelayFactory(gbox, tmp_path, password_hash)
    yield factory
    for relay in list(factory.running):
        await factory.stop(relay)


def _graph(box: Sandbox) -> Any:
    assert box.graph is not None
    return box.graph


async def _deliver(relay: Relay, data: bytes, rcpts: tuple[str, ...]) -> None:
    def submit() -> int:
        # No AUTH over cleartext: the "printers" account matches loopback clients. A 30 MB
        # DATA on a busy machine needs more than conftest's 15 s timeout.
        with smtplib.SMTP(*relay.addresses["local"], timeout=120) as client:
            refused = client.sendmail("device@printers.example", list(rcpts), data)
            assert not refused
        return 250

    code = await asyncio.to_thread(submit)
    assert code == 250


def test_scope_follows_transport(tmp_path: Path) -> None:
    def app(**extra: Any) -> config_mod.App:
        return config_mod.App.model_validate({"tenant": "t", "client_secret": "s",
                                              "client_id": DEMO_APP.client_id, **extra})

    assert app().scope == "https://outlook.office365.com/.default"
    assert app(transport="graph").scope == "https://graph.microsoft.com/.default"
    gcc = app(transport="graph", graph_endpoint="https://graph.microsoft.us/")
    assert (gcc.graph_endpoint, gcc.scope) == ("https://graph.microsoft.us",
                                               "https://graph.microsoft.us/.default")
    assert app(transport="graph", scope="api://x/.default").scope == "api://x/.default"
    dod = app(transport="graph", cloud="usgov-dod")
    assert (dod.graph_endpoint, dod.scope) == ("https://dod-graph.microsoft.us",
                                               "https://dod-graph.microsoft.us/.default")
    sandbox = app(transport="graph", graph_endpoint="https://localhost:8443")
    assert sandbox.scope == "https://graph.microsoft.com/.default"
    with pytest.raises(ValueError, match="https://"):
        app(transport="graph", graph_endpoint="http://graph.microsoft.com")


async def test_graph_app_delivers_with_bcc_recipients(grelays: RelayFactory) -> None:
    relay = await grelays.start(graph_config(grelays))
    graph = _graph(grelays.sandbox)
    data = message("graph hello", to="someone@example.org")
    await _deliver(relay, data, ("someone@example.org", "hidden@example.net"))
    (got,) = await graph.wait_for_messages(1)
    assert got.route == "sendMail"
    assert got.auth_user == MAILBOX
    assert got.client_id == DEMO_APP.client_id
    # Graph delivers to the headers: the envelope-only recipient went in as Bcc.
    assert set(got.rcpt_tos) == {"someone@example.org", "hidden@example.net"}
    parsed = email.message_from_bytes(got.data)
    assert parsed["Bcc"] == "hidden@example.net"
    assert parsed["Subject"] == "graph hello"
    assert got.data.endswith(b"\r\n\r\nScan attached.\r\n")
    assert MAILBOX in parsed["From"]  # from: rewrite, as over SMTP
    await wait_until(lambda: relay.delivery.counters.delivered == 2)
    await wait_until(lambda: not relay.spool.entries())
    # A Graph token was requested (scope Graph), not an Exchange one.
    scopes = {r.get("scope", "") for r in grelays.sandbox.entra.token_requests}
    assert any("https://graph.microsoft.com/.default" in s for s in scopes)


def _scan(size: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = "device@printers.example"
    msg["To"] = "someone@example.org"
    msg["Subject"] = "big scan"
    msg["Message-ID"] = "<big-scan@printers.example>"
    msg["X-Scanner"] = "floor 3"
    msg.set_content("Scan attached.")
    msg.add_alternative("<p>Scan attached.</p>", subtype="html")
    msg.add_attachment(os.urandom(size), maintype="application", subtype="pdf",
                       filename="scan.pdf")
    msg.add_attachment(b"small notes\n" * 100, maintype="text", subtype="plain",
                       filename="notes.txt")
    return msg.as_bytes(policy=email.policy.SMTP)


async def test_30mb_message_goes_through_draft_and_upload_session(
        grelays: RelayFactory) -> None:
    relay = await grelays.start(graph_config(grelays))
    graph = _graph(grelays.sandbox)
    data = _scan(21 * 1024 * 1024)  # about 29 MB once base64-encoded in MIME
    assert len(data) > 28 * 1024 * 1024
    # Straight into the spool: the listener's DATA path has its own tests, and 30 MB through
    # it takes most of a minute on a busy test machine.
    envelope = Envelope(mail_from=MAILBOX, rcpt_tos=("someone@example.org", "boss@example.org"),
                        account="printers", app="contoso", mailbox=MAILBOX,
                        bounce_to="device@printers.example", client="127.0.0.1",
                        received_at=time.time())
    queue_id = await asyncio.to_thread(relay.spool.commit, envelope, data)
    relay.delivery.submit(QueueEntry(queue_id, envelope, DeliveryState(), len(data)))
    (got,) = await graph.wait_for_messages(1, timeout=60)
    assert got.route == "draft"
    assert dict(got.attachments) == {"scan.pdf": 21 * 1024 * 1024, "notes.txt": 1200}
    parsed = email.message_from_bytes(got.data, policy=email.policy.default)
    assert parsed["Subject"] == "big scan"
    assert parsed["Message-ID"] == "<big-scan@printers.example>"
    assert parsed["X-Scanner"] == "floor 3"
    assert set(got.rcpt_tos) == {"someone@example.org", "boss@example.org"}
    original = email.message_from_bytes(data, policy=email.policy.default)
    sent_pdf = next(p for p in parsed.iter_attachments() if p.get_filename() == "scan.pdf")
    orig_pdf = next(p for p in original.iter_attachments() if p.get_filename() == "scan.pdf")
    assert sent_pdf.get_content() == orig_pdf.get_content()
    methods = [(m, p.rsplit("/", 1)[-1]) for m, p, _, _ in graph.requests]
    assert ("POST", "createUploadSession") in methods
    assert sum(1 for m, _ in methods if m == "PUT") == 7  # 21 MB in 3.2 MB chunks
    assert ("POST", "sendMail") not in methods  # never tried the 4 MB path
    assert graph.drafts == 0
    await wait_until(lambda: not relay.spool.entries())


async def test_429_retry_after_is_honoured(grelays: RelayFactory) -> None:
    relay = await grelays.start(graph_config(grelays))  # min_backoff 0.2 s
    graph = _graph(grelays.sandbox)
    graph.inject(429, "ApplicationThrottled", "Application is over its MailboxConcurrency "
                 "limit.", headers={"Retry-After": "2"}, route="sendMail")
    await _deliver(relay, message("throttled"), ("someone@example.org",))
    await graph.wait_for_messages(1, timeout=15)
    sends = [(status, at) for m, p, status, at in graph.requests if p.endswith("/sendMail")]
    assert [s for s, _ in sends] == [429, 202], sends
    assert sends[1][1] - sends[0][1] >= 2.0, sends


async def test_5xx_is_deferred_then_delivered(grelays: RelayFactory) -> None:
    relay = await grelays.start(graph_config(grelays))
    graph = _graph(grelays.sandbox)
    graph.inject(503, "ServiceUnavailable", "Service is unavailable.", route="sendMail")
    await _deliver(relay, message("retry me"), ("someone@example.org",))
    (got,) = await graph.wait_for_messages(1, timeout=15)
    assert b"Subject: retry me" in got.data
    assert relay.delivery.counters.deferred == 1
    await wait_until(lambda: relay.delivery.counters.delivered == 1)


async def test_missing_mail_send_keeps_mail_queued_and_names_the_permission(
        tmp_path: Path, password_hash: str) -> None:
    box = await _graph_sandbox(tmp_path, graph_roles=())
    factory = RelayFactory(box, tmp_path, password_hash)
    try:
        relay = await factory.start(graph_config(factory))
        await _deliver(relay, message("denied"), ("someone@example.org",))
        await wait_until(lambda: any(e.state.last_error for e in relay.spool.entries()))
        (entry,) = relay.spool.entries()
        assert "Mail.Send" in entry.state.last_error
        assert "ErrorAccessDenied" in entry.state.last_error
        assert relay.delivery.counters.bounced == 0
        assert _graph(box).messages == []
    finally:
        for relay in list(factory.running):
            await factory.stop(relay)
        await box.stop()


def test_graph_errors_map_to_the_smtp_classes() -> None:
    ctx = Context(mailbox=MAILBOX, app="contoso", client_id=DEMO_APP.client_id)
    denied = explain_graph(403, "ErrorAccessDenied", "Access is denied.", ctx)
    assert denied.verdict is Verdict.DEFER_ADMIN
    assert "Mail.Send" in denied.fix and "Application Mail.Send" in denied.fix
    assert DEMO_APP.client_id in denied.fix
    assert explain_graph(429, "", "", ctx).verdict is Verdict.RETRY
    assert explain_graph(502, "", "", ctx).verdict is Verdict.RETRY
    assert explain_graph(401, "InvalidAuthenticationToken", "", ctx).verdict \
        is Verdict.RETRY_NEW_TOKEN
    assert explain_graph(400, "ErrorInvalidRecipients", "", ctx).verdict is Verdict.BOUNCE
    assert explain_graph(404, "MailboxNotEnabledForRESTAPI", "", ctx).verdict \
        is Verdict.DEFER_ADMIN
    assert "graph_request_limit" in explain_graph(413, "", "", ctx).fix
    assert explain_graph(403, "ErrorSendAsDenied", "", ctx).verdict is Verdict.BOUNCE


def test_graph_request_body_is_base64_of_the_whole_message() -> None:
    data = message("x", to="a@example.org")
    out, extra = with_envelope_recipients(data, ["a@example.org", "b@example.org"])
    assert out == b"Bcc: b@example.org\r\n" + data
    assert extra == []
    _, extra = with_envelope_recipients(data, ["c@example.org"])
    assert extra == ["a@example.org"]
    assert base64.b64decode(base64.b64encode(out)) == out


async def _doctor(factory: RelayFactory, **kwargs: Any) -> Any:
    path = factory.tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(graph_config(factory)))
    report = await diagnose(path, timeout=10, account="printers", **kwargs)
    (result,) = report.accounts
    return result


async def test_doctor_on_a_graph_app_checks_mail_send_and_skips_smtp(
        grelays: RelayFactory) -> None:
    result = await _doctor(grelays, send_to="admin@contoso.example")
    assert [(c.link, c.status) for c in result.checks] == [
        ("credential", Status.OK), ("token_endpoint", Status.OK), ("token", Status.OK),
        ("claims", Status.OK), ("graph", Status.OK), ("send", Status.OK)]
    assert set(result.claims["roles"]) == {"Mail.Send", "Mail.ReadWrite"}
    assert result.claims["aud"] == "https://graph.microsoft.com"
    (got,) = await _graph(grelays.sandbox).wait_for_messages(1)
    assert got.rcpt_tos == ("admin@contoso.example",)
    assert grelays.sandbox.exchange.messages == []  # no SMTP link was walked


async def test_doctor_names_mail_send_when_the_role_is_missing(
        tmp_path: Path, password_hash: str) -> None:
    box = await _graph_sandbox(tmp_path, graph_roles=())
    try:
        result = await _doctor(RelayFactory(box, tmp_path, password_hash),
                               send_to="admin@contoso.example")
        claims = next(c for c in result.checks if c.link == "claims")
        assert claims.status is Status.WARN
        assert "Mail.Send" in claims.summary and "Microsoft Graph" in claims.fix
        send_check = next(c for c in result.checks if c.link == "send")
        assert send_check.status is Status.FAIL
        assert "Mail.Send" in send_check.fix
    finally:
        await box.stop()


async def test_large_message_without_mail_readwrite_waits_and_names_the_permission(
        tmp_path: Path, password_hash: str) -> None:
    # Set up as the README used to say (Mail.Send alone): small mail goes, a large scan is
    # refused at the draft (403, as Graph's permission table says) and waits, explained.
    box = await _graph_sandbox(tmp_path, graph_roles=("Mail.Send",))
    factory = RelayFactory(box, tmp_path, password_hash)
    try:
        data = graph_config(factory)
        data["apps"]["contoso"]["graph_request_limit"] = "64KB"
        relay = await factory.start(data)
        await _deliver(relay, _scan(100 * 1024), ("someone@example.org",))
        await wait_until(lambda: any(e.state.last_error for e in relay.spool.entries()))
        (entry,) = relay.spool.entries()
        assert "Mail.ReadWrite" in entry.state.last_error
        assert "draft" in entry.state.last_error
        # Only the large message waits: the mailbox's lane is not paused for small mail.
        await _deliver(relay, message("small"), ("someone@example.org",))
        (got,) = await _graph(box).wait_for_messages(1)
        assert got.route == "sendMail" and b"Subject: small" in got.data
        assert relay.delivery.counters.bounced == 0
        assert [m for m, p, status, _ in _graph(box).requests
                if p.endswith("/messages") and status == 403] == ["POST"]
    finally:
        for relay in list(factory.running):
            await factory.stop(relay)
        await box.stop()


def test_a_refused_draft_is_explained_as_mail_readwrite() -> None:
    ctx = Context(mailbox=MAILBOX, app="contoso", client_id=DEMO_APP.client_id)
    draft = explain_graph(403, "ErrorAccessDenied", "Access is denied.", ctx,
                          request=f"POST /users/{MAILBOX}/messages")
    assert draft.verdict is Verdict.DEFER_ADMIN
    assert "Mail.ReadWrite" in draft.summary and "Application Mail.ReadWrite" in draft.fix
    upload = explain_graph(403, "ErrorAccessDenied", "", ctx, request=(
        f"POST /users/{MAILBOX}/messages/AAMk1/attachments/createUploadSession"))
    assert "Mail.ReadWrite" in upload.summary
    send = explain_graph(403, "ErrorAccessDenied", "", ctx,
                         request=f"POST /users/{MAILBOX}/messages/AAMk1/send")
    assert "Mail.Send application permission" in send.summary


async def test_doctor_names_mail_readwrite_when_large_messages_cannot_go(
        tmp_path: Path, password_hash: str) -> None:
    box = await _graph_sandbox(tmp_path, graph_roles=("Mail.Send",))
    try:
        result = await _doctor(RelayFactory(box, tmp_path, password_hash))
        claims = next(c for c in result.checks if c.link == "claims")
        assert claims.status is Status.WARN
        assert "Mail.ReadWrite" in claims.summary and "draft" in claims.summary
        assert "Application Mail.ReadWrite" in claims.fix
    finally:
        await box.stop()


async def test_graph_sessions_count_as_upstream_connections(grelays: RelayFactory) -> None:
    # The per-relay counter behind m365relay_upstream_connections_opened_total counts both
    # transports (the class-global SMTP counter it replaced never saw Graph).
    relay = await grelays.start(graph_config(grelays))
    assert relay.delivery.opened.total == 0
    await _deliver(relay, message("counted"), ("someone@example.org",))
    await _graph(grelays.sandbox).wait_for_messages(1)
    await wait_until(lambda: relay.delivery.counters.delivered == 1)
    assert relay.delivery.opened.total == 1
    second = graph_config(grelays)
    second["spool"]["directory"] = str(grelays.tmp_path / "spool-2")
    other = await grelays.start(second)  # a second relay in the process keeps its own count
    assert other.delivery.opened.total == 0
