"""Microsoft Graph errors (``{"error": {"code", "message"}}`` plus the HTTP status) explained
with the same verdicts and advice style as SMTP replies in :mod:`relay.diagnosis.smtp`; the
rendering helpers of :mod:`relay.diagnosis.advice` are shared, so placeholders and redaction
behave exactly as for SMTP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.diagnosis.advice import (
    _ADMIN,
    _BOUNCE,
    _NEW_TOKEN,
    _R,
    Context,
    Explanation,
    _Advice,
    _clean,
    _fields,
    _render,
)

_MAIL_SEND = (
    "In the Entra admin center > App registrations > {client_id} > API permissions, add "
    "Microsoft Graph > Application permissions > Mail.Send and click 'Grant admin consent'. "
    "If the tenant limits which mailboxes the app may use, include {mailbox}: RBAC for "
    "Applications `New-ManagementRoleAssignment -Role \"Application Mail.Send\" -App "
    "{client_id} -CustomResourceScope <scope containing {mailbox}>` (or the older "
    "`New-ApplicationAccessPolicy` group). Changes take up to an hour to apply."
)
_MAIL_READWRITE = (
    "In the Entra admin center > App registrations > {client_id} > API permissions, add "
    "Microsoft Graph > Application permissions > Mail.ReadWrite (beside Mail.Send) and click "
    "'Grant admin consent'; with RBAC for Applications instead: `New-ManagementRoleAssignment "
    "-Role \"Application Mail.ReadWrite\" -App {client_id} -CustomResourceScope <scope "
    "containing {mailbox}>`. Changes take up to an hour to apply; the message stays queued "
    "and smaller messages keep going through sendMail."
)
_DRAFT_DENIED = _Advice(
    _ADMIN,
    "Microsoft Graph denied app {app} creating a draft in {mailbox} ({status}): a message "
    "too large for one sendMail request (`apps.{app}.graph_request_limit`, about 3 MB of "
    "mail) is sent as a draft with upload sessions, and Graph allows drafts only with the "
    "Mail.ReadWrite application permission; Mail.Send alone covers sendMail only.",
    _MAIL_READWRITE,
)
_DENIED = _Advice(
    _ADMIN,
    "Microsoft Graph denied app {app} sending as {mailbox} ({status}): the token lacks the "
    "Mail.Send application permission, or an application access policy / RBAC for "
    "Applications scope excludes this mailbox. (Messages over about 3 MB also need "
    "Mail.ReadWrite.)",
    _MAIL_SEND,
)
_TOKEN_REJECTED = _Advice(
    _NEW_TOKEN,
    "Microsoft Graph rejected the access token of app {app} ({status}).",
    "The relay fetches a new token once. If it keeps failing, check that `apps.{app}.scope` is "
    "the Graph endpoint followed by /.default (https://graph.microsoft.com/.default; GCC High "
    "https://graph.microsoft.us/.default) and matches `apps.{app}.graph_endpoint`.",
)
_NO_MAILBOX = _Advice(
    _ADMIN,
    "Microsoft Graph cannot use mailbox {mailbox} ({status}): it does not exist, has no "
    "Exchange Online licence, is on-premises, or is inactive.",
    "Check the account's `mailbox` key against the Microsoft 365 admin center > Users; the "
    "user needs an Exchange Online licence and a cloud mailbox (on-premises mailboxes cannot "
    "send through Graph).",
)
_SEND_AS = _Advice(
    _BOUNCE,
    "Microsoft Graph refused to send as {sender}: the app sends through {mailbox}, which may "
    "not send as that address ({status}).",
    "Either let {mailbox} send as {sender} (`Add-RecipientPermission -Identity {sender} "
    "-Trustee {mailbox} -AccessRights SendAs`), or set `from: rewrite` on the m365relay "
    "account so the From becomes {mailbox}.",
)
_QUOTA = _Advice(
    _ADMIN,
    "Mailbox {mailbox} is over its storage quota ({status}); Graph saves sent mail to Sent "
    "Items, so it cannot send.",
    "Free space in {mailbox} (empty Sent Items / Deleted Items) or raise its quota in the "
    "Exchange admin center. Queued mail is retried.",
)
_BAD_BASE64 = _Advice(
    _ADMIN,
    "Microsoft Graph could not decode the message the relay sent ({status}).",
    "This is a relay bug: report it with this log line. The message stays queued.",
)
_BAD_MIME = _Advice(
    _BOUNCE,
    "Microsoft Graph refused the message content as invalid MIME ({status}).",
    "The sending device produced a message Exchange cannot parse; check its mail settings or "
    "firmware.",
)
_TOO_LARGE_REQUEST = _Advice(
    _ADMIN,
    "Microsoft Graph refused a request as too large ({status}).",
    "Lower `apps.{app}.graph_request_limit` (default 4MB) so such messages take the draft + "
    "upload session path.",
)
_TOO_BIG = _Advice(
    _BOUNCE,
    "The message is larger than mailbox {mailbox} may send ({status}).",
    "Send a smaller message, or raise the mailbox's MaxSendSize (`Set-Mailbox {mailbox} "
    "-MaxSendSize 150MB`).",
)
_BAD_RECIPIENT = _Advice(
    _BOUNCE,
    "Microsoft Graph refused a recipient of the message ({status}).",
    "Check the recipient addresses the device sent.",
)
_THROTTLED = _Advice(
    _R,
    "Microsoft Graph is throttling app {app} for mailbox {mailbox} ({status}); the relay waits "
    "at least the Retry-After Graph asked for.",
    "Nothing to do if it is rare. If it persists, spread mail over more mailboxes or lower "
    "`delivery.connections_per_mailbox` (Graph allows 4 concurrent requests per mailbox).",
)
_GRAPH_BUSY = _Advice(
    _R,
    "Microsoft Graph had a temporary problem ({status}); the message is retried.",
    "Nothing to do unless it persists; then check https://admin.microsoft.com > Service "
    "health.",
)
_CLIENT_ERROR = _Advice(
    _BOUNCE,
    "Microsoft Graph refused the message ({status}).",
    "Check the message the device sent; the full error is in this log line.",
)


@dataclass(frozen=True)
class _GraphRule:
    """Matches when every given field matches: ``status`` fullmatch on the HTTP status,
    ``code`` fullmatch (case-insensitive) on Graph's error code."""

    advice: _Advice
    status: str | None = None
    code: str | None = None
    request: str | None = None  # re.search on "METHOD /users/{mailbox}/path"

    def matches(self, status: int, code: str, request: str = "") -> bool:
        if self.status is not None and not re.fullmatch(self.status, str(status)):
            return False
        if self.request is not None and not re.search(self.request, request):
            return False
        return self.code is None or re.fullmatch(self.code, code, re.IGNORECASE) is not None


