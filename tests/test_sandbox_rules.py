"""Microsoft's rules as the sandbox enforces them (relay/sandbox/RULES.md): each test here fails
when a fake is more lenient than Exchange Online, Entra or Graph, so the relay's tests cannot
pass against a fake that a real tenant would contradict. Real clients over real TLS."""

from __future__ import annotations

import asyncio
import base64
import json
import smtplib
import ssl
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import requests
from conftest import RelayFactory, wait_until

from relay.sandbox import DEMO_APP, Sandbox
from relay.sandbox.apps import GRAPH_AUDIENCE
from relay.sandbox.rules import MICROSOFT, MailboxLimits

MAILBOX = "scanner@contoso.example"
OTHER = "printer@contoso.example"


def mime(sender: str = MAILBOX, size: int = 0, to: str = "someone@contoso.example") -> bytes:
    return (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: rules\r\n\r\n"
            + "x" * size + "\r\n").encode()


@pytest.fixture(autouse=True)
def _requests_honours_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


async def _box(tmp_path: Path, limits: MailboxLimits = MICROSOFT) -> Sandbox:
    box = Sandbox(tmp_path / "sandbox", graph=True, limits=limits)
    await box.start()
    return box


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    box = await _box(tmp_path)
    yield box
    await box.stop()


async def signed_in(sb: Sandbox, user: str = MAILBOX) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname=sb.smtp_host, port=sb.smtp_port, start_tls=True,
                             tls_context=sb.client_ssl_context(), timeout=10)
    await client.connect()
    await client.ehlo()
    await client.auth_xoauth2(user, sb.entra.mint_token(DEMO_APP))
    return client


def test_the_defaults_are_microsofts() -> None:
    assert (MICROSOFT.connections, MICROSOFT.messages, MICROSOFT.window) == (3, 30, 60.0)
    assert (MICROSOFT.recipients_per_day, MICROSOFT.day) == (10_000, 86_400.0)
    assert MICROSOFT.recipients_per_message == 500
    assert MICROSOFT.max_send_size == 36_700_160  # "35 MB (36,700,160 bytes)"
    assert MICROSOFT.graph_concurrency == 4


# -- Exchange Online SMTP ------------------------------------------------------------------


@pytest.mark.parametrize("blob", [
    b"user=%s\x01auth=bearer %s\x01\x01",  # the scheme is "Bearer"
    b"user=%s\x01auth=Bearer %s\x01",  # one ^A short
    b"auth=Bearer %s\x01user=%s\x01\x01",  # fields swapped
    b"user=%s\x01host=x\x01auth=Bearer %s\x01\x01",  # a field Microsoft does not define
])
async def test_xoauth2_must_be_exactly_microsofts_format(sandbox: Sandbox, blob: bytes) -> None:
    token = sandbox.entra.mint_token(DEMO_APP).encode()
    values = (token, MAILBOX.encode()) if blob.startswith(b"auth") else (MAILBOX.encode(), token)
    client = aiosmtplib.SMTP(hostname=sandbox.smtp_host, port=sandbox.smtp_port, start_tls=True,
                             tls_context=sandbox.client_ssl_context(), timeout=10)
    await client.connect()
    await client.ehlo()
    try:
        reply = await client.execute_command(b"AUTH", b"XOAUTH2",
                                             base64.b64encode(blob % values))
    finally:
        client.close()
    assert reply.code == 535
    assert "XOAUTH2 response" in sandbox.exchange.auth_failure_reasons[0]


async def test_a_delegated_token_signs_in_only_as_its_user(sandbox: Sandbox) -> None:
    token = sandbox.entra.mint_delegated_token(DEMO_APP, MAILBOX)
    client = aiosmtplib.SMTP(hostname=sandbox.smtp_host, port=sandbox.smtp_port, start_tls=True,
                             tls_context=sandbox.client_ssl_context(), timeout=10)
    await client.connect()
    await client.ehlo()
    try:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await client.auth_xoauth2(OTHER, token)
        await client.auth_xoauth2(MAILBOX.upper(), token)
    finally:
        client.close()
    assert f"the token was issued to {MAILBOX}" in sandbox.exchange.auth_failure_reasons[0]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1")
