"""A self-signed certificate for a TLS listener with no ``certificate``/``private_key``.

As Debian's Postfix ships a "snakeoil" pair (``make-ssl-cert``: RSA 2048, ten years, the host's
FQDN), so that STARTTLS works from the first start and devices at least get encryption (most
printers do not verify the server's certificate; those that do can pin the fingerprint the
start-up log and ``m365relay doctor`` show).

It is kept with the relay's state, ``<spool>/tls/<listener>.pem`` (key and certificate in one
file, mode 0600), reused on later starts, and made again only when it is missing, unreadable,
expired (or within 30 days of it) or no longer names what the listener is reached by.

RSA rather than ECDSA: firmware old enough to need TLS 1.0 often has no ECDSA. cryptography
(~10 MB) is imported only here, by listeners that need it.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from relay.config.records import Listener

log = logging.getLogger("m365relay.listener")

LIFETIME = datetime.timedelta(days=3650)  # make-ssl-cert's default
RENEW_BEFORE = datetime.timedelta(days=30)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Names:
    dns: tuple[str, ...]
    ips: tuple[str, ...]

    def describe(self) -> str:
        return ", ".join((*self.dns, *self.ips))


def names_for(listener: Listener) -> Names:
    """The listener's ``hostname`` (default: the machine's FQDN), the host name, and the
    listen address when it is one (devices are often given an IP address)."""
    dns: list[str] = []
    for given in (listener.hostname or socket.getfqdn(), socket.gethostname()):
        name = given.strip().rstrip(".").lower()
        if name and name not in dns and not _is_ip(name):
            dns.append(name)
    ips: list[str] = []
    host = listener.host
    if _is_ip(host) and not ipaddress.ip_address(host).is_unspecified:
        ips.append(str(ipaddress.ip_address(host)))
    return Names(tuple(dns or ["localhost"]), tuple(ips))


def path_for(listener: Listener, state_dir: Path) -> Path:
    return state_dir / "tls" / f"{_UNSAFE.sub('_', listener.name)}.pem"


def ensure(listener: Listener, state_dir: Path) -> Path:
    """The listener's self-signed certificate file, made or remade when needed (blocking)."""
    path = path_for(listener, state_dir)
    names = names_for(listener)
    why = stale(path, names)
    if why is None:
        return path
    _write(path, _generate(names))
    log.warning("listener %s: %s, so a self-signed certificate for %s was made: %s. Devices "
                "that check certificates need its fingerprint, or set `listeners[%s]."
                "certificate` and `private_key`", listener.name, why, names.describe(), path,
                listener.name)
    return path


def stale(path: Path, names: Names) -> str | None:
    """Why the file at ``path`` must be made again, or None if it serves as it is."""
    from cryptography import x509

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "no certificate is configured"
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    try:
        cert = x509.load_pem_x509_certificate(data)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return f"{path} holds no usable certificate"
    if b"PRIVATE KEY-----" not in data:
        return f"{path} holds no private key"
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc - RENEW_BEFORE < now:
        return f"the self-signed certificate expires {cert.not_valid_after_utc:%Y-%m-%d}"
    dns = tuple(san.get_values_for_type(x509.DNSName))
    ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    if set(dns) != set(names.dns) or set(ips) != set(names.ips):
        return (f"the self-signed certificate names {', '.join((*dns, *ips))}, not "
                f"{names.describe()}")
    return None


def _generate(names: Names) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names.dns[0])])
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names.dns]
    alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in names.ips]
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # devices' clocks drift
            .not_valid_after(now + LIFETIME)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem + cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes) -> None:
    """Owner-only, complete or not at all (temporary file, fsync, rename)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a leftover file
        f.write(data)
        f.flush()
        os.fsync(fd)
    tmp.replace(path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
