"""The app's credential: an RSA key and a self-signed certificate, written owner-only.

Microsoft recommends a certificate over a client secret for app-only sign-in; Entra needs only
the public certificate (uploaded by the setup script), and checks the client assertion's
``x5t`` / ``x5t#S256`` header against it (the sandbox's fake Entra checks the same way).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

# Entra accepts RSA keys of 2048 bits or more for certificate credentials [P: Microsoft identity
# platform "certificate credentials" page]; 2048 is what msal and the doctor check expect.
KEY_BITS = 2048
DEFAULT_DAYS = 730


@dataclass(frozen=True)
class CertificateFiles:
    key: Path
    cert: Path
    sha1_thumbprint: str  # hex, upper case: the "Thumbprint" column of Certificates & secrets
    x5t_s256: str  # base64url SHA-256, the header msal sends when it has the public certificate
    not_after: dt.datetime
    der_base64: str  # the certificate as the setup scripts upload it


def write_private(path: Path, data: bytes) -> None:
    """Create or replace ``path`` with mode 0600 before any byte is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode does not apply to an existing file
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_public(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o644)  # a certificate is public: the admin uploads it
        f.write(data)


def _self_signed(common_name: str, days: int, names: tuple[str, ...] = ()
                 ) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days)))
    if names:
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return key, builder.sign(key, hashes.SHA256())


def describe(cert_path: Path, key_path: Path) -> CertificateFiles:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    s256 = base64.urlsafe_b64encode(cert.fingerprint(hashes.SHA256())).rstrip(b"=")
    return CertificateFiles(
        key=key_path, cert=cert_path,
        # SHA-1 only as the identifier Entra displays, not for any security decision.
        sha1_thumbprint=cert.fingerprint(hashes.SHA1()).hex().upper(),  # noqa: S303
        x5t_s256=s256.decode("ascii"), not_after=cert.not_valid_after_utc,
        der_base64=base64.b64encode(der).decode("ascii"))


def _pems(key: rsa.RSAPrivateKey, cert: x509.Certificate) -> tuple[bytes, bytes]:
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def create_app_certificate(key_path: Path, cert_path: Path, *, app_name: str,
                           days: int = DEFAULT_DAYS) -> CertificateFiles:
    """A new key pair for the app registration; refuses to overwrite an existing key."""
    if key_path.exists() or cert_path.exists():
        raise FileExistsError(f"{key_path if key_path.exists() else cert_path} already exists; "
                              "init keeps existing credentials (delete it to make a new one)")
    key, cert = _self_signed(f"m365relay {app_name}", days)
    key_pem, cert_pem = _pems(key, cert)
    write_private(key_path, key_pem)
    _write_public(cert_path, cert_pem)
    return describe(cert_path, key_path)


def create_listener_certificate(key_path: Path, cert_path: Path, names: tuple[str, ...],
                                *, days: int = DEFAULT_DAYS) -> None:
    """A self-signed certificate for the relay's own STARTTLS / implicit TLS listener.

    Printers rarely check it; replace it with one from your CA when devices do."""
    key, cert = _self_signed(names[0], days, names)
    key_pem, cert_pem = _pems(key, cert)
    write_private(key_path, key_pem)
    _write_public(cert_path, cert_pem)