# The requests of the large-message path that need Mail.ReadWrite: creating and deleting the
# draft, its attachments and upload sessions (not messages/{id}/send, which is Mail.Send's).
DRAFT_REQUEST = r"/messages(/[^/]+(/attachments(/createUploadSession)?)?)?$"


GRAPH_RULES: tuple[_GraphRule, ...] = (
    _GraphRule(_THROTTLED, status="429"),
    _GraphRule(_THROTTLED, code=r"ApplicationThrottled|ErrorTooManyObjectsOpened"),
    _GraphRule(_GRAPH_BUSY, status=r"5\d\d|408|409|423"),
    _GraphRule(_SEND_AS, code=r"ErrorSendAsDenied"),
    _GraphRule(_TOKEN_REJECTED, status="401"),
    _GraphRule(_TOKEN_REJECTED, code=r"InvalidAuthenticationToken"),
    _GraphRule(_DRAFT_DENIED, status="403", request=DRAFT_REQUEST,
               code=r"ErrorAccessDenied|Authorization_RequestDenied|AccessDenied|"),
    _GraphRule(_DENIED, code=r"ErrorAccessDenied|Authorization_RequestDenied|AccessDenied"),
    _GraphRule(_NO_MAILBOX, code=r"ErrorInvalidUser|MailboxNotEnabledForRESTAPI|"
                                 r"MailboxNotSupportedForRESTAPI|ResourceNotFound|"
                                 r"ErrorNonExistentMailbox|ErrorMailboxMoveInProgress"),
    _GraphRule(_QUOTA, code=r"ErrorQuotaExceeded|ErrorQuotaExceededOnDelete"),
    _GraphRule(_BAD_BASE64, code=r"ErrorMimeContentInvalidBase64String"),
    _GraphRule(_BAD_MIME, code=r"ErrorMimeContentInvalid|ErrorMimeContentConversionFailed|"
                               r"UnableToDeserializePostBody"),
    _GraphRule(_TOO_BIG, code=r"ErrorMessageSizeExceeded"),
    _GraphRule(_TOO_LARGE_REQUEST, status="413"),
    _GraphRule(_BAD_RECIPIENT, code=r"ErrorInvalidRecipients|ErrorInvalidRecipient|"
                                     r"ErrorRecipientNotFound"),
    _GraphRule(_DENIED, status="403"),
    _GraphRule(_NO_MAILBOX, status="404"),
    _GraphRule(_CLIENT_ERROR, status=r"4\d\d"),
    _GraphRule(_GRAPH_BUSY),  # anything else (1xx/3xx surprises) is not the message's fault
)


def explain_graph(status: int, error_code: str, message: str, ctx: Context, *,
                  request: str = "") -> Explanation:
    """Explain a failed Graph request: HTTP ``status`` and the body's ``error.code``/
    ``error.message``; ``request`` ("POST /users/{mailbox}/messages") tells which permission
    a 403 is about."""
    fields = _fields(ctx, "graph")
    detail = _clean(message, 160).rstrip(". ")
    label = f"HTTP {status} {_clean(error_code, 60)}".rstrip()
    fields["status"] = f"{label}: {detail}" if detail else label
    for rule in GRAPH_RULES:
        if rule.matches(status, error_code, request):
            return _render(rule.advice, fields)
    return _render(_GRAPH_BUSY, fields)  # unreachable: the last rule matches anything
