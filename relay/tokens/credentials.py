"""What an app proves itself with, in the form msal takes as ``client_credential``.

Three kinds: a client secret; a certificate (PEM key + certificate, or a PFX file, which is
opened here with cryptography so msal, doctor and error messages all see the same PEM); and a
federated client assertion read from a file that someone else keeps fresh (Kubernetes workload
identity's projected token, a CI system's OIDC token), with no secret on this host at all.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from relay.config.files import stat_stamp
from relay.config.records import App, CertificateCredential


class CredentialError(ValueError):
    """The configured credential cannot be used; the message names the key and the fix."""


def certificate_pems(app_name: str, cred: CertificateCredential) -> tuple[str, str, str | None]:
    """(private key PEM, certificate PEM, passphrase of the key PEM or None)."""
    if cred.pfx is None:
        assert cred.private_key is not None and cred.certificate is not None  # noqa: S101
        passphrase = cred.passphrase.value if cred.passphrase is not None else None
        return cred.private_key.value, cred.certificate.value, passphrase
    # cryptography costs ~10 MB and ~80 ms to import: only PFX files need it here (msal signs
    # with its own import when a certificate app asks for a token).
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    pfx_key = f"`apps.{app_name}.certificate.pfx`"
    pass_key = f"`apps.{app_name}.certificate.passphrase`"
    password = cred.passphrase.value.encode() if cred.passphrase is not None else None
    try:
        data = cred.pfx.read_bytes()
    except OSError as exc:
        raise CredentialError(f"cannot read {pfx_key} ({cred.pfx}): {exc.strerror}; check the "
                              "path and that the relay's user may read it") from None
    try:
        key, cert, _chain = pkcs12.load_key_and_certificates(data, password)
    except ValueError:
        if password is None:
            raise CredentialError(f"{pfx_key} ({cred.pfx}) cannot be opened without a "
                                  f"passphrase; set {pass_key} (inline, {{env: VAR}} or "
                                  "{file: PATH})") from None
        raise CredentialError(f"{pfx_key} ({cred.pfx}) cannot be opened: it is not a PKCS#12 "
                              f"file or {pass_key} is not its passphrase") from None
    if key is None or cert is None:
        raise CredentialError(f"{pfx_key} ({cred.pfx}) must hold both the private key and the "
                              "certificate; export it again with the private key included "
                              "(`openssl pkcs12 -export -inkey KEY -in CERT -out app.pfx`)")
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode("ascii")
    return key_pem, cert.public_bytes(serialization.Encoding.PEM).decode("ascii"), None


class AssertionFile:
    """msal's ``client_assertion`` callable: the file's current content.

    The issuer rewrites the file before the old token expires (the kubelet does so at 80% of its
    lifetime), so it is read again whenever its mtime or size changes; unchanged, the cached
    copy saves a read per token request."""

    def __init__(self, app_name: str, path: Path) -> None:
        self.app_name = app_name
        self.path = path
        self.reads = 0
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._value = ""

    def __call__(self) -> str:
        key = f"`apps.{self.app_name}.client_assertion.file`"
        with self._lock:
            try:
                stamp = stat_stamp(self.path)
                if stamp != self._stamp:
                    value = self.path.read_text(encoding="utf-8").strip()
                    self.reads += 1
                    if not value:
                        raise CredentialError(f"{key} ({self.path}) is empty; the token issuer "
                                              "(kubelet, CI runner) has not written it yet")
                    self._stamp, self._value = stamp, value
            except OSError as exc:
                raise CredentialError(
                    f"cannot read {key} ({self.path}): {exc.strerror}. For Kubernetes workload "
                    "identity, label the pod azure.workload.identity/use: \"true\" and check the "
                    "projected token volume; otherwise check the path and permissions") from None
            return self._value


def build_credential(app_name: str, app: App) -> Any:
    """The ``client_credential`` argument for msal.ConfidentialClientApplication."""
    if app.certificate is not None:
        key_pem, cert_pem, passphrase = certificate_pems(app_name, app.certificate)
        credential: dict[str, Any] = {"private_key": key_pem, "public_certificate": cert_pem}
        if passphrase is not None:
            credential["passphrase"] = passphrase
        return credential
    if app.client_assertion is not None:
        return {"client_assertion": AssertionFile(app_name, app.client_assertion.file)}
    assert app.client_secret is not None  # noqa: S101 - config guarantees one credential
    return app.client_secret.value
