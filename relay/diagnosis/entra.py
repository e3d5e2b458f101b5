"""The Entra ID token endpoint's errors (AADSTS numbers, OAuth error codes, HTTP status),
explained: :data:`TOKEN_RULES`. Token errors are never BOUNCE: the mail is fine, the setup
is not."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from relay.diagnosis.advice import (
    _ADMIN,
    _R,
    Context,
    Explanation,
    _Advice,
    _clean,
    _fields,
    _render,
)

__all__ = ["TOKEN_RULES", "explain_token_error"]

_HOW_TO_RENEW = (
    "Make a new one: Entra admin center > App registrations > {client_id} > Certificates & "
    "secrets > New client secret. Put its Value (not the Secret ID) into "
    "`apps.{app}.client_secret` and reload m365relay. Note the new expiry date."
)

_ENTRA_BUSY = _Advice(
    _R,
    "Entra ID could not issue a token for app {app} right now ({label}). m365relay will retry.",
    "",
)
_NO_ANSWER = _Advice(
    _R,
    "No usable answer from Entra ID for app {app}. m365relay will retry.",
    "If it lasts, check that this host can reach https://login.microsoftonline.com on port 443.",
)
_INVALID_SECRET = _Advice(
    _ADMIN,
    "Entra ID rejected the client secret of app {app} (client ID {client_id}, {label}).",
    "Client secrets expire, and the Secret ID is often pasted instead of the Value. "
    + _HOW_TO_RENEW,
)
_EXPIRED_SECRET = _Advice(
    _ADMIN,
    "The client secret of app {app} (client ID {client_id}, {label}) has expired.",
    _HOW_TO_RENEW,
)
_MISSING_SECRET = _Advice(
    _ADMIN,
    "m365relay sent no client secret or certificate for app {app} ({label}).",
    "Set `apps.{app}.client_secret` or `apps.{app}.certificate`. "
    + _HOW_TO_RENEW.replace("Make a new one", "To make a secret"),
)
_APP_NOT_FOUND = _Advice(
    _ADMIN,
    "Entra ID does not know app {client_id} in tenant {tenant} ({label}).",
    "1. Check `apps.{app}.client_id` is the Application (client) ID shown in Entra admin "
    "center > App registrations > Overview.\n"
    "2. Check `apps.{app}.tenant` is the Directory (tenant) ID of the tenant that holds the "
    "mailboxes.\n"
    "3. If the app is registered in another tenant, an admin of {tenant} must consent to it "
    "first: https://login.microsoftonline.com/{tenant}/adminconsent?client_id={client_id}",
)
_TENANT_NOT_FOUND = _Advice(
    _ADMIN,
    "Entra ID does not know tenant {tenant} ({label}).",
    "Set `apps.{app}.tenant` to the Directory (tenant) ID (a GUID, Entra admin center > "
    "Overview) or a verified domain such as contoso.onmicrosoft.com. For GCC High or 21Vianet "
    "also set `apps.{app}.authority` to that cloud's sign-in address.",
)
_BAD_REQUEST = _Advice(
    _ADMIN,
    "Entra ID rejected the token request of app {app} as invalid ({label}).",
    "Usually the tenant is wrong: check `apps.{app}.tenant` ({tenant}) is the Directory "
    "(tenant) ID or a verified domain of the tenant, and `apps.{app}.authority` if set. If "
    "both are right, report an m365relay bug with this log line.",
)
_TENANT_MISSING = _Advice(
    _ADMIN,
    "The token request for app {app} named no tenant ({label}).",
    "Set `apps.{app}.tenant` to the Directory (tenant) ID; app-only sign-in cannot use "
    "'common' or 'organizations'.",
)
_BAD_SCOPE = _Advice(
    _ADMIN,
    "Entra ID rejected the scope requested for app {app} ({label}).",
    "Set `apps.{app}.scope` to https://outlook.office365.com/.default (the default) or remove "
    "it; only GCC High and 21Vianet use their own host there, together with "
    "`apps.{app}.authority`.",
)
_CERT_REJECTED = _Advice(
    _ADMIN,
    "Entra ID rejected the certificate signature of app {app} (client ID {client_id}, {label}).",
    "Upload the certificate's public part (.cer or .pem) in Entra admin center > App "
    "registrations > {client_id} > Certificates & secrets > Certificates, and check that "
    "`apps.{app}.certificate` names that certificate and its private key, and that it has not "
    "expired.",
)
_NO_FEDERATION = _Advice(
    _ADMIN,
    "Entra ID found no federated credential of app {app} (client ID {client_id}) matching the "
    "token in `apps.{app}.client_assertion.file` ({label}).",
    "In Entra admin center > App registrations > {client_id} > Certificates & secrets > "
    "Federated credentials, the issuer, subject and audience must equal the token's `iss`, "
    "`sub` and `aud` (Kubernetes: the cluster's OIDC issuer URL, "
    "system:serviceaccount:<namespace>:<service account>, api://AzureADTokenExchange).",
)
_CLOCK_SKEW = _Advice(
    _ADMIN,
    "Entra ID says the signed assertion of app {app} is outside its valid time range "
    "({label}); this host's clock is probably wrong.",
    "Sync this host's clock: check `timedatectl status` and enable NTP.",
)
_NO_CONSENT = _Advice(
    _ADMIN,
    "App {client_id} has no admin consent for Exchange Online in tenant {tenant} ({label}).",
    "Entra admin center > App registrations > {client_id} > API permissions > Add a permission "
    "> APIs my organization uses > Office 365 Exchange Online > Application permissions > "
    "SMTP.SendAsApp, then 'Grant admin consent'.",
)
_CONDITIONAL_ACCESS = _Advice(
    _ADMIN,
    "A Conditional Access policy blocked the sign-in of app {client_id} ({label}).",
    "Entra admin center > Sign-in logs > Service principal sign-ins: open the failed sign-in "
    "of {client_id} to see the policy, then exclude the app from it or allow this host's "
    "public IP as a named location.",
)
_APP_DISABLED = _Advice(
    _ADMIN,
    "App {client_id} is disabled in tenant {tenant} ({label}).",
    "Entra admin center > Enterprise applications > {client_id} > Properties: set 'Enabled "
    "for users to sign-in?' to Yes.",
)
_NO_EXCHANGE = _Advice(
    _ADMIN,
    "Entra ID found no Exchange Online in tenant {tenant} for app {app} ({label}).",
    "Check `apps.{app}.tenant` is the tenant that holds the mailboxes and has Exchange Online "
    "licences, and that `apps.{app}.scope` fits the cloud (https://outlook.office365.com/"
    ".default for the global cloud).",
)
_INVALID_CLIENT = _Advice(
    _ADMIN,
    "Entra ID could not verify the credentials of app {app} (client ID {client_id}, {label}).",
    "Check `apps.{app}.client_id` and `apps.{app}.client_secret` (or "
    "`apps.{app}.certificate`) against Entra admin center > App registrations > {client_id}. "
    "Details: {lookup}",
)
_SIGN_IN_AGAIN = _Advice(
    _ADMIN,
    "The sign-in of mailbox {mailbox} (delegated app {app}) is no longer valid ({label}: "
    "{detail}): the refresh token was revoked (password change, admin action) or expired "
    "(about 90 days unused).",
    "Mail for {mailbox} waits in the queue. Sign in again with `m365relay login <account> "
    "--config <config file>` (the log line names the exact command); the running relay picks "
    "the new sign-in up without a restart and delivers what is queued. Details: {lookup}",
)
_TOKEN_REFUSED = _Advice(
    _ADMIN,
    "Entra ID refused a token for app {app} ({label}: {detail}).",
    "Look the error up at {lookup} and fix the app registration or the `apps.{app}` settings.",
)


def _is_transient_status(status: int | None) -> bool:
    return status is not None and (status == 429 or status >= 500)


@dataclass(frozen=True)
class _TokenRule:
    """Matches when every given field matches.

    aadsts: fullmatch on the AADSTS number in the description ("7000215").
    error: fullmatch on the OAuth `error` field, case-insensitive.
    status: predicate on the HTTP status (None when there was no HTTP answer).
    """

    advice: _Advice
    aadsts: str | None = None
    error: str | None = None
    status: Callable[[int | None], bool] | None = None

    def matches(self, number: str, error: str, status: int | None) -> bool:
        if self.status is not None and not self.status(status):
            return False
        if self.aadsts is not None and not re.fullmatch(self.aadsts, number):
            return False
        return self.error is None or re.fullmatch(self.error, error, re.IGNORECASE) is not None


# Token errors are never BOUNCE: the mail is fine, the setup is not.
TOKEN_RULES: tuple[_TokenRule, ...] = (
    _TokenRule(_ENTRA_BUSY, status=_is_transient_status),
    _TokenRule(_ENTRA_BUSY, error=r"temporarily_unavailable|server_error"),
    _TokenRule(_ENTRA_BUSY, aadsts=r"90033|50000"),  # "transient error", "issue with service"
    _TokenRule(_INVALID_SECRET, aadsts=r"7000215"),
    _TokenRule(_EXPIRED_SECRET, aadsts=r"7000222"),
    _TokenRule(_MISSING_SECRET, aadsts=r"7000218"),
    _TokenRule(_APP_NOT_FOUND, aadsts=r"700016"),
    _TokenRule(_TENANT_NOT_FOUND, aadsts=r"90002|900023"),
    _TokenRule(_BAD_REQUEST, aadsts=r"90023"),
    _TokenRule(_TENANT_MISSING, aadsts=r"50059"),
    _TokenRule(_BAD_SCOPE, aadsts=r"70011"),
    _TokenRule(_CERT_REJECTED, aadsts=r"700027"),
    _TokenRule(_NO_FEDERATION, aadsts=r"70021|700211|700212|700213"),
    _TokenRule(_CLOCK_SKEW, aadsts=r"700024"),
    _TokenRule(_NO_CONSENT, aadsts=r"65001|650057"),
    _TokenRule(_CONDITIONAL_ACCESS, aadsts=r"53003"),
    _TokenRule(_APP_DISABLED, aadsts=r"7000112"),
    _TokenRule(_NO_EXCHANGE, aadsts=r"500011"),
    _TokenRule(_SIGN_IN_AGAIN, aadsts=r"70000|50173|700082|700084|70043|50076"),
    _TokenRule(_BAD_SCOPE, error=r"invalid_scope"),
    _TokenRule(_SIGN_IN_AGAIN, error=r"invalid_grant|interaction_required"),
    _TokenRule(_INVALID_CLIENT, error=r"invalid_client|unauthorized_client"),
    _TokenRule(_NO_ANSWER, aadsts=r"", error=r"", status=lambda s: s is None),
    _TokenRule(_TOKEN_REFUSED),
)

_AADSTS = re.compile(r"AADSTS(\d+)", re.IGNORECASE)
_TRACE = re.compile(r"\s*(Trace ID|Correlation ID|Timestamp):.*", re.IGNORECASE | re.DOTALL)


def explain_token_error(
    error: str, description: str, *, status: int | None, ctx: Context
) -> Explanation:
    """Explain a failed token request (the Entra JSON `error`/`error_description`)."""
    found = _AADSTS.search(description) or _AADSTS.search(error)
    number = found.group(1) if found else ""
    error = error.strip()
    fields = _fields(ctx, "token")
    if number:
        fields["label"] = f"AADSTS{number}"
        fields["lookup"] = f"https://login.microsoftonline.com/error?code={number}"
    else:
        fields["label"] = _clean(error, 60) or (f"HTTP {status}" if status else "no error code")
        fields["lookup"] = "the Entra ID sign-in logs (Service principal sign-ins)"
    detail = _AADSTS.sub("", _TRACE.sub("", description), count=1).lstrip(" :")
    fields["detail"] = _clean(detail, 160).rstrip(". ") or "no description"
    for rule in TOKEN_RULES:
        if rule.matches(number, error, status):
            return _render(rule.advice, fields)
    return _render(_TOKEN_REFUSED, fields)  # unreachable: the last rule matches anything
