"""``m365relay doctor`` against the sandbox: break each link of the chain in turn and check
that doctor names that link and its fix, with the real ids filled in."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from conftest import MAILBOX, base_config, wait_until
from cryptography.hazmat.primitives import serialization

from relay.cli import main
from relay.doctor.claims import check_claims
from relay.doctor.command import diagnose
from relay.doctor.report import AccountReport, Check, Report, Status, render_text
from relay.sandbox import DEMO_APP, Sandbox, SandboxApp

PRINTERS = "printers@contoso.example"
CERT_CLIENT_ID = "99999999-8888-7777-6666-555555555555"
AUTH_DISABLED = ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled "
                 "for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.")


@pytest.fixture(autouse=True)
def _requests_honours_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    # With these set, requests would trust them instead of the sandbox CA (psf/requests#3829).
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


@contextlib.asynccontextmanager
async def sandbox_with(tmp_path: Path, *apps: SandboxApp) -> AsyncIterator[Sandbox]:
    async with Sandbox(tmp_path / "sandbox", apps=apps) as box:
        yield box


def object_id(client_id: str) -> str:
    """The service principal object id the sandbox puts into the token's oid claim."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sandbox-sp:{client_id}"))


def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def doctor(tmp_path: Path, data: dict[str, Any], **kwargs: Any) -> Report:
    return await diagnose(write_config(tmp_path, data), timeout=10, **kwargs)