async def test_tls_below_1_2_is_refused(sandbox: Sandbox) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(str(sandbox.ca_file))
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer what old firmware offers
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    client = aiosmtplib.SMTP(hostname=sandbox.smtp_host, port=sandbox.smtp_port, start_tls=True,
                             tls_context=old, timeout=10)
    with pytest.raises((aiosmtplib.SMTPException, ssl.SSLError, OSError)):
        await client.connect()
    client.close()


async def test_from_header_needs_send_as_like_the_envelope(sandbox: Sandbox) -> None:
    client = await signed_in(sandbox)
    try:
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await client.sendmail(MAILBOX, ["someone@contoso.example"], mime(sender=OTHER))
        assert caught.value.code == 554 and "SendAsDenied" in caught.value.message
        sandbox.exchange.send_as[MAILBOX] = {OTHER}  # Add-RecipientPermission ... SendAs
        await client.sendmail(MAILBOX, ["someone@contoso.example"], mime(sender=OTHER))
        await client.sendmail(OTHER, ["someone@contoso.example"], mime(sender=OTHER))
    finally:
        client.close()
    assert len(sandbox.exchange.messages) == 2


async def test_message_over_the_mailbox_max_send_size_is_552(tmp_path: Path) -> None:
    box = await _box(tmp_path, replace(MICROSOFT, max_send_size=4096))
    try:
        client = await signed_in(box)
        try:
            await client.sendmail(MAILBOX, ["a@contoso.example"], mime(size=3000))
            with pytest.raises(aiosmtplib.SMTPDataError) as caught:
                await client.sendmail(MAILBOX, ["a@contoso.example"], mime(size=5000))
        finally:
            client.close()
        assert caught.value.code == 552
        assert "MaxSubmissionExceeded" in caught.value.message
        assert len(box.exchange.messages) == 1
    finally:
        await box.stop()


async def test_recipient_501_is_452_4_5_3(sandbox: Sandbox) -> None:
    rcpts = [f"r{i}@contoso.example" for i in range(501)]
    client = await signed_in(sandbox)
    try:
        refused, _ = await client.sendmail(MAILBOX, rcpts, mime())
    finally:
        client.close()
    assert list(refused) == ["r500@contoso.example"]
    assert refused["r500@contoso.example"].code == 452
    (got,) = sandbox.exchange.messages
    assert len(got.rcpt_tos) == 500


async def test_a_fourth_connection_of_one_mailbox_is_432(sandbox: Sandbox) -> None:
    clients = [await signed_in(sandbox) for _ in range(4)]
    try:
        for client in clients[:3]:
            await client.sendmail(MAILBOX, ["a@contoso.example"], mime())
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as caught:
            await clients[3].sendmail(MAILBOX, ["a@contoso.example"], mime())
        assert caught.value.code == 432 and "4.3.2" in caught.value.message
        other = await signed_in(sandbox, OTHER)  # another mailbox has its own three
        await other.sendmail(OTHER, ["a@contoso.example"], mime(sender=OTHER))
        other.close()
        clients[0].close()
        await asyncio.wait_for(_until(lambda: sandbox.exchange.open_connections == 3), 5)
        await clients[3].sendmail(MAILBOX, ["a@contoso.example"], mime())
    finally:
        for client in clients:
            client.close()
    assert len(sandbox.exchange.messages) == 5


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


async def test_message_31_in_a_minute_is_throttled(sandbox: Sandbox) -> None:
    client = await signed_in(sandbox)
    try:
        for _ in range(30):
            await client.sendmail(MAILBOX, ["a@contoso.example"], mime())
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await client.sendmail(MAILBOX, ["a@contoso.example"], mime())
        other = await signed_in(sandbox, OTHER)
        await other.sendmail(OTHER, ["a@contoso.example"], mime(sender=OTHER))
        other.close()
    finally:
        client.close()
    assert caught.value.code == 432
    assert len(sandbox.exchange.messages) == 31 and sandbox.exchange.throttled == 1


async def test_the_message_window_rolls(tmp_path: Path) -> None:
    box = await _box(tmp_path, replace(MICROSOFT, messages=2, window=0.5))
    try:
        client = await signed_in(box)
        try:
            for _ in range(2):
                await client.sendmail(MAILBOX, ["a@contoso.example"], mime())
            with pytest.raises(aiosmtplib.SMTPDataError):
                await client.sendmail(MAILBOX, ["a@contoso.example"], mime())
            await asyncio.sleep(0.6)  # the limit is a time window: waiting is the point
            await client.sendmail(MAILBOX, ["a@contoso.example"], mime())
        finally:
            client.close()
        assert len(box.exchange.messages) == 3
    finally:
        await box.stop()


