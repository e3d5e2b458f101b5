"""The credential link: is the app's secret or certificate usable, before Entra ever sees it?

Certificates are what Microsoft recommends, so they get the thorough look: the key opens (with
its passphrase), it is RSA (Entra signs app assertions with RSA only), it belongs to the
certificate, and the certificate is within its validity. The thumbprint is shown because it is
what the Entra admin center lists for uploaded certificates.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from relay.config.records import App, CertificateCredential
from relay.doctor.claims import NotAJwt, decode_claims
from relay.doctor.report import Check, Status
from relay.tokens.credentials import AssertionFile, CredentialError, certificate_pems

RENEW_WARNING = timedelta(days=30)
_MAKE_CERT = ("`openssl req -x509 -newkey rsa:2048 -sha256 -days 730 -nodes -subj "
              "'/CN=m365relay' -keyout m365relay.key -out m365relay.crt`")


@dataclass(frozen=True)
class CertificateFacts:
    """What later links quote when Entra rejects the certificate (AADSTS700027)."""

    sha1: str  # upper-case hex, as the Entra admin center shows it
    sha256: str
    source: str  # where the certificate came from ("file:/etc/...")


def _uploaded(app: App) -> str:
    return (f"Entra admin center > App registrations > {app.client_id} > Certificates & "
            "secrets > Certificates")


def check_credential(app_name: str, app: App, now: datetime | None = None
                     ) -> tuple[Check, CertificateFacts | None]:
    now = now or datetime.now(UTC)
    if app.certificate is not None:
        return _check_certificate(app_name, app, app.certificate, now)
    if app.client_assertion is not None:
        return _check_assertion(app_name, app), None
    secret = app.client_secret
    assert secret is not None  # noqa: S101 - config guarantees exactly one credential
    detail = f"client secret ({secret.source})"
    if _is_guid(secret.value):
        return Check("credential", Status.WARN, detail=detail,
                     summary=f"`apps.{app_name}.client_secret` is a GUID: that is what the "
                             "Secret ID looks like, while a secret's Value is a random string "
                             "of about 40 characters.",
                     fix=(f"Entra admin center > App registrations > {app.client_id} > "
                          "Certificates & secrets > New client secret, and copy its Value "
                          "(shown only once) into `apps." + app_name + ".client_secret`. "
                          "Microsoft recommends a certificate instead (`apps." + app_name
                          + ".certificate`).")), None
    return Check("credential", Status.OK, detail=detail), None


def _check_assertion(app_name: str, app: App) -> Check:
    assert app.client_assertion is not None  # noqa: S101 - caller checked
    path = app.client_assertion.file
    try:
        value = AssertionFile(app_name, path)()
    except CredentialError as exc:
        return Check("credential", Status.FAIL, detail=f"federated assertion from {path}",
                     summary=f"{exc}.",
                     fix=f"Point `apps.{app_name}.client_assertion.file` at the token file the "
                         "issuer keeps fresh (Kubernetes workload identity: the path in "
                         "AZURE_FEDERATED_TOKEN_FILE).")
    detail = f"federated assertion from {path}"
    try:
        claims = decode_claims(value)
    except NotAJwt as exc:
        return Check("credential", Status.FAIL, detail=detail,
                     summary=f"{path} does not hold a JWT ({exc}).",
                     fix="The file must hold the OIDC token itself (header.payload.signature).")
    detail += (f": issuer {claims.get('iss', '?')}, subject {claims.get('sub', '?')}, "
               f"audience {claims.get('aud', '?')}")
    exp = claims.get("exp")
    if isinstance(exp, int | float) and exp <= datetime.now(UTC).timestamp():
        return Check("credential", Status.FAIL, detail=detail,
                     summary=f"The token in {path} expired at "
                             f"{datetime.fromtimestamp(exp, UTC):%Y-%m-%d %H:%M:%S} UTC.",
                     fix="The issuer stopped refreshing it: check the projected token volume "
                         "(Kubernetes) or the job that writes the file.")
    return Check("credential", Status.OK, detail=detail)


def _is_guid(value: str) -> bool:
    try:
        uuid.UUID(value.strip())
    except ValueError:
        return False
    return True


def _spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _fail(summary: str, fix: str, detail: str = "") -> tuple[Check, None]:
    return Check("credential", Status.FAIL, detail=detail, summary=summary, fix=fix), None


def _check_certificate(app_name: str, app: App, cred: CertificateCredential, now: datetime
                       ) -> tuple[Check, CertificateFacts | None]:
    key_key = f"`apps.{app_name}.certificate.private_key`"
    cert_key = f"`apps.{app_name}.certificate.certificate`"
    pass_key = f"`apps.{app_name}.certificate.passphrase`"
    try:
        key_pem, cert_pem, passphrase = certificate_pems(app_name, cred)
    except CredentialError as exc:
        return _fail(f"{exc}.", f"Check `apps.{app_name}.certificate.pfx` and {pass_key}; or "
                                "convert to PEM: `openssl pkcs12 -in app.pfx -nocerts -nodes "
                                "-out m365relay.key` and `openssl pkcs12 -in app.pfx -clcerts "
                                "-nokeys -out m365relay.crt`.")
    key_src = cred.private_key.source if cred.private_key else f"pfx:{cred.pfx}"
    cert_src = cred.certificate.source if cred.certificate else f"pfx:{cred.pfx}"
    if cred.pfx is not None:
        key_key = cert_key = f"`apps.{app_name}.certificate.pfx`"
    password = passphrase.encode() if passphrase is not None else None
    key = _load_key(key_pem, password, key_key=key_key, cert_key=cert_key, pass_key=pass_key,
                    key_src=key_src)
    if isinstance(key, tuple):
        return key
    try:
        cert = x509.load_pem_x509_certificates(cert_pem.encode())[0]
    except ValueError:
        return _fail(f"{cert_key} ({cert_src}) holds no PEM certificate.",
                     f"Point {cert_key} at the certificate you uploaded to the app "
                     "(-----BEGIN CERTIFICATE-----), not at the key or a .pfx file.")
    if not isinstance(key, rsa.RSAPrivateKey):
        return _fail(f"The key in {key_key} is {type(key).__name__.removesuffix('PrivateKey')}"
                     "; Entra ID accepts only RSA keys for app sign-in with a certificate.",
                     f"Make an RSA certificate: {_MAKE_CERT}; upload m365relay.crt in "
                     f"{_uploaded(app)}, and point {key_key} and {cert_key} at the two files.")
    sha1 = cert.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303 - Entra shows SHA-1
    sha256 = cert.fingerprint(hashes.SHA256()).hex().upper()
    facts = CertificateFacts(sha1, sha256, cert_src)
    subject = cert.subject.rfc4514_string() or "(empty subject)"
    if _spki(cert.public_key()) != _spki(key.public_key()):
        return _fail(f"The private key in {key_key} ({key_src}) does not belong "
                     f"to the certificate in {cert_key} ({subject}, thumbprint {sha1}).",
                     "Use the key the certificate was made with. To compare, both commands "
                     "must print the same: `openssl x509 -noout -pubkey -in CERT | openssl "
                     "sha256` and `openssl pkey -pubout -in KEY | openssl sha256`.")
    detail = (f"certificate {subject}, RSA {key.key_size}-bit key matches, thumbprint {sha1}, "
              f"valid until {cert.not_valid_after_utc:%Y-%m-%d}")
    renew = (f"Make a new certificate ({_MAKE_CERT}), upload its public part in "
             f"{_uploaded(app)}, point {key_key} and {cert_key} at the new files, then reload "
             "m365relay and delete the old certificate in Entra.")
    return _lifetime(cert, now, detail=detail, renew=renew, cert_key=cert_key), facts


def _load_key(key_pem: str, password: bytes | None, *, key_key: str, cert_key: str,
              pass_key: str, key_src: str) -> PrivateKeyTypes | tuple[Check, None]:
    """The private key, or the failed check saying why it does not load."""
    try:
        return serialization.load_pem_private_key(key_pem.encode(), password)
    except TypeError as exc:
        if password is None:  # "Password was not given but private key is encrypted"
            return _fail(f"The private key in {key_key} ({key_src}) is "
                         "encrypted, but no passphrase is configured.",
                         f"Set {pass_key} (a secret: inline, {{env: VAR}} or {{file: PATH}}).")
        return _fail(f"The private key in {key_key} is not encrypted, but {pass_key} is set "
                     f"({exc}).", f"Remove {pass_key}.")
    except (ValueError, UnsupportedAlgorithm):
        if password is not None and "ENCRYPTED" in key_pem:
            return _fail(f"{pass_key} does not open the private key in {key_key}.",
                         f"Put the key's passphrase into {pass_key}.")
        if "PRIVATE KEY" not in key_pem and "CERTIFICATE" in key_pem:
            return _fail(f"{key_key} ({key_src}) holds a certificate, not a "
                         "private key.", f"Point {key_key} at the PEM private key and "
                         f"{cert_key} at the certificate.")
        return _fail(f"{key_key} ({key_src}) is not a PEM private key.",
                     "m365relay reads PEM (-----BEGIN PRIVATE KEY-----). From a .pfx file: "
                     "`openssl pkcs12 -in app.pfx -nocerts -nodes -out m365relay.key` and "
                     "`openssl pkcs12 -in app.pfx -clcerts -nokeys -out m365relay.crt`.")


def _lifetime(cert: x509.Certificate, now: datetime, *, detail: str, renew: str,
              cert_key: str) -> Check:
    """Expired, not valid yet, due for renewal soon, or fine."""
    until = cert.not_valid_after_utc
    if until <= now:
        return Check("credential", Status.FAIL, detail=detail, fix=renew,
                     summary=f"The certificate in {cert_key} expired on {until:%Y-%m-%d %H:%M} "
                             "UTC; Entra ID refuses expired certificates.")
    if cert.not_valid_before_utc > now:
        return Check("credential", Status.FAIL, detail=detail,
                     summary="The certificate is not valid until "
                             f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC.",
                     fix="If it was just made, check this host's clock (`timedatectl status`); "
                         "otherwise use a certificate that is valid now.")
    if until - now < RENEW_WARNING:
        return Check("credential", Status.WARN, detail=detail,
                     summary=f"The certificate expires in {(until - now).days} day(s); "
                             "then every token request fails.", fix=renew)
    return Check("credential", Status.OK, detail=detail)
