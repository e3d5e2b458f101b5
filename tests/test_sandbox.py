"""The sandbox against real clients: msal for Entra, aiosmtplib for Exchange Online."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosmtplib
import msal
import pytest
import requests
import trustme

from relay.sandbox import DEMO_APP, SCOPE, Sandbox, SandboxApp, run_sandbox
from relay.sandbox.tokens import b64url_decode

MAILBOX = "scanner@contoso.example"
OTHER = "printer@contoso.example"
LIMITED = SandboxApp(tenant="contoso.example", client_id="limited-app",
                     client_secret="limited-secret", mailboxes=frozenset({MAILBOX}))
NO_ROLE = SandboxApp(tenant="contoso.example", client_id="no-role-app",
                     client_secret="no-role-secret", roles=())
RAW = (b"From: Scanner <scanner@contoso.example>\r\n"
       b"To: someone@contoso.example\r\n"
       b"Subject: scan\r\n"
       b"\r\n"
       b".a line that starts with a dot\r\n"
       b"..and one with two\r\n"
       + b"x" * 5000 + b"\r\n"  # longer than RFC 5321's 1000, as some devices send
       b"\xc3\xa9t\xc3\xa9 8-bit\r\n"
       b"end\r\n")


@pytest.fixture(autouse=True)
def _requests_honours_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    # requests lets these variables override Session.verify, which is how msal passes
    # verify=; with them set, msal would ignore the sandbox CA (psf/requests#3829).
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


@pytest.fixture(scope="module")
def client_cert() -> tuple[bytes, bytes]:
    """(private key PEM, certificate PEM) for certificate sign-in; RSA, as Entra requires."""
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    leaf = ca.issue_cert("m365relay-app", key_type=trustme.KeyType.RSA)
    return leaf.private_key_pem.bytes(), leaf.cert_chain_pems[0].bytes()


@pytest.fixture
async def sandbox(tmp_path: Path, client_cert: tuple[bytes, bytes]) -> AsyncIterator[Sandbox]:
    cert_app = SandboxApp(tenant="contoso.example", client_id="cert-app",
                          certificate_pem=client_cert[1])
    async with Sandbox(tmp_path / "sandbox",
                       apps=(DEMO_APP, LIMITED, NO_ROLE, cert_app)) as sb:
        yield sb


def acquire(sb: Sandbox, app: SandboxApp = DEMO_APP, credential: Any = None,
            scope: str = SCOPE) -> dict[str, Any]:
    """msal exactly as the relay uses it: blocking, so callers run it in a thread."""
    client = msal.ConfidentialClientApplication(
        app.client_id, client_credential=credential or app.client_secret,
        authority=sb.authority(app.tenant), instance_discovery=False, verify=str(sb.ca_file))
    result: dict[str, Any] = client.acquire_token_for_client([scope])
    return result


def post_token(sb: Sandbox, tenant: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
    response = requests.post(f"{sb.authority(tenant)}/oauth2/v2.0/token", data=form,
                             verify=str(sb.ca_file), timeout=5)
    return response.status_code, response.json()


def claims_of(token: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(b64url_decode(token.split(".")[1]))
    return result


@asynccontextmanager
async def smtp(sb: Sandbox, *, user: str | None = MAILBOX, token: str | None = None,
               start_tls: bool = True) -> AsyncIterator[aiosmtplib.SMTP]:
    client = aiosmtplib.SMTP(hostname=sb.smtp_host, port=sb.smtp_port, start_tls=start_tls,
                             tls_context=sb.client_ssl_context(), timeout=5)
    await client.connect()
    try:
        await client.ehlo()  # aiosmtplib forgets the capabilities after STARTTLS
        if user is not None:
            await client.auth_xoauth2(user, token or sb.entra.mint_token(DEMO_APP))
        yield client
    finally:
        client.close()


# -- Entra ----------------------------------------------------------------------------------


async def test_msal_gets_a_token_exchange_would_accept(sandbox: Sandbox) -> None:
    result = await asyncio.to_thread(acquire, sandbox)

    assert result["token_type"] == "Bearer", result
    token = result["access_token"]
    assert len(token) > 1024
    claims = claims_of(token)
    assert claims["aud"] == "https://outlook.office365.com"
    assert claims["appid"] == DEMO_APP.client_id
    assert claims["tid"] == DEMO_APP.tenant
    assert claims["iss"] == f"https://sts.windows.net/{DEMO_APP.tenant}/"
    assert claims["roles"] == ["SMTP.SendAsApp"]
    assert sandbox.entra.issued_tokens == [token]
    [form] = sandbox.entra.token_requests
    assert sandbox.entra.token_request_count == 1
    assert form["grant_type"] == "client_credentials"
    assert form["client_secret"] == "***"
    assert SCOPE in form["scope"].split()


async def test_wrong_secret_is_aadsts7000215(sandbox: Sandbox) -> None:
    result = await asyncio.to_thread(acquire, sandbox, DEMO_APP, "not-the-secret")

    assert result["error"] == "invalid_client"
    assert result["error_description"].startswith("AADSTS7000215: Invalid client secret")
    assert result["error_codes"] == [7000215]
    assert {"timestamp", "trace_id", "correlation_id"} <= result.keys()
    assert sandbox.entra.issued_tokens == []


@pytest.mark.parametrize(("tenant", "form", "expected"), [
    ("nowhere.example", {}, (400, "invalid_request", 90002)),
    (DEMO_APP.tenant, {"client_id": "unknown-app"}, (400, "unauthorized_client", 700016)),
    # (Graph's scope is valid: the sandbox issues Graph tokens for the Graph transport.)
    (DEMO_APP.tenant, {"scope": "https://management.azure.com/.default"},
     (400, "invalid_scope", 70011)),
    (DEMO_APP.tenant, {"grant_type": "password"}, (400, "unsupported_grant_type", 70003)),
    (DEMO_APP.tenant, {"client_secret": ""}, (401, "invalid_client", 7000216)),
])
async def test_token_endpoint_errors_have_entra_shape(
        sandbox: Sandbox, tenant: str, form: dict[str, str],
        expected: tuple[int, str, int]) -> None:
    good = {"grant_type": "client_credentials", "client_id": DEMO_APP.client_id,
            "client_secret": DEMO_APP.client_secret or "", "scope": SCOPE}

    status, body = await asyncio.to_thread(post_token, sandbox, tenant, good | form)

    code = expected[2]
    assert (status, body["error"], body["error_codes"][0]) == expected
    assert body["error_description"].startswith(f"AADSTS{code}: ")


async def test_unknown_tenant_fails_msal_discovery(sandbox: Sandbox) -> None:
    with pytest.raises(ValueError, match="Unable to get authority configuration"):
        await asyncio.to_thread(acquire, sandbox, replace(DEMO_APP, tenant="nowhere.example"))


async def test_injected_token_errors_are_served_then_consumed(sandbox: Sandbox) -> None:
    sandbox.entra.inject(500, {"error": "temporarily_unavailable"}, times=2)

    first = await asyncio.to_thread(post_token, sandbox, DEMO_APP.tenant, {})
    second = await asyncio.to_thread(post_token, sandbox, DEMO_APP.tenant, {})
    result = await asyncio.to_thread(acquire, sandbox)

    assert first == second == (500, {"error": "temporarily_unavailable"})
    assert "access_token" in result
    assert sandbox.entra.token_request_count == 3


@pytest.mark.parametrize("style", ["sha256 (PS256)", "sha1 thumbprint (RS256)"])
async def test_certificate_sign_in(sandbox: Sandbox, client_cert: tuple[bytes, bytes],
                                   style: str) -> None:
    key, cert = client_cert
    app = next(a for a in sandbox.apps if a.client_id == "cert-app")
    if style.startswith("sha256"):
        credential = {"private_key": key.decode(), "public_certificate": cert.decode()}
    else:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        sha1 = x509.load_pem_x509_certificate(cert).fingerprint(hashes.SHA1()).hex()  # noqa: S303
        credential = {"private_key": key.decode(), "thumbprint": sha1}

    result = await asyncio.to_thread(acquire, sandbox, app, credential)

    assert claims_of(result["access_token"])["appid"] == "cert-app", result
    assert sandbox.entra.token_requests[0]["client_assertion"] == "***"


async def test_assertion_signed_by_another_key_is_refused(sandbox: Sandbox) -> None:
    stranger = trustme.CA(key_type=trustme.KeyType.RSA).issue_cert(
        "stranger", key_type=trustme.KeyType.RSA)
    app = next(a for a in sandbox.apps if a.client_id == "cert-app")
    credential = {"private_key": stranger.private_key_pem.bytes().decode(),
                  "public_certificate": stranger.cert_chain_pems[0].bytes().decode()}

    result = await asyncio.to_thread(acquire, sandbox, app, credential)

    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [700027]


# -- Exchange: the happy path ---------------------------------------------------------------


async def test_msal_token_then_aiosmtplib_delivery_is_recorded_byte_exact(
        sandbox: Sandbox) -> None:
    token = (await asyncio.to_thread(acquire, sandbox))["access_token"]

    async with smtp(sandbox, token=token) as client:
        await client.sendmail(MAILBOX, ["someone@contoso.example"], RAW)
        response = await client.sendmail(MAILBOX, ["a@contoso.example", "b@x.example"], RAW)

    assert response[1].startswith("2.6.0 <")
    assert "Queued mail for delivery" in response[1]
    first, second = await sandbox.exchange.wait_for_messages(2)
    assert first.data == RAW
    assert (first.mail_from, first.rcpt_tos) == (MAILBOX, ("someone@contoso.example",))
    assert (first.auth_user, first.client_id) == (MAILBOX, DEMO_APP.client_id)
    assert second.rcpt_tos == ("a@contoso.example", "b@x.example")
    assert first.connection_id == second.connection_id == 1
    assert first.path is not None and first.path.read_bytes() == RAW
    sidecar = json.loads(first.path.with_suffix(".json").read_text())
    assert sidecar["auth_user"] == MAILBOX and sidecar["rcpt_tos"] == ["someone@contoso.example"]
    assert sandbox.exchange.auth_attempts == 1 and sandbox.exchange.auth_failures == 0


async def test_each_connection_gets_its_own_id(sandbox: Sandbox) -> None:
    for _ in range(2):
        async with smtp(sandbox) as client:
            await client.sendmail(MAILBOX, [OTHER], RAW)

    assert [m.connection_id for m in sandbox.exchange.messages] == [1, 2]
    assert sandbox.exchange.connections == 2
    assert [m.path.name for m in sandbox.exchange.messages if m.path] == ["00001.eml", "00002.eml"]


async def test_two_step_xoauth2(sandbox: Sandbox) -> None:
    blob = base64.b64encode(
        f"user={MAILBOX}\x01auth=Bearer {sandbox.entra.mint_token(DEMO_APP)}\x01\x01".encode())

    async with smtp(sandbox, user=None) as client:
        challenge = await client.execute_command(b"AUTH", b"XOAUTH2")
        done = await client.execute_command(blob)

    assert (challenge.code, done.code) == (334, 235)
    assert done.message == "2.7.0 Authentication successful"


async def test_banner_and_capabilities_look_like_exchange(sandbox: Sandbox) -> None:
    async with smtp(sandbox, user=None, start_tls=False) as client:
        plain = client.last_ehlo_response
        refused = await client.execute_command(b"AUTH", b"XOAUTH2")
        await client.starttls()
        await client.ehlo()
        secure = client.esmtp_extensions

    assert "STARTTLS" in plain.message and "AUTH" not in plain.message
    assert "SIZE 157286400" in plain.message
    assert (refused.code, refused.message) == (504, "5.7.4 Unrecognized authentication type")
    assert secure["auth"] == "LOGIN XOAUTH2" and "starttls" not in secure
    assert sandbox.exchange.auth_failure_reasons == ["AUTH before STARTTLS"]


# -- Exchange: refusals -----------------------------------------------------------------


async def test_mail_before_auth_is_530(sandbox: Sandbox) -> None:
    async with smtp(sandbox, user=None) as client:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as caught:
            await client.mail(MAILBOX)

    assert caught.value.code == 530
    assert caught.value.message.startswith("5.7.57 Client not authenticated")


async def test_basic_auth_is_disabled(sandbox: Sandbox) -> None:
    async with smtp(sandbox, user=None) as client:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
            await client.auth_login(MAILBOX, "password")

    assert caught.value.code == 535 and "5.7.139" in caught.value.message


def _tampered(sb: Sandbox) -> str:
    token = sb.entra.mint_token(DEMO_APP)
    return token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")


@pytest.mark.parametrize(("make_token", "user", "reason"), [
    (_tampered, MAILBOX, "signature"),
    (lambda sb: sb.entra.mint_token(DEMO_APP, lifetime=-1), MAILBOX, "expired"),
    (lambda sb: sb.entra.mint_token(DEMO_APP, audience="https://graph.microsoft.com"),
     MAILBOX, "audience"),
    (lambda sb: sb.entra.mint_token(NO_ROLE), MAILBOX, "SMTP.SendAsApp"),
    (lambda sb: sb.entra.mint_token(LIMITED), OTHER, "FullAccess"),
    (lambda sb: sb.entra.mint_token(replace(DEMO_APP, client_id="gone")), MAILBOX,
     "service principal"),
    (lambda sb: "not-a-jwt", MAILBOX, "not a JWT"),
])
async def test_bad_tokens_are_535_5_7_3(sandbox: Sandbox, make_token: Any, user: str,
                                        reason: str) -> None:
    async with smtp(sandbox, user=None) as client:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
            await client.auth_xoauth2(user, make_token(sandbox))

    assert caught.value.code == 535
    assert caught.value.message == "5.7.3 Authentication unsuccessful [SANDBOX]"
    assert sandbox.exchange.auth_failures == 1
    assert reason in sandbox.exchange.auth_failure_reasons[0]


async def test_limited_app_may_use_its_own_mailbox(sandbox: Sandbox) -> None:
    async with smtp(sandbox, token=sandbox.entra.mint_token(LIMITED)) as client:
        await client.sendmail(MAILBOX, [OTHER], RAW)

    assert sandbox.exchange.messages[0].client_id == "limited-app"


async def test_revoked_tokens_are_refused(sandbox: Sandbox) -> None:
    token = sandbox.entra.mint_token(DEMO_APP)
    sandbox.entra.revoke_all()

    async with smtp(sandbox, user=None) as client:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await client.auth_xoauth2(MAILBOX, token)
    async with smtp(sandbox):  # a token issued after the revocation still works
        pass

    assert "revoked" in sandbox.exchange.auth_failure_reasons[0]


async def test_send_as_another_mailbox_is_554_5_2_252(sandbox: Sandbox) -> None:
    async with smtp(sandbox) as client:
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await client.sendmail(OTHER, ["someone@contoso.example"], RAW)
        await client.sendmail(MAILBOX.upper(), ["someone@contoso.example"], RAW)

    assert caught.value.code == 554
    assert caught.value.message.startswith(
        f"5.2.252 SendAsDenied; {MAILBOX} not allowed to send as {OTHER}; "
        "STOREDRV.Submission.Exception:SendAsDeniedException")
    assert len(sandbox.exchange.messages) == 1  # the case-insensitive match went through


# -- Exchange: fault injection ----------------------------------------------------------


async def test_inject_connect(sandbox: Sandbox) -> None:
    sandbox.exchange.inject("connect", "421 4.3.2 Service not available")

    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as caught:
        async with smtp(sandbox):
            pass
    async with smtp(sandbox):  # the injection was used up
        pass

    assert caught.value.code == 421
    assert sandbox.exchange.connections == 2


async def test_inject_ehlo_without_starttls_makes_a_careful_client_stop(
        sandbox: Sandbox) -> None:
    sandbox.exchange.inject("ehlo", "250 SANDBOX.outlook.example Hello")

    with pytest.raises(aiosmtplib.SMTPException, match="STARTTLS"):
        async with smtp(sandbox):
            pass


async def test_inject_auth(sandbox: Sandbox) -> None:
    sandbox.exchange.inject("auth", "454 4.7.0 Temporary authentication failure")

    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
        async with smtp(sandbox):
            pass
    async with smtp(sandbox):
        pass

    assert caught.value.code == 454
    assert (sandbox.exchange.auth_attempts, sandbox.exchange.auth_failures) == (2, 1)


async def test_inject_mail(sandbox: Sandbox) -> None:
    sandbox.exchange.inject("mail", "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit "
                                    "exceeded")

    async with smtp(sandbox) as client:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as caught:
            await client.sendmail(MAILBOX, [OTHER], RAW)
        await client.rset()
        await client.sendmail(MAILBOX, [OTHER], RAW)

    assert caught.value.code == 432
    assert len(sandbox.exchange.messages) == 1


async def test_inject_rcpt_for_one_recipient(sandbox: Sandbox) -> None:
    sandbox.exchange.inject("rcpt", "550 5.1.10 RESOLVER.ADR.RecipientNotFound",
                            rcpt="gone@contoso.example")

    async with smtp(sandbox) as client:
        errors, _ = await client.sendmail(MAILBOX, [OTHER, "gone@contoso.example"], RAW)

    assert errors["gone@contoso.example"].code == 550
    [message] = await sandbox.exchange.wait_for_messages(1)
    assert message.rcpt_tos == (OTHER,)


async def test_inject_data_twice(sandbox: Sandbox) -> None:
    sandbox.exchange.inject("data", "451 4.4.397 Error submitting message", times=2)

    async with smtp(sandbox) as client:
        for _ in range(2):
            with pytest.raises(aiosmtplib.SMTPDataError) as caught:
                await client.sendmail(MAILBOX, [OTHER], RAW)
            assert caught.value.code == 451
        await client.sendmail(MAILBOX, [OTHER], RAW)

    assert len(sandbox.exchange.messages) == 1


async def test_inject_drop_after_data(sandbox: Sandbox) -> None:
    sandbox.exchange.inject("drop_after_data")

    async with smtp(sandbox) as client:
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await client.sendmail(MAILBOX, [OTHER], RAW)
    async with smtp(sandbox) as client:
        await client.sendmail(MAILBOX, [OTHER], RAW)

    [message] = await sandbox.exchange.wait_for_messages(1)
    assert message.connection_id == 2


def test_inject_rejects_mistakes() -> None:
    exchange = Sandbox(Path("unused")).exchange
    with pytest.raises(ValueError, match="unknown stage"):
        exchange.inject("helo", "421 4.3.2 x")
    with pytest.raises(ValueError, match="SMTP code"):
        exchange.inject("data", "oops")
    with pytest.raises(ValueError, match="rcpt="):
        exchange.inject("mail", "550 5.1.0 x", rcpt="a@b")


async def test_reset_forgets_injections_and_recordings(sandbox: Sandbox) -> None:
    async with smtp(sandbox) as client:
        await client.sendmail(MAILBOX, [OTHER], RAW)
    sandbox.exchange.inject("connect", "421 4.3.2 busy")
    sandbox.entra.inject(500, {})

    sandbox.reset()

    assert sandbox.exchange.messages == [] and sandbox.exchange.connections == 0
    assert sandbox.entra.token_requests == []
    async with smtp(sandbox) as client:
        await client.sendmail(MAILBOX, [OTHER], RAW)
    assert sandbox.exchange.messages[0].path is not None
    assert sandbox.exchange.messages[0].path.name == "00002.eml"  # never overwrites


# -- waiting and lifecycle --------------------------------------------------------------


async def test_wait_for_messages_times_out(sandbox: Sandbox) -> None:
    with pytest.raises(TimeoutError, match="received 0 message"):
        await sandbox.exchange.wait_for_messages(1, timeout=0.05)


async def test_wait_for_messages_wakes_on_arrival(sandbox: Sandbox) -> None:
    waiter = asyncio.create_task(sandbox.exchange.wait_for_messages(1))
    async with smtp(sandbox) as client:
        await client.sendmail(MAILBOX, [OTHER], RAW)

    assert len(await waiter) == 1


async def test_stop_hangs_up_on_open_sessions(tmp_path: Path) -> None:
    sb = Sandbox(tmp_path)
    await sb.start()
    client = aiosmtplib.SMTP(hostname=sb.smtp_host, port=sb.smtp_port, start_tls=True,
                             tls_context=sb.client_ssl_context(), timeout=5)
    await client.connect()
    assert sb.exchange.open_connections == 1

    await sb.stop()

    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.noop()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", sb.smtp_port)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", sb.entra_port)


async def test_run_sandbox_writes_files_and_prints_summary(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ready: asyncio.Future[Sandbox] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_sandbox(tmp_path, entra_port=0, smtp_port=0,
                                           on_ready=ready.set_result))
    sb = await asyncio.wait_for(ready, 10)
    result = await asyncio.to_thread(acquire, sb)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    secret = tmp_path / "demo-client-secret"
    assert secret.read_text().strip() == DEMO_APP.client_secret
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca.pem").stat().st_mode) == 0o644
    assert "access_token" in result
    out = capsys.readouterr().out
    assert f"https://localhost:{sb.entra_port}/demo-tenant" in out
    assert f"localhost:{sb.smtp_port}" in out and str(secret) in out


async def test_busy_port_is_a_clear_oserror(sandbox: Sandbox, tmp_path: Path) -> None:
    with pytest.raises(OSError, match="Choose another port"):
        await Sandbox(tmp_path / "second", smtp_port=sandbox.smtp_port).start()

