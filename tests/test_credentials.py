"""Credentials end to end against the sandbox: PFX certificates, federated assertions read from
a file that rotates, and several tenants in one config."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import PASSWORD, RelayFactory, message, send, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from relay.config import records as config_mod
from relay.doctor.credential import check_credential
from relay.doctor.report import Status
from relay.sandbox import Sandbox
from relay.sandbox.apps import DEMO_APP, SandboxApp
from relay.sandbox.federated import EXCHANGE_AUDIENCE, FederatedCredential
from relay.sandbox.tokens import b64url_encode
from relay.tokens.credentials import AssertionFile, CredentialError, certificate_pems

CERT_CLIENT_ID = "aaaaaaaa-1111-2222-3333-444444444444"
FED_CLIENT_ID = "bbbbbbbb-1111-2222-3333-444444444444"
ISSUER = "https://oidc.cluster.example/abc123"
SUBJECT = "system:serviceaccount:mail:m365relay"


@asynccontextmanager
async def running(tmp_path: Path, password_hash: str, *apps: SandboxApp
                  ) -> AsyncIterator[tuple[Sandbox, RelayFactory]]:
    async with Sandbox(tmp_path / "sandbox", apps=apps) as box:
        factory = RelayFactory(box, tmp_path, password_hash)
        try:
            yield box, factory
        finally:
            for relay in list(factory.running):
                await factory.stop(relay)


def make_pfx(tmp_path: Path, passphrase: bytes | None) -> tuple[Path, bytes]:
    leaf = trustme.CA(key_type=trustme.KeyType.RSA).issue_cert(
        "m365relay-app", key_type=trustme.KeyType.RSA)
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    cert_pem = leaf.cert_chain_pems[0].bytes()
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert isinstance(key, rsa.RSAPrivateKey)
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    path = tmp_path / "app.pfx"
    path.write_bytes(pkcs12.serialize_key_and_certificates(b"app", key, cert, None, encryption))
    return path, cert_pem


def sign_rs256(key: rsa.RSAPrivateKey, claims: dict[str, Any]) -> str:
    header = {"alg": "RS256", "typ": "JWT", "kid": "cluster-key"}
    signing_input = ".".join(b64url_encode(json.dumps(p).encode()) for p in (header, claims))
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url_encode(signature)}"


def oidc_token(key: rsa.RSAPrivateKey, subject: str = SUBJECT) -> str:
    now = int(time.time())
    return sign_rs256(key, {"iss": ISSUER, "sub": subject, "aud": [EXCHANGE_AUDIENCE],
                            "iat": now, "nbf": now, "exp": now + 3600, "jti": str(uuid.uuid4())})


def use_app(data: dict[str, Any], client_id: str, **credential: Any) -> dict[str, Any]:
    app = data["apps"]["contoso"]
    del app["client_secret"]
    app["client_id"] = client_id
    app.update(credential)
    return data


async def test_pfx_app_with_passphrase_from_env_delivers(
        tmp_path: Path, password_hash: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, cert_pem = make_pfx(tmp_path, b"pfx-pass")
    monkeypatch.setenv("TEST_PFX_PASSPHRASE", "pfx-pass")
    app = SandboxApp(tenant=DEMO_APP.tenant, client_id=CERT_CLIENT_ID, certificate_pem=cert_pem)
    async with running(tmp_path, password_hash, app) as (box, relays):
        data = use_app(relays.config(), CERT_CLIENT_ID, certificate={
            "pfx": {"file": "app.pfx"}, "passphrase": {"env": "TEST_PFX_PASSPHRASE"}})
        relay = await relays.start(data)
        code, _ = await asyncio.to_thread(send, relay.addresses["local"], message("pfx"))
        received = await box.exchange.wait_for_messages(1)
        requests = box.entra.token_requests

    assert code == 250
    assert received[0].client_id == CERT_CLIENT_ID
    # A signed assertion, not a secret, went to Entra.
    assert "client_secret" not in requests[0]
    assert requests[0]["client_assertion"] == "***"


def test_pfx_with_wrong_or_missing_passphrase_names_the_keys(tmp_path: Path) -> None:
    make_pfx(tmp_path, b"right")
    base = {"tenant": "t", "client_id": CERT_CLIENT_ID}
    for extra, expected in (({"passphrase": "wrong"}, "is not its passphrase"),
                            ({}, "cannot be opened without a passphrase")):
        app = config_mod.App.model_validate(
            {**base, "certificate": {"pfx": "app.pfx", **extra}},
            context={"base_dir": str(tmp_path)})
        assert app.certificate is not None
        with pytest.raises(CredentialError, match=expected) as info:
            certificate_pems("contoso", app.certificate)
        assert "`apps.contoso.certificate.pfx`" in str(info.value)
        check, _ = check_credential("contoso", app)
        assert check.status is Status.FAIL
        assert "`apps.contoso.certificate.passphrase`" in check.summary + check.fix


def test_doctor_reads_pfx_like_pem(tmp_path: Path) -> None:
    make_pfx(tmp_path, b"pw")
    app = config_mod.App.model_validate(
        {"tenant": "t", "client_id": CERT_CLIENT_ID,
         "certificate": {"pfx": {"file": "app.pfx"}, "passphrase": "pw"}},
        context={"base_dir": str(tmp_path)})
    check, facts = check_credential("contoso", app)
    assert check.status is Status.OK, check.summary
    assert "RSA 2048-bit key matches" in check.detail
    assert facts is not None and facts.source == f"pfx:{tmp_path / 'app.pfx'}"


def test_certificate_forms_are_exclusive(tmp_path: Path) -> None:
    (tmp_path / "app.pfx").write_bytes(b"x")
    base = {"tenant": "t", "client_id": CERT_CLIENT_ID}
    for cert in ({"pfx": "app.pfx", "private_key": "k", "certificate": "c"},
                 {"private_key": "k"}, {}):
        with pytest.raises(ValueError, match=r"pfx|go together"):
            config_mod.App.model_validate({**base, "certificate": cert},
                                          context={"base_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="exactly one of"):
        config_mod.App.model_validate({**base, "client_secret": "s",
                                       "client_assertion": {"file": "token"}})


async def test_federated_app_delivers_and_picks_up_a_rotated_token_file(
        tmp_path: Path, password_hash: str) -> None:
    issuer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = issuer_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    app = SandboxApp(tenant=DEMO_APP.tenant, client_id=FED_CLIENT_ID,
                     federated=FederatedCredential(ISSUER, SUBJECT, public))
    token_file = tmp_path / "azure-identity-token"
    # The first token names a subject Entra does not trust, as after a service account mix-up;
    # the relay must pick up the corrected file without a restart.
    token_file.write_text(oidc_token(issuer_key, subject="system:serviceaccount:mail:other"))
    async with running(tmp_path, password_hash, app) as (box, relays):
        data = use_app(relays.config(), FED_CLIENT_ID,
                       client_assertion={"file": str(token_file)})
        relay = await relays.start(data)
        code, _ = await asyncio.to_thread(send, relay.addresses["local"], message("fed"))
        assert code == 250
        await wait_until(lambda: relay.delivery.counters.deferred >= 1)
        assert not box.exchange.messages
        error = relay.tokens.status("contoso").error
        assert "AADSTS70021" in error
        assert "Federated credentials" in error  # the explanation says where to look
        token_file.write_text(oidc_token(issuer_key) + "\n")
        received = await box.exchange.wait_for_messages(1)

    assert received[0].client_id == FED_CLIENT_ID
    assert received[0].auth_user == "printers@contoso.example"


def test_assertion_file_is_reread_only_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    source = AssertionFile("fed", path)
    assert source() == "first"
    assert source() == "first"
    assert source.reads == 1
    path.write_text("second-longer")
    assert source() == "second-longer"
    assert source.reads == 2
    path.unlink()
    with pytest.raises(CredentialError, match=r"`apps\.fed\.client_assertion\.file`"):
        source()


async def test_two_tenants_in_one_config_both_deliver(tmp_path: Path,
                                                      password_hash: str) -> None:
    fabrikam = SandboxApp(tenant="fabrikam-tenant", client_id=CERT_CLIENT_ID,
                          client_secret="fabrikam-secret")
    async with running(tmp_path, password_hash, DEMO_APP, fabrikam) as (box, relays):
        data = relays.config()
        data["apps"]["fabrikam"] = {**data["apps"]["contoso"], "tenant": "fabrikam-tenant",
                                    "client_id": CERT_CLIENT_ID,
                                    "client_secret": "fabrikam-secret",
                                    "authority": box.authority("fabrikam-tenant")}
        data["accounts"][1]["app"] = "fabrikam"
        data["accounts"][1]["mailbox"] = "printers@fabrikam.example"
        data["listeners"][0]["cleartext_auth_networks"] = ["127.0.0.0/8"]
        relay = await relays.start(data)
        address = relay.addresses["local"]
        # From 127.0.0.1 without AUTH: the "printers" account (fabrikam); with AUTH: contoso.
        await asyncio.to_thread(send, address, message("to-fabrikam"))
        await asyncio.to_thread(send, address, message("to-contoso"),
                                login=("scanner01", PASSWORD))
        received = await box.exchange.wait_for_messages(2)

    by_client = {m.client_id: m.auth_user for m in received}
    assert by_client == {DEMO_APP.client_id: "scanner@contoso.example",
                         CERT_CLIENT_ID: "printers@fabrikam.example"}


def test_assertion_path_from_workload_identity_env(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"tenant": "t", "client_id": FED_CLIENT_ID}
    monkeypatch.delenv("AZURE_FEDERATED_TOKEN_FILE", raising=False)
    with pytest.raises(ValueError, match="AZURE_FEDERATED_TOKEN_FILE is not set"):
        config_mod.App.model_validate(
            {**base, "client_assertion": {"env": "AZURE_FEDERATED_TOKEN_FILE"}})
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", str(tmp_path / "token"))
    app = config_mod.App.model_validate(
        {**base, "client_assertion": {"env": "AZURE_FEDERATED_TOKEN_FILE"}})
    assert app.client_assertion is not None
    assert app.client_assertion.file == tmp_path / "token"
