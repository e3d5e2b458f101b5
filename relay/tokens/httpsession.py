"""The requests session msal and the Graph client use. Its own module so that importing
relay.tokens does not import requests (~100 ms and several MB before the listeners are up)."""

from __future__ import annotations

import ssl
from typing import Any

import requests
from requests.adapters import HTTPAdapter


class _ContextAdapter(HTTPAdapter):
    """HTTPS through one SSL context that already holds every trust anchor (``ca_file`` beside
    the system's), instead of a bundle file requests would need on disk."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        super().cert_verify(conn, url, verify, cert)  # type: ignore[no-untyped-call]
        # Verification stays required; only requests' bundle path is not added on top.
        conn.ca_certs = conn.ca_cert_dir = None


class TimeoutSession(requests.Session):
    """requests with a default timeout, whose configured ``verify`` wins.

    Plain requests lets REQUESTS_CA_BUNDLE override a session's ``verify`` (requests#3829), so
    an app's ``ca_file`` would silently be ignored on machines that set it. ``verify`` may be
    an SSL context (relay.tokens.trust): then it alone decides."""

    def __init__(self, verify: str | bool | ssl.SSLContext, timeout: float) -> None:
        super().__init__()
        if isinstance(verify, ssl.SSLContext):
            self.mount("https://", _ContextAdapter(verify))
            verify = True
            self._pinned = True
        else:
            self._pinned = verify is not True
        self.verify = verify
        self._timeout = timeout

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any,
                                   cert: Any) -> Any:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self._pinned:
            settings["verify"] = self.verify
        return settings

    def request(self, method: str | bytes, url: str | bytes, *args: Any,
                **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout)
        return super().request(method, url, *args, **kwargs)
