"""The requests session msal and the Graph client use. Its own module so that importing
relay.tokens does not import requests (~100 ms and several MB before the listeners are up)."""

from __future__ import annotations

from typing import Any

import requests


class TimeoutSession(requests.Session):
    """requests with a default timeout, whose configured ``verify`` wins.

    Plain requests lets REQUESTS_CA_BUNDLE override a session's ``verify`` (requests#3829), so
    an app's ``ca_file`` would silently be ignored on machines that set it."""

    def __init__(self, verify: str | bool, timeout: float) -> None:
        super().__init__()
        self.verify = verify
        self._timeout = timeout

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any,
                                   cert: Any) -> Any:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self.verify is not True:
            settings["verify"] = self.verify
        return settings

    def request(self, method: str | bytes, url: str | bytes, *args: Any,
                **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout)
        return super().request(method, url, *args, **kwargs)
