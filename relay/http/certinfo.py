"""When the relay's certificates expire, for ``/metrics`` and the certificate-expiry alert.

Three kinds: an app's certificate credential (Entra refuses tokens once it lapses, mail waits),
a listener's TLS certificate (devices refuse STARTTLS) and the HTTP endpoint's (Prometheus
stops scraping). Files are read again only when they change, so a renewed certificate shows
at the next scrape without a restart.
"""

from __future__ import annotations

import logging
from pathlib import Path

from relay.config.records import App, Config
from relay.tokens.credentials import CredentialError, certificate_pems

log = logging.getLogger("m365relay.certinfo")


def not_after(pem: bytes) -> float | None:
    """The first certificate's notAfter as unix time; None when the data holds none."""
    # cryptography costs ~10 MB to import: only a relay with certificates and /metrics needs it.
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()
    except ValueError:
        return None


class CertificateDates:
    """notAfter per (kind, name), cached by file stamp or by the credential record."""

    def __init__(self) -> None:
        self._files: dict[Path, tuple[tuple[int, int], float | None]] = {}
        self._apps: dict[str, tuple[App, float | None]] = {}

    def collect(self, config: Config, http_certificate: Path | None = None
                ) -> list[tuple[str, str, float]]:
        """(kind, name, not-after) for every configured certificate that can be read."""
        out = []
        for name, app in sorted(config.apps.items()):
            when = self._app(name, app)
            if when is not None:
                out.append(("app", name, when))
        for listener in config.listeners:
            if listener.certificate is not None:
                when = self._file(listener.certificate)
                if when is not None:
                    out.append(("listener", listener.name, when))
        if http_certificate is not None:
            when = self._file(http_certificate)
            if when is not None:
                out.append(("http", "http", when))
        return out

    def _app(self, name: str, app: App) -> float | None:
        if app.certificate is None:
            return None
        cached = self._apps.get(name)
        if cached is not None and cached[0] is app:  # a reload makes a new record
            return cached[1]
        try:
            _key, cert_pem, _ = certificate_pems(name, app.certificate)
            when = not_after(cert_pem.encode())
        except CredentialError as exc:
            log.warning("certificate of apps.%s unreadable for /metrics: %s", name, exc)
            when = None
        self._apps[name] = (app, when)
        return when

    def _file(self, path: Path) -> float | None:
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            cached = self._files.get(path)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            when = not_after(path.read_bytes())
        except OSError:
            return None
        self._files[path] = (stamp, when)
        return when
