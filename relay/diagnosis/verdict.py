"""The two types every diagnosis ends in: a :class:`Verdict` (what happens to the message) and an
:class:`Explanation` (what happened and what to do). Their own module so that the exceptions of
:mod:`relay.diagnosis.errors` do not import the rule tables of :mod:`relay.diagnosis.explain`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Verdict(Enum):
    RETRY = "retry"  # transient: defer and retry with backoff
    # get a fresh token once, retry immediately; if it fails again treat as DEFER_ADMIN
    RETRY_NEW_TOKEN = "retry_new_token"  # noqa: S105 -- a verdict name, not a password
    # an admin must fix the setup; keep the mail queued and retry on the normal
    # schedule (like Postfix smtp_sasl_auth_soft_bounce): our own auth/setup
    # problem is never a reason to bounce someone's mail
    DEFER_ADMIN = "defer_admin"
    BOUNCE = "bounce"  # permanent for this message/recipient: DSN to the sender


@dataclass(frozen=True)
class Explanation:
    verdict: Verdict
    summary: str  # one line: what happened, plain words
    fix: str  # what to do next, ids filled in; "" if nothing to do