async def test_recipients_over_the_daily_limit_are_refused(tmp_path: Path) -> None:
    box = await _box(tmp_path, replace(MICROSOFT, recipients_per_day=5))
    try:
        client = await signed_in(box)
        try:
            await client.sendmail(MAILBOX, [f"r{i}@contoso.example" for i in range(3)], mime())
            with pytest.raises(aiosmtplib.SMTPDataError) as caught:
                await client.sendmail(MAILBOX, [f"s{i}@contoso.example" for i in range(3)],
                                      mime())
            await client.sendmail(MAILBOX, ["last@contoso.example", "one@contoso.example"],
                                  mime())
        finally:
            client.close()
        assert caught.value.code == 554 and "SubmissionQuotaExceeded" in caught.value.message
        assert len(box.exchange.messages) == 2
    finally:
        await box.stop()


# -- Microsoft Graph ---------------------------------------------------------------------


def graph_token(sb: Sandbox, roles: tuple[str, ...], **kwargs: Any) -> str:
    return sb.entra.mint_token(DEMO_APP, audience=GRAPH_AUDIENCE, roles=roles, **kwargs)


def call(sb: Sandbox, method: str, path: str, token: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, f"{sb.graph_url}/v1.0/users/{MAILBOX}{path}",
                            headers={"Authorization": f"Bearer {token}",
                                     **kwargs.pop("headers", {})},
                            verify=str(sb.ca_file), timeout=10, **kwargs)


def send_mail(sb: Sandbox, token: str, data: bytes = b"") -> requests.Response:
    return call(sb, "POST", "/sendMail", token, data=base64.b64encode(data or mime()),
                headers={"Content-Type": "text/plain"})


DRAFT = {"subject": "scan", "body": {"contentType": "Text", "content": "hi"},
         "toRecipients": [{"emailAddress": {"address": "a@contoso.example"}}]}


async def test_graph_permission_is_checked_per_endpoint(sandbox: Sandbox) -> None:
    def run() -> None:
        send_only = graph_token(sandbox, ("Mail.Send",))
        assert send_mail(sandbox, send_only).status_code == 202
        denied = call(sandbox, "POST", "/messages", send_only, json=DRAFT)
        assert (denied.status_code, denied.json()["error"]["code"]) == (403, "ErrorAccessDenied")

        write_only = graph_token(sandbox, ("Mail.ReadWrite",))
        assert send_mail(sandbox, write_only).status_code == 403
        draft = call(sandbox, "POST", "/messages", write_only, json=DRAFT)
        assert draft.status_code == 201
        draft_id = draft.json()["id"]
        attached = call(sandbox, "POST", f"/messages/{draft_id}/attachments", write_only,
                        json={"name": "a.txt", "contentBytes": base64.b64encode(b"a").decode()})
        assert attached.status_code == 201
        assert call(sandbox, "POST", f"/messages/{draft_id}/send", write_only).status_code \
            == 403
        # Both permissions, as the README asks: the draft goes.
        both = graph_token(sandbox, ("Mail.Send", "Mail.ReadWrite"))
        assert call(sandbox, "POST", f"/messages/{draft_id}/send", both).status_code == 202

    await asyncio.to_thread(run)
    assert [m.route for m in sandbox.graph.messages] == ["sendMail", "draft"]  # type: ignore[union-attr]


async def test_graph_refuses_tokens_for_exchange_expired_or_not_yet_valid(
        sandbox: Sandbox) -> None:
    def run() -> list[int]:
        exchange = sandbox.entra.mint_token(DEMO_APP, roles=("Mail.Send",))
        expired = graph_token(sandbox, ("Mail.Send",), lifetime=-1)
        future = graph_token(sandbox, ("Mail.Send",), not_before=2_000_000_000_0)
        return [send_mail(sandbox, t).status_code for t in (exchange, expired, future)]

    assert await asyncio.to_thread(run) == [401, 401, 401]


