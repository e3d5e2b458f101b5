"""The certificate a TLS listener serves: a self-signed one kept in the spool when none is
configured (as Debian's Postfix ships a snakeoil pair), and configured files read again on
SIGHUP (a Let's Encrypt renewal) so new connections get the new certificate without a restart."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import shutil
import smtplib
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from conftest import RelayFactory, TLSFiles, message, send

from relay.ingress import selfsigned
from relay.sandbox import Sandbox

HOSTNAME = "relay.printers.example"


def _no_verify() -> ssl.SSLContext:
    # What most printers do: encrypt, and take whatever certificate the server shows.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def served_certificate(address: tuple[str, int], tls: str) -> bytes:
    """The DER certificate a new connection gets (blocking: run in a thread)."""
    if tls == "implicit":
        with socket.create_connection(address, timeout=15) as raw, \
                _no_verify().wrap_socket(raw) as conn:
            return conn.getpeercert(binary_form=True) or b""
    with smtplib.SMTP(*address, timeout=15) as client:
        client.starttls(context=_no_verify())
        assert isinstance(client.sock, ssl.SSLSocket)
        der = client.sock.getpeercert(binary_form=True) or b""
        client.quit()
        return der


def fingerprint(der: bytes) -> str:
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def pem_der(path: Path) -> bytes:
    text = path.read_text()
    start = text.index("-----BEGIN CERTIFICATE-----")
    end = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return ssl.PEM_cert_to_DER_cert(text[start:end])


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_no_certificate_configured_gets_a_self_signed_one_kept_in_the_spool(
        relays: RelayFactory, sandbox: Sandbox, tmp_path: Path, tls: str,
        caplog: pytest.LogCaptureFixture) -> None:
    data = relays.config()
    data["listeners"][0].update(tls=tls, hostname=HOSTNAME)
    with caplog.at_level(logging.INFO, logger="m365relay"):
        relay = await relays.start(data)
    path = tmp_path / "spool" / "tls" / "local.pem"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o077 == 0
    der = await asyncio.to_thread(served_certificate, relay.addresses["local"], tls)
    assert der == pem_der(path)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"SHA-256 fingerprint {fingerprint(der)}" in logged, logged

    # A device that checks certificates can trust this one for the listener's names.
    trusting = ssl.create_default_context(cafile=str(path))
    if tls == "starttls":
        code, _ = await asyncio.to_thread(
            send, relay.addresses["local"], message("self-signed"), starttls=trusting)
        assert code == 250
        await sandbox.exchange.wait_for_messages(1)
    san = ssl._ssl._test_decode_cert(str(path))["subjectAltName"]  # type: ignore[attr-defined]
    assert ("DNS", HOSTNAME) in san and ("DNS", socket.gethostname().lower()) in san
    assert ("IP Address", "127.0.0.1") in san

    # Kept: the next start serves the same certificate, so devices that pinned it go on.
    await relays.stop(relay)
    before = path.read_bytes()
    relay = await relays.start(data)
    again = await asyncio.to_thread(served_certificate, relay.addresses["local"], tls)
    assert again == der and path.read_bytes() == before


def _expired(names: selfsigned.Names) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names.dns[0])])
    now = datetime.datetime.now(datetime.UTC)
    alt = [*(x509.DNSName(n) for n in names.dns)]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=400))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(key, hashes.SHA256()))
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()) + cert.public_bytes(
        serialization.Encoding.PEM)


@pytest.mark.parametrize("damage", ["expired", "renamed", "garbage", "no key"])
async def test_self_signed_certificate_is_made_again_only_when_it_no_longer_serves(
        relays: RelayFactory, tmp_path: Path, damage: str) -> None:
    data = relays.config()
    data["listeners"][0].update(tls="starttls", hostname=HOSTNAME)
    relay = await relays.start(data)
    await relays.stop(relay)
    path = tmp_path / "spool" / "tls" / "local.pem"
    first = pem_der(path)
    if damage == "expired":
        listener = relay.config.listeners[0]
        path.write_bytes(_expired(selfsigned.names_for(listener)))
    elif damage == "renamed":
        data["listeners"][0]["hostname"] = "scan.printers.example"
    elif damage == "garbage":
        path.write_bytes(b"not a certificate\n")
    else:
        text = path.read_text()
        path.write_text(text[text.index("-----BEGIN CERTIFICATE-----"):])
    damaged = path.read_bytes()
    relay = await relays.start(data)
    served = await asyncio.to_thread(served_certificate, relay.addresses["local"], "starttls")
    assert served == pem_der(path) != first
    assert path.read_bytes() != damaged
    assert path.stat().st_mode & 0o777 == 0o600
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    if damage == "renamed":
        san = ssl._ssl._test_decode_cert(str(path))["subjectAltName"]  # type: ignore[attr-defined]
        assert ("DNS", "scan.printers.example") in san and ("DNS", HOSTNAME) not in san


def _renew(tls_files: TLSFiles, folder: Path) -> tuple[Path, Path]:
    """What certbot does: a new certificate and key, for the same names, at the same paths."""
    renewed = tls_files.ca.issue_cert("localhost", "127.0.0.1")
    cert, key = folder / "cert.pem", folder / "key.pem"
    renewed.private_key_and_cert_chain_pem.write_to_path(str(cert))
    renewed.private_key_pem.write_to_path(str(key))
    return cert, key


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_sighup_serves_a_renewed_certificate_to_new_connections(
        relays: RelayFactory, tls_files: TLSFiles, tmp_path: Path, tls: str,
        caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "letsencrypt"
    folder.mkdir()
    cert, key = folder / "cert.pem", folder / "key.pem"
    shutil.copy(tls_files.cert, cert)
    shutil.copy(tls_files.key, key)
    data = relays.config()
    data["listeners"][0].update(tls=tls, certificate=str(cert), private_key=str(key))
    config_path = tmp_path / "relay.yaml"
    config_path.write_text(yaml.safe_dump(data))
    relay = await relays.start(data)
    relay.config_path = config_path
    address = relay.addresses["local"]
    old = await asyncio.to_thread(served_certificate, address, tls)
    assert old == pem_der(tls_files.cert)

    _renew(tls_files, folder)
    assert await asyncio.to_thread(served_certificate, address, tls) == old  # until the HUP
    with caplog.at_level(logging.INFO, logger="m365relay"):
        relay.reload()  # what SIGHUP calls
    new = await asyncio.to_thread(served_certificate, address, tls)
    assert new == pem_der(cert) != old
    assert any(f"now serving certificate {cert}, SHA-256 fingerprint {fingerprint(new)}"
               in r.getMessage() for r in caplog.records)

    # A renewal gone wrong (key of another certificate): refused with the config, and the
    # last good certificate stays.
    key.write_bytes(trustme.CA().issue_cert("localhost").private_key_pem.bytes())
    with caplog.at_level(logging.ERROR, logger="m365relay"):
        relay.reload()
    assert "KEY_VALUES_MISMATCH" in caplog.text and "still running the old one" in caplog.text
    assert await asyncio.to_thread(served_certificate, address, tls) == new


async def test_doctor_shows_the_fingerprint_devices_see(
        relays: RelayFactory, sandbox: Sandbox, tmp_path: Path, tls_files: TLSFiles) -> None:
    from relay.doctor.command import diagnose
    from relay.doctor.report import render_text

    data: dict[str, Any] = relays.config()
    data["listeners"][0].update(tls="starttls", hostname=HOSTNAME)
    data["listeners"].append({"name": "lets", "bind": "127.0.0.1:0", "tls": "implicit",
                              "certificate": str(tls_files.cert),
                              "private_key": str(tls_files.key)})
    config_path = tmp_path / "relay.yaml"
    config_path.write_text(yaml.safe_dump(data))
    report = await diagnose(config_path)
    text = render_text(report)
    assert "made at the relay's next start" in text, text  # before the first start

    relay = await relays.start(data)
    der = await asyncio.to_thread(served_certificate, relay.addresses["local"], "starttls")
    report = await diagnose(config_path)
    text = render_text(report)
    assert f"SHA-256 {fingerprint(der)}" in text, text
    assert f"SHA-256 {fingerprint(pem_der(tls_files.cert))}" in text, text
    assert [c["link"] for c in report.to_json()["listeners"]] == [
        "listener local TLS", "listener lets TLS"]


async def test_an_encrypted_or_mismatched_key_is_a_config_problem_not_a_prompt(
        relays: RelayFactory, tls_files: TLSFiles, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from relay.config import records as config_mod

    key = serialization.load_pem_private_key(tls_files.key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"printer")))
    other = tmp_path / "other.key"
    other.write_bytes(trustme.CA().issue_cert("localhost").private_key_pem.bytes())
    data = relays.config()
    data["listeners"] = [
        # OpenSSL's own prompt would wait on the terminal; the relay says what to do instead.
        {"name": "enc", "bind": "127.0.0.1:0", "tls": "starttls",
         "certificate": str(tls_files.cert), "private_key": str(encrypted)},
        {"name": "renewed", "bind": "127.0.0.1:0", "tls": "implicit",
         "certificate": str(tls_files.cert), "private_key": str(other)}]
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.parse(data, base_dir=tmp_path)
    problems = info.value.problems
    assert any(p.startswith("listeners[0]:") and "encrypted with a passphrase" in p
               and "openssl pkey" in p for p in problems), problems
    assert any(p.startswith("listeners[1]:") and "KEY_VALUES_MISMATCH" in p
               for p in problems), problems


async def test_doctor_fails_an_expired_listener_certificate(
        relays: RelayFactory, sandbox: Sandbox, tls_files: TLSFiles, tmp_path: Path) -> None:
    from relay.doctor.command import diagnose
    from relay.doctor.report import render_text

    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    expired = tls_files.ca.issue_cert("localhost", not_before=past - datetime.timedelta(days=90),
                                      not_after=past)
    cert, key = tmp_path / "expired.pem", tmp_path / "expired.key"
    expired.private_key_and_cert_chain_pem.write_to_path(str(cert))
    expired.private_key_pem.write_to_path(str(key))
    data = relays.config()
    data["listeners"][0].update(tls="starttls", certificate=str(cert), private_key=str(key))
    config_path = tmp_path / "relay.yaml"
    config_path.write_text(yaml.safe_dump(data))
    report = await diagnose(config_path)
    (check,) = report.listeners
    assert check.status.value == "fail" and "expired" in check.summary
    assert "systemctl reload" in check.fix
    assert report.exit_code == 1
    assert "Broken: listener local TLS" in render_text(report)


async def test_sighup_moves_a_listener_to_another_certificate_without_a_restart(
        relays: RelayFactory, tls_files: TLSFiles, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """From the self-signed certificate to the admin's own (and a new hostname for the
    self-signed one): applied to new connections, with no "needs a restart" warning."""
    data = relays.config()
    data["listeners"][0].update(tls="starttls", hostname=HOSTNAME)
    config_path = tmp_path / "relay.yaml"
    config_path.write_text(yaml.safe_dump(data))
    relay = await relays.start(data)
    relay.config_path = config_path
    address = relay.addresses["local"]
    path = tmp_path / "spool" / "tls" / "local.pem"
    assert await asyncio.to_thread(served_certificate, address, "starttls") == pem_der(path)

    data["listeners"][0]["hostname"] = "scan.printers.example"
    config_path.write_text(yaml.safe_dump(data))
    with caplog.at_level(logging.INFO, logger="m365relay"):
        relay.reload()
    renamed = await asyncio.to_thread(served_certificate, address, "starttls")
    assert renamed == pem_der(path)
    san = ssl._ssl._test_decode_cert(str(path))["subjectAltName"]  # type: ignore[attr-defined]
    assert ("DNS", "scan.printers.example") in san

    data["listeners"][0].update(certificate=str(tls_files.cert), private_key=str(tls_files.key))
    config_path.write_text(yaml.safe_dump(data))
    with caplog.at_level(logging.INFO, logger="m365relay"):
        relay.reload()
    assert await asyncio.to_thread(served_certificate, address, "starttls") == pem_der(
        tls_files.cert)
    assert "need a restart" not in caplog.text