async def run_cli(*args: str) -> tuple[int, str, str]:
    """`python -m relay ...` as an admin runs it; the sandbox keeps serving in this loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def account(report: Report, name: str = "scanner") -> AccountReport:
    return next(a for a in report.accounts if a.account == name)


def link(report: AccountReport, name: str) -> Check:
    return next(c for c in report.checks if c.link == name)


def statuses(report: AccountReport) -> dict[str, str]:
    return {c.link: c.status.value for c in report.checks}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- the whole chain holds ----------------------------------------------------------------------


async def test_cli_all_links_hold_and_send_to_delivers_a_test_message(
        sandbox: Sandbox, tmp_path: Path, password_hash: str) -> None:
    path = write_config(tmp_path, base_config(sandbox, tmp_path, password_hash))

    code, out, err = await run_cli("doctor", "--config", str(path), "--send-to",
                                   "admin@contoso.example")

    assert code == 0, out + err
    assert "✓ XOAUTH2 accepted" in out
    assert "✓ test message sent" in out
    assert "All links hold for 2 account(s)." in out
    assert "✗" not in out
    received = await sandbox.exchange.wait_for_messages(2)
    assert {m.mail_from for m in received} == {MAILBOX, PRINTERS}
    assert all(m.rcpt_tos == ("admin@contoso.example",) for m in received)
    assert all(b"Subject: m365relay doctor: test message" in m.data for m in received)
    # The app's links are walked once, not once per account.
    assert sandbox.entra.token_request_count == 1
    await wait_until(lambda: sandbox.exchange.open_connections == 0)


async def test_json_report_names_every_link_and_leaks_no_secret(
        sandbox: Sandbox, tmp_path: Path, password_hash: str) -> None:
    path = write_config(tmp_path, base_config(sandbox, tmp_path, password_hash))

    code, out, _ = await run_cli("doctor", "--config", str(path), "--json", "--account",
                                 "printers")

    assert code == 0
    report = json.loads(out)
    assert report["ok"] is True
    [printers] = report["accounts"]
    assert printers["account"] == "printers"
    assert [c["link"] for c in printers["checks"]] == [
        "credential", "token_endpoint", "token", "claims", "upstream", "starttls", "xoauth2",
        "send"]
    assert [c["status"] for c in printers["checks"]] == ["ok"] * 7 + ["skipped"]
    assert printers["token_claims"]["roles"] == ["SMTP.SendAsApp"]
    assert printers["token_claims"]["oid"] == object_id(DEMO_APP.client_id)
    assert DEMO_APP.client_secret is not None
    assert DEMO_APP.client_secret not in out
    token = sandbox.entra.issued_tokens[0]
    assert token not in out
    assert token.split(".")[2] not in out


# -- Entra ID ---------------------------------------------------------------------------------


async def test_cli_wrong_secret_stops_at_token_with_the_secret_fix(
        sandbox: Sandbox, tmp_path: Path, password_hash: str) -> None:
    data = base_config(sandbox, tmp_path, password_hash)
    data["apps"]["contoso"]["client_secret"] = "not-the-secret"
    path = write_config(tmp_path, data)

    code, out, _ = await run_cli("doctor", "--config", str(path), "--json")

    assert code == 1
    report = json.loads(out)
    scanner = report["accounts"][0]
    assert scanner["broken_link"] == "token"
    token = scanner["checks"][2]
    assert token["code"] == "AADSTS7000215"
    assert "rejected the client secret" in token["summary"]
    assert (f"App registrations > {DEMO_APP.client_id} > Certificates & secrets > New client "
            "secret") in token["fix"]
    assert "`apps.contoso.client_secret`" in token["fix"]
    assert [c["status"] for c in scanner["checks"][3:]] == ["skipped"] * 5
    assert sandbox.exchange.connections == 0


async def test_secret_id_pasted_instead_of_value_is_pointed_out(
        sandbox: Sandbox, tmp_path: Path, password_hash: str) -> None:
    data = base_config(sandbox, tmp_path, password_hash)
    data["apps"]["contoso"]["client_secret"] = "0f8fad5b-d9cb-469f-a165-70867728950e"

    scanner = account(await doctor(tmp_path, data, account="scanner"))

    assert link(scanner, "credential").status is Status.WARN
    token = link(scanner, "token")
    assert token.code == "AADSTS7000215"
    assert token.fix.startswith("`apps.contoso.client_secret` is a GUID: that is what the "
                                "Secret ID looks like")


async def test_unknown_client_id_gives_app_check_and_consent_url(
        sandbox: Sandbox, tmp_path: Path, password_hash: str) -> None:
    data = base_config(sandbox, tmp_path, password_hash)
    stranger = "12345678-1234-1234-1234-123456789abc"
    data["apps"]["contoso"]["client_id"] = stranger

    scanner = account(await doctor(tmp_path, data))

    assert scanner.broken is link(scanner, "token")
    token = link(scanner, "token")
    assert token.code == "AADSTS700016"
    assert f"does not know app {stranger} in tenant {DEMO_APP.tenant}" in token.summary
    assert (f"https://login.microsoftonline.com/{DEMO_APP.tenant}/adminconsent?client_id="
            f"{stranger}") in token.fix


async def test_unknown_tenant_is_named_with_entras_code(
        sandbox: Sandbox, tmp_path: Path, password_hash: str) -> None:
    data = base_config(sandbox, tmp_path, password_hash)
    data["apps"]["contoso"]["tenant"] = "fabrikam.example"
    data["apps"]["contoso"]["authority"] = sandbox.authority("fabrikam.example")

    scanner = account(await doctor(tmp_path, data))

    assert statuses(scanner)["token_endpoint"] == "ok"
    token = link(scanner, "token")
    assert scanner.broken is token
    assert token.code == "AADSTS90002"
    assert "does not know tenant fabrikam.example" in token.summary
    assert "Set `apps.contoso.tenant` to the Directory (tenant) ID" in token.fix


async def test_token_without_send_role_is_the_broken_link(tmp_path: Path,
                                                          password_hash: str) -> None:
    async with sandbox_with(tmp_path, dataclasses.replace(DEMO_APP, roles=())) as box:
        data = base_config(box, tmp_path, password_hash)
        scanner = account(await doctor(tmp_path, data, account="scanner"))
        assert box.exchange.auth_failure_reasons  # Exchange really refused the token

    claims = link(scanner, "claims")
    assert scanner.broken is claims
    assert "roles none" in claims.detail
    assert "no SMTP.SendAsApp role" in claims.summary
    assert claims.code == "535 5.7.3"
    assert ("Office 365 Exchange Online > Application permissions > SMTP.SendAsApp, then "
            "'Grant admin consent'") in claims.fix
    assert f"{box.authority(DEMO_APP.tenant)}/adminconsent?client_id={DEMO_APP.client_id}" \
        in claims.fix
    assert (f"New-ManagementRoleAssignment -Role 'Application SMTP.SendAsApp' -App "
            f"{DEMO_APP.client_id} -CustomResourceScope <management scope that includes "
            f"{MAILBOX}>") in claims.fix


# -- Exchange Online ----------------------------------------------------------------------------


async def test_mailbox_without_permission_gets_add_mailbox_permission_with_the_ids(
        tmp_path: Path, password_hash: str) -> None:
    limited = dataclasses.replace(DEMO_APP, mailboxes=frozenset({PRINTERS}))
    async with sandbox_with(tmp_path, limited) as box:
        report = await doctor(tmp_path, base_config(box, tmp_path, password_hash))

    sp = object_id(DEMO_APP.client_id)
    assert account(report, "printers").broken is None
    scanner = account(report, "scanner")
    login = link(scanner, "xoauth2")
    assert scanner.broken is login
    assert login.code == "535 5.7.3"
    # printers was accepted with the same app, so the service principal exists: only the
    # mailbox permission is left, and doctor says so first.
    assert login.fix.startswith(f"Exchange Online accepted app {DEMO_APP.client_id} for "
                                f"{PRINTERS}, so its service principal is registered")
    assert f"Add-MailboxPermission -Identity {MAILBOX} -User {sp} -AccessRights FullAccess" \
        in login.fix
    assert f"New-ServicePrincipal -AppId {DEMO_APP.client_id} -ObjectId {sp}" in login.fix
    assert "<enterprise app object id>" not in login.fix
    assert report.exit_code == 1


async def test_refused_mailbox_alone_names_service_principal_and_permission(
        tmp_path: Path, password_hash: str) -> None:
    limited = dataclasses.replace(DEMO_APP, mailboxes=frozenset({"someone-else@contoso.example"}))
    async with sandbox_with(tmp_path, limited) as box:
        report = await doctor(tmp_path, base_config(box, tmp_path, password_hash),
                              account="scanner")

    login = link(account(report), "xoauth2")
    assert login.fix.startswith("The token is valid and carries SMTP.SendAsApp, so Exchange "
                                f"Online refuses app {DEMO_APP.client_id} for {MAILBOX} itself")
    sp = object_id(DEMO_APP.client_id)
    assert f"1. Exchange knows the app. In Exchange Online PowerShell run `New-ServicePrincipal " \
           f"-AppId {DEMO_APP.client_id} -ObjectId {sp}`" in login.fix


async def test_smtp_auth_disabled_gets_set_cas_mailbox(
        sandbox: Sandbox, tmp_path: Path, password_hash: str) -> None:
    sandbox.exchange.inject("auth", AUTH_DISABLED)

    scanner = account(await doctor(tmp_path, base_config(sandbox, tmp_path, password_hash),
                                   account="scanner", send_to="admin@contoso.example"))

    login = link(scanner, "xoauth2")
    assert scanner.broken is login
    assert login.code == "535 5.7.139"
    assert "SMTP AUTH is turned off for the whole tenant" in login.summary
    assert f"Set-CASMailbox -Identity {MAILBOX} -SmtpClientAuthenticationDisabled $false" \
        in login.fix
    assert link(scanner, "send").status is Status.SKIPPED
    assert sandbox.exchange.messages == []


async def test_upstream_unreachable_stops_before_starttls(
        sandbox: Sandbox, tmp_path: Path, password_hash: str) -> None:
    data = base_config(sandbox, tmp_path, password_hash)
    data["apps"]["contoso"]["smtp_port"] = closed_port()

    scanner = account(await doctor(tmp_path, data))

    upstream = link(scanner, "upstream")
    assert scanner.broken is upstream
    assert "refused the connection" in upstream.summary
    assert "`apps.contoso.smtp_host` and `apps.contoso.smtp_port`" in upstream.fix
    assert statuses(scanner)["token"] == "ok"
    assert [statuses(scanner)[k] for k in ("starttls", "xoauth2", "send")] == ["skipped"] * 3


async def test_untrusted_ca_file_breaks_the_token_endpoint_link(
        sandbox: Sandbox, tmp_path: Path, password_hash: str) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    data = base_config(sandbox, tmp_path, password_hash)
    data["apps"]["contoso"]["ca_file"] = str(other_ca)

    scanner = account(await doctor(tmp_path, data))

    endpoint = link(scanner, "token_endpoint")
    assert scanner.broken is endpoint
    assert "TLS certificate of localhost" in endpoint.summary
    assert "not trusted" in endpoint.summary
    assert "`apps.contoso.ca_file`" in endpoint.fix
    assert sandbox.entra.token_request_count == 0


async def test_untrusted_smtp_certificate_breaks_the_starttls_link(
        sandbox: Sandbox, tmp_path: Path, password_hash: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Entra trusted through the HTTP CA bundle, Exchange's certificate not: only STARTTLS fails.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(sandbox.ca_file))
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    data = base_config(sandbox, tmp_path, password_hash)
    data["apps"]["contoso"]["ca_file"] = str(other_ca)

    scanner = account(await doctor(tmp_path, data))

    starttls = link(scanner, "starttls")
    assert scanner.broken is starttls
    assert statuses(scanner)["upstream"] == "ok"
    assert "The TLS certificate of localhost is not trusted" in starttls.summary
    assert "`apps.contoso.ca_file`" in starttls.fix
    assert sandbox.exchange.auth_attempts == 0


# -- certificate credentials ------------------------------------------------------------------


def rsa_leaf(ca: trustme.CA | None = None, **kwargs: Any) -> trustme.LeafCert:
    ca = ca or trustme.CA(key_type=trustme.KeyType.RSA)
    return ca.issue_cert("m365relay-app", key_type=trustme.KeyType.RSA, **kwargs)


def cert_config(box: Sandbox, tmp_path: Path, password_hash: str, key_pem: bytes,
                cert_pem: bytes, **extra: Any) -> dict[str, Any]:
    data = base_config(box, tmp_path, password_hash)
    (tmp_path / "app.key").write_bytes(key_pem)
    (tmp_path / "app.crt").write_bytes(cert_pem)
    app = data["apps"]["contoso"]
    del app["client_secret"]
    app["client_id"] = CERT_CLIENT_ID
    app["certificate"] = {"private_key": {"file": "app.key"},
                          "certificate": {"file": "app.crt"}, **extra}
    return data


def cert_app(cert_pem: bytes) -> SandboxApp:
    return SandboxApp(tenant=DEMO_APP.tenant, client_id=CERT_CLIENT_ID, certificate_pem=cert_pem)


def thumbprint(cert_pem: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303


async def test_certificate_app_passes_every_link(tmp_path: Path, password_hash: str) -> None:
    leaf = rsa_leaf()
    key, cert = leaf.private_key_pem.bytes(), leaf.cert_chain_pems[0].bytes()
    async with sandbox_with(tmp_path, DEMO_APP, cert_app(cert)) as box:
        data = cert_config(box, tmp_path, password_hash, key, cert)
        report = await doctor(tmp_path, data, account="scanner", send_to="admin@contoso.example")
        received = await box.exchange.wait_for_messages(1)

    scanner = account(report)
    assert scanner.broken is None, render_text(report)
    credential = link(scanner, "credential").detail
    assert "RSA 2048-bit key matches" in credential
    assert f"thumbprint {thumbprint(cert)}" in credential
    assert "with the certificate" in link(scanner, "token").detail
    assert received[0].client_id == CERT_CLIENT_ID


async def test_certificate_not_uploaded_shows_its_thumbprint(tmp_path: Path,
                                                             password_hash: str) -> None:
    ours, uploaded = rsa_leaf(), rsa_leaf()
    key, cert = ours.private_key_pem.bytes(), ours.cert_chain_pems[0].bytes()
    async with sandbox_with(tmp_path, DEMO_APP,
                            cert_app(uploaded.cert_chain_pems[0].bytes())) as box:
        scanner = account(await doctor(tmp_path, cert_config(box, tmp_path, password_hash,
                                                             key, cert)))

    token = link(scanner, "token")
    assert scanner.broken is token
    assert token.code == "AADSTS700027"
    assert f"SHA-1 thumbprint {thumbprint(cert)}" in token.fix
    assert (f"App registrations > {CERT_CLIENT_ID} > Certificates & secrets > Certificates must "
            "list that thumbprint") in token.fix


async def test_private_key_of_another_certificate_fails_before_entra(
        tmp_path: Path, password_hash: str) -> None:
    ours, stranger = rsa_leaf(), rsa_leaf()
    cert = ours.cert_chain_pems[0].bytes()
    async with sandbox_with(tmp_path, DEMO_APP, cert_app(cert)) as box:
        data = cert_config(box, tmp_path, password_hash, stranger.private_key_pem.bytes(), cert)
        scanner = account(await doctor(tmp_path, data))
        requests = box.entra.token_request_count

    credential = link(scanner, "credential")
    assert scanner.broken is credential
    assert "does not belong to the certificate in `apps.contoso.certificate.certificate`" \
        in credential.summary
    assert "openssl pkey -pubout" in credential.fix
    assert requests == 0


async def test_expired_certificate_fails_with_renewal_steps(tmp_path: Path,
                                                            password_hash: str) -> None:
    now = datetime.now(UTC)
    leaf = rsa_leaf(not_before=now - timedelta(days=400), not_after=now - timedelta(days=2))
    key, cert = leaf.private_key_pem.bytes(), leaf.cert_chain_pems[0].bytes()
    async with sandbox_with(tmp_path, DEMO_APP, cert_app(cert)) as box:
        scanner = account(await doctor(tmp_path, cert_config(box, tmp_path, password_hash,
                                                             key, cert)))

    credential = link(scanner, "credential")
    assert scanner.broken is credential
    assert "expired on" in credential.summary
    assert f"App registrations > {CERT_CLIENT_ID} > Certificates & secrets" in credential.fix


async def test_encrypted_key_without_passphrase_names_the_key(tmp_path: Path,
                                                              password_hash: str) -> None:
    leaf = rsa_leaf()
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"s3cret"))
    cert = leaf.cert_chain_pems[0].bytes()
    async with sandbox_with(tmp_path, DEMO_APP, cert_app(cert)) as box:
        without = account(await doctor(tmp_path, cert_config(box, tmp_path, password_hash,
                                                             encrypted, cert)))
        with_it = account(await doctor(tmp_path, cert_config(
            box, tmp_path, password_hash, encrypted, cert, passphrase="s3cret")))

    assert without.broken is link(without, "credential")
    assert "is encrypted, but no passphrase is configured" in without.broken.summary
    assert "`apps.contoso.certificate.passphrase`" in without.broken.fix
    assert with_it.broken is None


# -- claims, config, usage, output --------------------------------------------------------------


async def test_claims_name_wrong_audience_and_clock(sandbox: Sandbox, tmp_path: Path,
                                                    password_hash: str) -> None:
    from relay.config import records as config_mod
    config = config_mod.parse(base_config(sandbox, tmp_path, password_hash), base_dir=tmp_path)
    app = config.apps["contoso"]

    graph = check_claims("contoso", app, sandbox.entra.mint_token(
        DEMO_APP, audience="https://graph.microsoft.com"))
    assert graph.check.status is Status.FAIL
    assert "Set `apps.contoso.scope` to https://outlook.office365.com/.default" in graph.check.fix

    stale = check_claims("contoso", app, sandbox.entra.mint_token(DEMO_APP, lifetime=-60))
    assert stale.check.status is Status.FAIL
    assert "timedatectl" in stale.check.fix

    no_role = check_claims("contoso", app, sandbox.entra.mint_token(DEMO_APP, roles=()))
    # Undecided until Exchange answers: RBAC for Applications needs no role in the token.
    assert no_role.check.status is Status.WARN
    assert no_role.role_missing


async def test_cli_invalid_config_exits_78_with_key_paths(
        sandbox: Sandbox, tmp_path: Path, password_hash: str) -> None:
    data = base_config(sandbox, tmp_path, password_hash)
    data["apps"]["contoso"]["client_id"] = "my-app"
    path = write_config(tmp_path, data)

    code, out, _ = await run_cli("doctor", "--config", str(path))
    json_code, json_out, _ = await run_cli("doctor", "--config", str(path), "--json")

    assert code == 78
    assert "✗ config valid" in out
    assert "apps.contoso.client_id: 'my-app' is not a GUID" in out
    assert json_code == 78
    assert json.loads(json_out)["config"]["status"] == "fail"


def test_unknown_account_is_a_usage_error(tmp_path: Path, password_hash: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = {
        "listeners": [{"name": "local", "bind": "127.0.0.1:0"}],
        "apps": {"contoso": {"tenant": "contoso.example", "client_id": DEMO_APP.client_id,
                             "client_secret": "x"}},
        "accounts": [{"name": "scanner", "networks": ["127.0.0.1"], "app": "contoso",
                      "mailbox": MAILBOX}],
        "spool": {"directory": str(tmp_path / "spool")},
    }
    path = write_config(tmp_path, data)

    code = main(["doctor", "--config", str(path), "--account", "fax"])

    assert code == 2
    assert "has no account named 'fax' (accounts: scanner)" in capsys.readouterr().err


def test_checklist_falls_back_to_ascii_marks() -> None:
    report = Report("x.yaml", Check("config", Status.OK, detail="fine"))
    scanner = AccountReport("scanner", "contoso", MAILBOX, checks=[
        Check("credential", Status.OK, detail="client secret"),
        Check("token_endpoint", Status.FAIL, summary="DNS failed.", fix="Check DNS.")])
    scanner.complete(send_asked=False)
    report.accounts.append(scanner)
    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")

    text = render_text(report, ascii_out)

    text.encode("ascii")
    assert "FAIL token endpoint reachable" in text
    assert "What happened: DNS failed." in text
    assert "--   test message sent" in text
    assert "not asked for (use --send-to)" in text


async def test_config_from_env_as_in_the_container(sandbox: Sandbox, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "M365RELAY_TENANT": DEMO_APP.tenant, "M365RELAY_CLIENT_ID": DEMO_APP.client_id,
        "M365RELAY_CLIENT_SECRET_FILE": str(sandbox.directory / "demo-client-secret"),
        "M365RELAY_AUTHORITY": sandbox.authority(DEMO_APP.tenant),
        "M365RELAY_SMTP_HOST": sandbox.smtp_host, "M365RELAY_SMTP_PORT": str(sandbox.smtp_port),
        "M365RELAY_CA_FILE": str(sandbox.ca_file), "M365RELAY_MAILBOX": "scanner@contoso.example",
        "M365RELAY_NETWORKS": "127.0.0.0/8", "M365RELAY_SPOOL": str(tmp_path / "spool"),
    }.items():
        monkeypatch.setenv(name, value)
    code, out, err = await run_cli("doctor", "--config", str(tmp_path / "absent.yaml"),
                                   "--config-from-env", "--json")
    assert code == 0, out + err
    assert json.loads(out)["accounts"][0]["mailbox"] == "scanner@contoso.example"


def test_a_link_before_the_broken_one_is_not_blamed_on_it() -> None:
    # A delegated sign-in goes from the credential straight to the token; with the sign-in
    # revoked, doctor said the token endpoint was "not checked: an earlier link is broken".
    from relay.doctor.report import AccountReport, Check, Status

    report = AccountReport("alice", "person", "alice@contoso.example",
                           checks=[Check("credential", Status.OK), Check("token", Status.FAIL)])
    report.complete(send_asked=False)
    detail = {c.link: c.detail for c in report.checks}
    assert detail["token_endpoint"] == "not checked"
    assert detail["upstream"] == "not checked: an earlier link is broken"
    assert detail["send"] == "not asked for (use --send-to)"
    assert [c.link for c in report.checks][:3] == ["credential", "token_endpoint", "token"]