async def test_upload_sessions_are_for_3_to_150_mb_in_ranges_up_to_4_mb(
        sandbox: Sandbox) -> None:
    def run() -> None:
        token = graph_token(sandbox, ("Mail.Send", "Mail.ReadWrite"))
        draft_id = call(sandbox, "POST", "/messages", token, json=DRAFT).json()["id"]
        path = f"/messages/{draft_id}/attachments"

        def session(size: int) -> requests.Response:
            return call(sandbox, "POST", f"{path}/createUploadSession", token, json={
                "AttachmentItem": {"attachmentType": "file", "name": "s.pdf", "size": size}})

        small = session(1024 * 1024)
        assert (small.status_code, small.json()["error"]["code"]) == (
            400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize")
        assert session(151 * 1024 * 1024).status_code == 400
        inline = call(sandbox, "POST", path, token, json={
            "name": "big.pdf", "contentBytes": base64.b64encode(b"x" * (3 * 2**20 + 1)).decode()})
        assert inline.status_code == 413
        size = 9 * 1024 * 1024
        url = session(size).json()["uploadUrl"]
        too_much = requests.put(url, data=b"x" * (4 * 2**20 + 1), verify=str(sandbox.ca_file),
                                headers={"Content-Range": f"bytes 0-{4 * 2**20}/{size}"},
                                timeout=10)
        assert too_much.status_code == 413

    await asyncio.to_thread(run)


async def test_graph_refuses_messages_over_max_send_size(tmp_path: Path) -> None:
    box = await _box(tmp_path, replace(MICROSOFT, max_send_size=4096))
    graph = box.graph
    assert graph is not None
    try:
        def run() -> None:
            token = graph_token(box, ("Mail.Send", "Mail.ReadWrite"))
            assert send_mail(box, token, mime(size=1000)).status_code == 202
            big = send_mail(box, token, mime(size=5000))
            assert (big.status_code, big.json()["error"]["code"]) == (
                400, "ErrorMessageSizeExceeded")
            draft_id = call(box, "POST", "/messages", token, json=DRAFT).json()["id"]
            call(box, "POST", f"/messages/{draft_id}/attachments", token, json={
                "name": "a.bin", "contentBytes": base64.b64encode(b"y" * 6000).decode()})
            assert call(box, "POST", f"/messages/{draft_id}/send", token).status_code == 400

        await asyncio.to_thread(run)
        assert len(graph.messages) == 1 and graph.drafts == 1
    finally:
        await box.stop()


async def test_a_fifth_concurrent_graph_request_is_429(sandbox: Sandbox) -> None:
    graph = sandbox.graph
    assert graph is not None
    token = graph_token(sandbox, ("Mail.Send",))
    graph.delay(2.0, times=4, route="sendMail")
    slow = [asyncio.create_task(asyncio.to_thread(send_mail, sandbox, token)) for _ in range(4)]
    await asyncio.wait_for(_until(lambda: graph.in_flight(MAILBOX) == 4), 10)
    fifth = await asyncio.to_thread(send_mail, sandbox, token)
    assert fifth.status_code == 429 and fifth.headers["Retry-After"] == "1"
    assert json.loads(fifth.content)["error"]["code"] == "ApplicationThrottled"
    assert [r.status_code for r in await asyncio.gather(*slow)] == [202] * 4


# -- the relay within the rules ------------------------------------------------------------


async def test_relay_splits_600_recipients_into_transactions_exchange_takes(
        relays: RelayFactory, sandbox: Sandbox) -> None:
    data = relays.config()
    data["listeners"][0]["max_recipients"] = 1000
    relay = await relays.start(data)
    rcpts = [f"r{i}@contoso.example" for i in range(600)]

    def submit() -> dict[str, Any]:
        with smtplib.SMTP(*relay.addresses["local"], timeout=30) as client:
            refused: dict[str, Any] = client.sendmail("device@printers.example", rcpts,
                                                      mime(sender="device@printers.example"))
            return refused

    assert await asyncio.to_thread(submit) == {}
    got = await sandbox.exchange.wait_for_messages(2, timeout=30)
    assert [len(m.rcpt_tos) for m in got] == [500, 100]
    assert sorted(r for m in got for r in m.rcpt_tos) == sorted(rcpts)
    assert sandbox.exchange.refused_for_limits == []  # never offered a 501st recipient
    await wait_until(lambda: relay.delivery.counters.delivered == 600)
    assert relay.delivery.counters.deferred == 0
