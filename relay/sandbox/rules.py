"""Exchange Online's per-mailbox limits, as the sandbox enforces them, and their replies;
Microsoft Graph's request limits and the permission each of its endpoints wants.

A fake that is more lenient than Microsoft hides relay bugs until a real tenant finds them, so
every rule a fake can check is checked. relay/sandbox/RULES.md lists each rule with its source,
where the fake enforces it and the test (tests/test_sandbox.py) that fails when it lets it
pass; the values here are Microsoft's defaults, and tests scale them (a 0.5 s window, a 2 KB
MaxSendSize) to reach them quickly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from relay.sandbox.apps import GRAPH_DRAFT_ROLE, GRAPH_READ_ROLES, GRAPH_SEND_ROLE

# What smtp.office365.com advertises in EHLO (MS365 §4).
ADVERTISED_SIZE = 157_286_400
# MaxSendSize's default, as Get-Mailbox shows it: "35 MB (36,700,160 bytes)".
DEFAULT_MAX_SEND_SIZE = 35 * 1024 * 1024
THROTTLED = "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"
TOO_MANY_CONNECTIONS = "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
TOO_BIG = ("552 5.3.4 Message size exceeds fixed maximum message size. "
           "STOREDRV.Submission.Exception:MessageSubmissionExceededException."
           "MapiExceptionMaxSubmissionExceeded")
DAILY_QUOTA = ("554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; "
               "Failed to process message due to a permanent exception with message "
               "Cannot submit message.")


@dataclass(frozen=True)
class MailboxLimits:
    """Exchange Online's per-mailbox limits; tests scale them (a 0.5 s window, a 2 KB
    MaxSendSize) to reach them quickly. 0 switches a limit off, for tests of other parts
    that say so."""

    connections: int = 3
    messages: int = 30
    window: float = 60.0  # seconds the `messages` count over
    recipients_per_day: int = 10_000
    day: float = 86_400.0  # seconds the daily recipient count rolls over
    recipients_per_message: int = 500
    max_send_size: int = DEFAULT_MAX_SEND_SIZE
    graph_concurrency: int = 4  # concurrent Graph requests per app and mailbox


MICROSOFT = MailboxLimits()


class MailboxMeter:
    """Sliding-window counts per mailbox (casefolded) for the rate and daily limits; the
    caller passes the clock so the loop's monotonic time drives it."""

    def __init__(self) -> None:
        self._messages: dict[str, deque[float]] = {}
        self._recipients: dict[str, deque[tuple[float, int]]] = {}

    def clear(self) -> None:
        self._messages.clear()
        self._recipients.clear()

    def over_rate(self, mailbox: str, limits: MailboxLimits, now: float) -> bool:
        """True if ``mailbox`` already had ``limits.messages`` accepted in the window."""
        if limits.messages <= 0:
            return False
        times = self._messages.setdefault(mailbox.casefold(), deque())
        while times and times[0] <= now - limits.window:
            times.popleft()
        return len(times) >= limits.messages

    def over_day(self, mailbox: str, recipients: int, limits: MailboxLimits,
                 now: float) -> bool:
        """True if ``recipients`` more would pass the rolling day's recipient limit."""
        if limits.recipients_per_day <= 0:
            return False
        sent = self._recipients.setdefault(mailbox.casefold(), deque())
        while sent and sent[0][0] <= now - limits.day:
            sent.popleft()
        return sum(n for _, n in sent) + recipients > limits.recipients_per_day

    def accepted(self, mailbox: str, recipients: int, now: float) -> None:
        self._messages.setdefault(mailbox.casefold(), deque()).append(now)
        self._recipients.setdefault(mailbox.casefold(), deque()).append((now, recipients))


# --- Microsoft Graph (MS365 §6) ---

REQUEST_LIMIT = 4 * 1024 * 1024  # Graph's single-request limit for sendMail (§6)
ATTACHMENT_LIMIT = 3 * 1024 * 1024  # larger attachments need an upload session
UPLOAD_MAX = 150 * 1024 * 1024  # an upload session's largest attachment
UPLOAD_RANGE_LIMIT = 4 * 1024 * 1024  # bytes one PUT to an upload session may carry


def graph_permission(method: str, parts: list[str]) -> frozenset[str]:
    """The application permissions any one of which lets a token make this request (Graph's
    permission tables: user-sendmail, message-send, user-post-messages, message-post-
    attachments, attachment-createuploadsession, message-delete, mailfolder-get)."""
    if (method, parts) == ("POST", ["sendMail"]) or (
            method == "POST" and len(parts) == 3 and parts[0] == "messages"
            and parts[2] == "send"):
        return frozenset({GRAPH_SEND_ROLE})
    if method == "GET":
        return GRAPH_READ_ROLES
    return frozenset({GRAPH_DRAFT_ROLE})  # drafts, their attachments and upload sessions
