"""Delegated sign-in for the fake Entra: device codes (RFC 8628) and rotating refresh tokens.

Kept apart from entra.py so the client-credentials fake stays as it was; FakeEntra owns one
DelegatedGrants and routes the device-code endpoint and the two extra grant types here. All
state is guarded by one lock: msal polls from worker threads while tests approve from the loop.
"""

from __future__ import annotations

import secrets
import string
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DELEGATED_AUDIENCE = "https://outlook.office.com"
DELEGATED_SCOPE = f"{DELEGATED_AUDIENCE}/SMTP.Send"
SEND_SCOPE = "SMTP.Send"


@dataclass
class _DeviceCode:
    client_id: str
    tenant: str
    user_code: str
    expires_at: float
    user: str = ""  # set when approved
    redeemed: bool = False


@dataclass
class _RefreshToken:
    client_id: str
    tenant: str
    user: str


# (status, error, AADSTS number, description) or the signed-in user on success.
Outcome = tuple[int, str, int, str] | str


class DelegatedGrants:
    """Device codes waiting for a person, and the refresh tokens handed out after sign-in."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.device_code_lifetime = 900
        self.device_code_interval = 1
        self.refresh_requests = 0
        # Seconds a refresh takes to answer (in the HTTP server's thread), as a slow Entra
        # does: widens the window in which two relays holding one refresh token both use it.
        self.refresh_delay = 0.0
        self.refused_refreshes = 0  # refresh tokens presented after they were retired
        self._clock = clock
        self._lock = threading.Lock()
        self._codes: dict[str, _DeviceCode] = {}  # device_code -> state
        self._refresh: dict[str, _RefreshToken] = {}

    # -- test-facing API ----------------------------------------------------------------

    def pending_user_codes(self) -> list[str]:
        with self._lock:
            return [c.user_code for c in self._codes.values() if not c.user and not c.redeemed]

    def approve(self, user_code: str, user: str) -> None:
        """What the person does at the verification URL: sign in as ``user`` and consent."""
        with self._lock:
            code = next((c for c in self._codes.values() if c.user_code == user_code), None)
            # As Entra: a code works once, and not after it expired.
            if code is None or code.user or code.redeemed or self._clock() >= code.expires_at:
                raise KeyError(f"no pending device code with user code {user_code!r}")
            code.user = user

    def expire(self, user_code: str) -> None:
        with self._lock:
            for code in self._codes.values():
                if code.user_code == user_code:
                    code.expires_at = 0.0

    def revoke(self, user: str) -> int:
        """Invalidate every refresh token of ``user`` (password change, admin revocation)."""
        with self._lock:
            gone = [rt for rt, v in self._refresh.items() if v.user.casefold() == user.casefold()]
            for rt in gone:
                del self._refresh[rt]
            return len(gone)

    def refresh_tokens_of(self, user: str) -> int:
        with self._lock:
            return sum(1 for v in self._refresh.values() if v.user.casefold() == user.casefold())

    # -- endpoint logic (server threads) --------------------------------------------------

    def new_device_code(self, tenant: str, client_id: str, base: str) -> dict[str, Any]:
        device_code = secrets.token_urlsafe(32)
        user_code = "".join(secrets.choice(string.ascii_uppercase) for _ in range(9))
        with self._lock:
            self._codes[device_code] = _DeviceCode(
                client_id, tenant, user_code, self._clock() + self.device_code_lifetime)
        uri = f"{base}/devicelogin"
        return {
            "user_code": user_code,
            "device_code": device_code,
            "verification_uri": uri,
            "expires_in": self.device_code_lifetime,
            "interval": self.device_code_interval,
            "message": f"To sign in, use a web browser to open the page {uri} and enter the "
                       f"code {user_code} to authenticate.",
        }

    def redeem_device_code(self, tenant: str, form: Mapping[str, str]) -> Outcome:
        with self._lock:
            code = self._codes.get(form.get("device_code", ""))
            if code is None or code.redeemed or code.client_id != form.get("client_id"):
                return 400, "invalid_grant", 70000, "The provided device code is not valid."
            if self._clock() >= code.expires_at:
                return 400, "expired_token", 70020, "The provided value for the input " \
                    "parameter 'device_code' is not valid. This device code has expired."
            if not code.user:
                return 400, "authorization_pending", 70016, "OAuth 2.0 device flow error. " \
                    "Authorization is pending. Continue polling."
            code.redeemed = True
            return code.user

    def redeem_refresh_token(self, tenant: str, form: Mapping[str, str]) -> Outcome:
        if self.refresh_delay > 0:
            time.sleep(self.refresh_delay)
        with self._lock:
            self.refresh_requests += 1
            token = form.get("refresh_token", "")
            grant = self._refresh.get(token)
            if grant is None:
                self.refused_refreshes += 1
                return 400, "invalid_grant", 50173, "The provided grant has expired due to it " \
                    "being revoked, a fresh auth token is needed. The user might have changed " \
                    "or reset their password."
            if grant.client_id != form.get("client_id"):
                return 400, "invalid_grant", 70000, "The refresh token was issued to a " \
                    "different client."
            # Rotation: the old refresh token stops working once a new one is issued, so a
            # relay that forgets to persist the new one finds out in tests, not in production.
            del self._refresh[token]
            return grant.user

    def issue_refresh_token(self, tenant: str, client_id: str, user: str) -> str:
        token = "0.SANDBOX-RT." + secrets.token_urlsafe(48)
        with self._lock:
            self._refresh[token] = _RefreshToken(client_id, tenant, user)
        return token
