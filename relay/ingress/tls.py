"""TLS for the device-facing listeners.

* ``min_tls_version``: TLS 1.2 by default. Multifunction printers with firmware from before
  ~2018 speak only TLS 1.0/1.1; OpenSSL 3 refuses those below security level 0 (they sign the
  handshake with MD5+SHA-1), so a listener that allows them also lowers its cipher string to
  ``@SECLEVEL=0``, and the start-up log says so by listener name.
* The certificate: the configured ``certificate``/``private_key`` files, or a self-signed one the
  relay makes for itself (:mod:`relay.ingress.selfsigned`), as Debian's Postfix ships a
  snakeoil pair.
* Reload: the asyncio server keeps the context it was created with for good, so that context only
  answers the ClientHello: its SNI callback (OpenSSL calls it with or without a server name)
  hands every new handshake the newest context. SIGHUP builds a new one from the files (a Let's
  Encrypt renewal) and swaps it in; if the files are unusable the old certificate stays.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from relay.config.certfiles import no_passphrase
from relay.config.files import content_digest
from relay.config.records import Listener

log = logging.getLogger("m365relay.listener")

_VERSIONS = {"1.0": ssl.TLSVersion.TLSv1, "1.1": ssl.TLSVersion.TLSv1_1,
             "1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
LEGACY_VERSIONS = frozenset({"1.0", "1.1"})
# OpenSSL 3 at its default level 1 (Debian's openssl.cnf: 2) refuses TLS 1.0/1.1 handshakes.
LEGACY_CIPHERS = "DEFAULT:@SECLEVEL=0"


def new_context(listener: Listener, certfile: Path, keyfile: Path | None) -> ssl.SSLContext:
    """A server context for ``listener`` with this certificate (raises OSError/SSLError)."""
    return server_context(listener.min_tls_version, certfile, keyfile)


def server_context(version: str, certfile: Path, keyfile: Path | None) -> ssl.SSLContext:
    """A TLS server context, TLS ``version`` or newer, serving this certificate: the
    listeners' and the HTTP endpoint's. Raises OSError/SSLError, or ValueError for a key
    with a passphrase (never OpenSSL's prompt on the terminal)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if version in LEGACY_VERSIONS:
        with warnings.catch_warnings():  # Python deprecates the constants, not the need
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = _VERSIONS[version]
        context.set_ciphers(LEGACY_CIPHERS)
    else:
        context.minimum_version = _VERSIONS[version]
    context.load_cert_chain(str(certfile), str(keyfile) if keyfile is not None else None,
                            password=no_passphrase)
    return context


def version_hint(listener: Listener) -> str:
    """For a handshake that failed for want of a common TLS version."""
    if listener.min_tls_version in LEGACY_VERSIONS:
        return ""
    return (" (the device may speak only TLS 1.0/1.1: allow it with "
            f"listeners[{listener.name}].min_tls_version)")


def legacy_warning(listener: Listener) -> str | None:
    """The start-up warning for a listener that accepts TLS older than 1.2, else None."""
    if listener.tls == "none" or listener.min_tls_version not in LEGACY_VERSIONS:
        return None
    return (f"listeners[{listener.name}].min_tls_version is {listener.min_tls_version}: this "
            f"listener accepts TLS {listener.min_tls_version} (OpenSSL security level 0), "
            "which is weak (no AEAD ciphers, SHA-1 handshakes). Keep it for devices that "
            "cannot do TLS 1.2, on a trusted network, and raise it once their firmware is "
            "updated")


def pem_fingerprint(pem: bytes) -> str:
    """SHA-256 of the first certificate in ``pem``, as ``openssl x509 -fingerprint -sha256``
    prints it (what an admin compares on the device's certificate prompt)."""
    text = pem.decode("ascii", errors="replace")
    begin = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        raise ValueError("no PEM certificate in the file")
    der = ssl.PEM_cert_to_DER_cert(text[begin:end + len("-----END CERTIFICATE-----")])
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


@dataclass(frozen=True)
class Served:
    """What a listener currently serves: for the log, /status and doctor."""

    context: ssl.SSLContext
    source: str  # "certificate /etc/...pem" or "self-signed certificate spool/tls/x.pem"
    fingerprint: str
    stamp: bytes  # the files' contents' digest, to tell a renewal from a no-op


def serve_current(base: ssl.SSLContext, current: Callable[[], ssl.SSLContext | None]) -> None:
    """Make a listening socket's ``base`` context hand each new connection ``current()``:
    its SNI callback runs in every handshake, so a certificate swapped in is served from the
    next connection on without closing the socket (a renewal, a SIGHUP)."""
    def pick(sslobj: ssl.SSLObject | ssl.SSLSocket, _name: str | None,
             context: ssl.SSLContext) -> None:
        chosen = current()
        if chosen is not None and chosen is not context:
            sslobj.context = chosen

    base.sni_callback = pick


class ServerTLS:
    """One listener's TLS: ``context`` for the server, certificates swapped under it."""

    def __init__(self, listener: Listener, state_dir: Path | None) -> None:
        self.listener = listener
        self.state_dir = state_dir  # spool directory: where a self-signed certificate lives
        self.served: Served | None = None
        self.context: ssl.SSLContext | None = None

    def load(self) -> Served:
        """Build the first context (blocking: may generate a key). Raises on unusable files."""
        self.served = self._build()
        # The first context doubles as the server's; later ones are swapped in by _pick.
        self.context = self.served.context
        serve_current(self.context, self._current)
        return self.served

    def reload(self, listener: Listener) -> bool:
        """Re-read the certificate files (SIGHUP); True if new connections get a new one.
        Unusable files are logged and the current certificate stays."""
        # The TLS versions stay as the server started (a listener change needs a restart).
        self.listener = replace(listener, min_tls_version=self.listener.min_tls_version)
        try:
            served = self._build()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.error("SIGHUP: listeners[%s]: cannot load the certificate (%s); still serving "
                      "the previous one. Check `listeners[%s].certificate` and `private_key`",
                      listener.name, exc, listener.name)
            return False
        if self.served is not None and served.stamp == self.served.stamp:
            return False
        self.served = served
        log.info("listener %s: now serving %s, SHA-256 fingerprint %s", listener.name,
                 served.source, served.fingerprint)
        return True

    def _current(self) -> ssl.SSLContext | None:
        return self.served.context if self.served is not None else None

    def _files(self) -> tuple[Path, Path | None]:
        listener = self.listener
        if listener.certificate is not None and listener.private_key is not None:
            return listener.certificate, listener.private_key
        from relay.ingress import selfsigned

        if self.state_dir is None:  # cluster mode: the config check requires certificate files
            raise ValueError("a TLS listener without `certificate` needs spool.directory to "
                             "keep a self-signed certificate in")
        return selfsigned.ensure(listener, self.state_dir), None

    def _build(self) -> Served:
        certfile, keyfile = self._files()
        context = new_context(self.listener, certfile, keyfile)
        # Read after the context loaded them: a file replaced in between shows as a change
        # on the next reload, never as a fingerprint of something not served.
        cert_pem = certfile.read_bytes()
        stamp = content_digest(p for p in (certfile, keyfile) if p is not None)
        kind = "certificate" if keyfile is not None else "self-signed certificate"
        return Served(context, f"{kind} {certfile}", pem_fingerprint(cert_pem), stamp)
