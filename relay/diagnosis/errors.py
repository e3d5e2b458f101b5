"""The exception hierarchy that decides what happens to a message.

Delivery code raises these; the delivery manager only looks at the class:
:class:`DeferError` keeps the message queued and retries with backoff, :class:`BounceError`
sends a DSN and moves the message to ``failed/``. Each carries the upstream code (if any) and
an explanation for the operator, built from the tables in :mod:`relay.diagnosis.explain`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.diagnosis.verdict import Explanation, Verdict

# Parsed once, where the upstream's own reply comes in (RFC 3463 at the start of an SMTP reply
# text; Entra's "AADSTS7000215: ..." descriptions); nothing downstream parses text again.
_ENHANCED = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})(?![.\d])")
_AADSTS = re.compile(r"\b(AADSTS\d+)\b")


def enhanced_status(reply_text: str) -> str:
    """The RFC 3463 status at the start of an upstream reply's text ("5.1.10"), or ""."""
    m = _ENHANCED.match(reply_text)
    return ".".join(m.groups()) if m else ""


def aadsts_code(description: str) -> str:
    """The AADSTS error number in an Entra ID error description, or ""."""
    m = _AADSTS.search(description)
    return m.group(1) if m else ""


@dataclass(frozen=True)
class Outcome:
    """What happened to one recipient, as fields: DSNs, events, metrics and logs read these.

    ``code`` is the SMTP reply code (or Graph's HTTP status), ``status`` the RFC 3463 enhanced
    status, ``reply`` the upstream's own words ("550 5.1.10 RESOLVER...", "" when the relay
    decided by itself, e.g. an expired message), ``text`` the line for people (reply, meaning,
    fix)."""

    text: str
    code: int | None = None
    status: str = ""
    reply: str = ""
    aadsts: str = ""
    graph_code: str = ""
    permanent: bool = False

    @property
    def label(self) -> str:
        """The metrics label: the reply code, or "none" (network, TLS, token, local)."""
        return str(self.code) if self.code else "none"

    @property
    def dsn_status(self) -> str:
        """The Status: field of a DSN: the enhanced status, else one from the reply's class."""
        if self.status:
            return self.status
        if self.code and str(self.code)[0] in "45":
            return f"{str(self.code)[0]}.0.0"
        return "5.0.0" if self.permanent else "4.0.0"


def accepted_reply(reply: str) -> Outcome:
    """The outcome of an accepted recipient from the upstream's final reply line ("250 2.0.0
    OK <id>", Graph's "202 Accepted ...")."""
    code = int(reply[:3]) if reply[:3].isdigit() else None
    return Outcome(reply, code, enhanced_status(reply[4:]) if code else "", reply)


def log_extra(outcome: Outcome) -> dict[str, str]:
    """An outcome's fields for a log record (JSON logs show them as keys)."""
    fields = {"code": outcome.label, "enhanced_status": outcome.status,
              "aadsts": outcome.aadsts, "graph_code": outcome.graph_code}
    return {k: v for k, v in fields.items() if v}


class RelayError(Exception):
    """Base for every error m365relay raises on purpose."""


class DeliveryError(RelayError):
    """Delivering a message failed; the subclass says whether to retry."""

    def __init__(self, message: str, *, code: int | None = None, status: str = "",
                 reply: str = "", aadsts: str = "", graph_code: str = "",
                 explanation: Explanation | None = None, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.code = code  # SMTP reply code, or Graph's HTTP status
        self.status = status  # RFC 3463 enhanced status from the reply, "" if none
        self.reply = reply  # the upstream's reply as it said it ("550 5.1.10 ..."), or ""
        self.aadsts = aadsts  # Entra ID's AADSTS number of a token error, or ""
        self.graph_code = graph_code  # Graph's error code ("ErrorAccessDenied"), or ""
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

    def outcome(self) -> Outcome:
        return Outcome(self.describe(), self.code, self.status, self.reply, self.aadsts,
                       self.graph_code, permanent=isinstance(self, BounceError))


class DeferError(DeliveryError):
    """Transient: keep the message and retry later (4xx, network, token endpoint, setup)."""


class AuthRejected(DeferError):
    """Exchange rejected our XOAUTH2 login. A fresh token may help once; then an admin must."""


class TokenError(DeferError):
    """No access token could be obtained from Entra ID. Mail waits; it never bounces for this."""


class BounceError(DeliveryError):
    """Permanent for this message: send a DSN to the sender and keep a copy in ``failed/``."""


def error_for(message: str, explanation: Explanation, *, code: int | None = None,
              reply: str = "", stage: str = "") -> DeliveryError:
    """Build the exception class the explanation's verdict calls for. ``reply`` is the
    upstream's reply text after the code, where the enhanced status is read from."""
    kind: type[DeliveryError] = DeferError
    if explanation.verdict is Verdict.BOUNCE:
        kind = BounceError
    elif stage == "auth" or explanation.verdict is Verdict.RETRY_NEW_TOKEN:
        kind = AuthRejected
    return kind(message, code=code, status=enhanced_status(reply),
                reply=f"{code} {reply}".strip() if code else reply, explanation=explanation)
