"""The exception hierarchy that decides what happens to a message.

Delivery code raises these; the delivery manager only looks at the class:
:class:`DeferError` keeps the message queued and retries with backoff, :class:`BounceError`
sends a DSN and moves the message to ``failed/``. Each carries the upstream code (if any) and
an explanation for the operator, built from the tables in :mod:`relay.diagnosis.explain`.
"""

from __future__ import annotations

from relay.diagnosis.verdict import Explanation, Verdict


class RelayError(Exception):
    """Base for every error m365relay raises on purpose."""


class DeliveryError(RelayError):
    """Delivering a message failed; the subclass says whether to retry."""

    def __init__(self, message: str, *, code: int | None = None,
                 explanation: Explanation | None = None, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.explanation = explanation
        # The upstream's own wait (Graph 429 Retry-After): a retry must not come sooner.
        self.retry_after = retry_after

    def describe(self) -> str:
        """One line for logs and the spool state: reply, meaning and fix."""
        text = str(self)
        if self.explanation is not None:
            text += f" -- {self.explanation.summary}"
            if self.explanation.fix:
                text += f" Fix: {self.explanation.fix}"
        return text


class DeferError(DeliveryError):
    """Transient: keep the message and retry later (4xx, network, token endpoint, setup)."""


class AuthRejected(DeferError):
    """Exchange rejected our XOAUTH2 login. A fresh token may help once; then an admin must."""


class TokenError(DeferError):
    """No access token could be obtained from Entra ID. Mail waits; it never bounces for this."""


class BounceError(DeliveryError):
    """Permanent for this message: send a DSN to the sender and keep a copy in ``failed/``."""


def error_for(message: str, explanation: Explanation, *, code: int | None = None,
              stage: str = "") -> DeliveryError:
    """Build the exception class the explanation's verdict calls for."""
    if explanation.verdict is Verdict.BOUNCE:
        return BounceError(message, code=code, explanation=explanation)
    if stage == "auth" or explanation.verdict is Verdict.RETRY_NEW_TOKEN:
        return AuthRejected(message, code=code, explanation=explanation)
    return DeferError(message, code=code, explanation=explanation)
