"""Turn upstream failures into a retry decision and advice an admin can act on.

Three kinds of failure reach this module: SMTP replies from Exchange Online,
error bodies from the Entra ID token endpoint, and network/TLS exceptions.
Each goes through its own declarative table of rules; the first rule that
matches decides the :class:`Verdict` and supplies a one-line summary and a
fix, both templates filled with the ids from :class:`Context`.  Adding a code
means adding one row.

Rules never quote tokens or secrets: only the server's reply text (cut short,
with diagnostic blobs and anything token-shaped removed) and config *names*.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from relay.diagnosis.verdict import Explanation, Verdict

__all__ = [
    "Context",
    "Explanation",
    "Verdict",
    "explain_connection_error",
    "explain_smtp",
    "explain_token_error",
]


@dataclass(frozen=True)
class Context:
    mailbox: str = ""  # the mailbox we authenticated as (XOAUTH2 user=)
    sender: str = ""  # envelope/From sender
    app: str = ""  # m365relay config name of the app (config key path apps.<app>)
    client_id: str = ""
    tenant: str = ""
    smtp_host: str = ""
    authority_host: str = ""  # token endpoint host; login.microsoftonline.com when unset


# ---------------------------------------------------------------------------
# Shared rendering
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Advice:
    """What to tell the admin. Templates use ``{name}`` fields, see _fields()."""

    verdict: Verdict
    summary: str
    fix: str = ""


_R = Verdict.RETRY
_NEW_TOKEN = Verdict.RETRY_NEW_TOKEN
_ADMIN = Verdict.DEFER_ADMIN
_BOUNCE = Verdict.BOUNCE

# What to print when a Context field is empty: a placeholder the admin
# recognises and replaces, never an empty gap in a command line.
_PLACEHOLDERS = {
    "mailbox": "<mailbox>",
    "sender": "<sender address>",
    "app": "<app>",
    "client_id": "<client id>",
    "tenant": "<tenant id>",
    "smtp_host": "<smtp host>",
}

_WHEN = {
    "connect": "while connecting",
    "ehlo": "at EHLO",
    "starttls": "at STARTTLS",
    "auth": "while signing in",
    "mail": "at MAIL FROM",
    "rcpt": "at RCPT TO",
    "data": "while sending the message",
    "token": "while requesting a token",
}

# JWTs (access tokens) and long base64 runs (an XOAUTH2 blob echoed back) are
# cut from anything we quote, in case a server or wrapper ever repeats them.
_SECRETISH = re.compile(r"eyJ[\w-]{8,}\.[\w-]+\.?[\w-]*|[A-Za-z0-9+/=_-]{64,}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def _clean(value: str, limit: int = 200) -> str:
    """One line, no control characters, nothing token-shaped, at most `limit` chars."""
    text = _SECRETISH.sub("<redacted>", value)
    text = " ".join(_CONTROL.sub(" ", text).split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def _fields(ctx: Context, stage: str) -> dict[str, str]:
    fields = {
        name: _clean(getattr(ctx, name), 200) or placeholder
        for name, placeholder in _PLACEHOLDERS.items()
    }
    fields["stage"] = _clean(stage, 40)
    fields["when"] = _WHEN.get(stage, f"at stage '{fields['stage']}'")
    return fields


def _render(advice: _Advice, fields: dict[str, str]) -> Explanation:
    return Explanation(
        verdict=advice.verdict,
        summary=_clean(advice.summary.format_map(fields), 400),
        fix=advice.fix.format_map(fields),
    )


# ---------------------------------------------------------------------------
# SMTP replies
# ---------------------------------------------------------------------------

_SIGN_IN_CHECKS = (
    "m365relay fetches a fresh token and tries once more. If that fails too, check in order:\n"
    "1. Exchange knows the app. In Exchange Online PowerShell run "
    "`New-ServicePrincipal -AppId {client_id} -ObjectId <enterprise app object id>`; take the "
    "Object ID from Entra admin center > Enterprise applications > {client_id}, not from App "
    "registrations (a wrong Object ID causes exactly this error).\n"
    "2. The app may use {mailbox}: "
    "`Add-MailboxPermission -Identity {mailbox} -User <service principal id> "
    "-AccessRights FullAccess` (`Get-ServicePrincipal` shows the id), or with RBAC for "
    "Applications `New-ManagementRoleAssignment -Role 'Application SMTP.SendAsApp' "
    "-App {client_id} -CustomResourceScope <scope that includes {mailbox}>`. {mailbox} must be "
    "the mailbox's SMTP address.\n"
    "3. The app has the permission: Entra admin center > App registrations > {client_id} > "
    "API permissions > Office 365 Exchange Online > Application permissions > SMTP.SendAsApp, "
    "then 'Grant admin consent' (skip this step with RBAC for Applications).\n"
    "4. SMTP AUTH is on for the mailbox: "
    "`Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false`."
)

_TOKEN_REJECTED = _Advice(
    _NEW_TOKEN,
    "Exchange Online rejected the access token of app {app} for mailbox {mailbox} ({status}).",
    _SIGN_IN_CHECKS,
)
_AUTH_FAILED = _Advice(
    _NEW_TOKEN,
    "{smtp_host} rejected the sign-in as {mailbox} ({reply}).",
    _SIGN_IN_CHECKS,
)

_MAILBOX_SWITCH = "`Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false`"

_SMTP_AUTH_OFF_TENANT = _Advice(
    _ADMIN,
    "SMTP AUTH is turned off for the whole tenant, so Exchange Online refuses sign-ins as "
    "{mailbox} ({status}).",
    "Turn SMTP AUTH on for this mailbox only (the mailbox setting wins over the tenant's): "
    + _MAILBOX_SWITCH
    + ". Or turn it on for the tenant: `Set-TransportConfig -SmtpClientAuthenticationDisabled "
    "$false`. Entra ID security defaults also block SMTP AUTH; if they are on, see the "
    "security-defaults advice (aka.ms/smtp_auth_disabled).",
)
_SMTP_AUTH_OFF_MAILBOX = _Advice(
    _ADMIN,
    "SMTP AUTH is turned off for mailbox {mailbox} ({status}).",
    "In Exchange Online PowerShell run "
    + _MAILBOX_SWITCH
    + " (or `$null` to follow the tenant setting, if that allows SMTP AUTH).",
)
_SECURITY_DEFAULTS = _Advice(
    _ADMIN,
    "Entra ID security defaults block SMTP AUTH, so Exchange Online refuses sign-ins as "
    "{mailbox} ({status}).",
    "Security defaults allow no exception for SMTP AUTH. Turn them off (Entra admin center > "
    "Overview > Properties > Manage security defaults > Disabled) and protect sign-ins with "
    "Conditional Access instead. Then make sure SMTP AUTH is on for the mailbox: "
    + _MAILBOX_SWITCH
    + ".",
)
_AUTH_POLICY_CHECKS = (
    "Check in order: the tenant switch (`Get-TransportConfig | Format-List "
    "SmtpClientAuthenticationDisabled` must be False, or the mailbox overrides it with "
    + _MAILBOX_SWITCH
    + "); Entra ID security defaults (they block SMTP AUTH); Conditional Access policies for "
    "workload identities that cover app {client_id} (Entra admin center > Sign-in logs > "
    "Service principal sign-ins shows which policy failed)."
)
_SMTP_AUTH_POLICY = _Advice(
    _ADMIN,
    "A tenant policy blocked the SMTP sign-in as {mailbox} ({status}).",
    _AUTH_POLICY_CHECKS,
)
_SMTP_AUTH_BLOCKED = _Advice(
    _ADMIN,
    "Exchange Online refused SMTP AUTH as {mailbox} because of a tenant or mailbox setting "
    "({reply}).",
    _AUTH_POLICY_CHECKS,
)
_BASIC_AUTH = _Advice(
    _ADMIN,
    "Exchange Online says Basic authentication was used ({status}), but m365relay only signs "
    "in with OAuth (XOAUTH2).",
    "This should not happen. Check that `apps.{app}.smtp_host` ({smtp_host}) is "
    "smtp.office365.com and that no firewall or proxy rewrites SMTP on the way. If both are "
    "fine, report an m365relay bug with this log line.",
)
_HVE_BAD_USER = _Advice(
    _ADMIN,
    "The High Volume Email endpoint refused {mailbox} as the sign-in address ({status}).",
    "For HVE, m365relay must sign in as the HVE account: set the account's `mailbox` to the "
    "HVE account's address (Exchange admin center > Mail flow > High volume email). For a "
    "normal mailbox set `apps.{app}.smtp_host` to smtp.office365.com instead of {smtp_host}.",
)
_NO_XOAUTH2 = _Advice(
    _ADMIN,
    "{smtp_host} does not offer XOAUTH2 sign-in ({reply}).",
    "Set `apps.{app}.smtp_host` to smtp.office365.com and `apps.{app}.smtp_port` to 587. The "
    "MX host (…mail.protection.outlook.com) takes mail from the internet and offers no "
    "sign-in.",
)
_NOT_ENCRYPTED = _Advice(
    _ADMIN,
    "{smtp_host} requires encryption, but the session was not encrypted ({reply}).",
    "m365relay always uses STARTTLS towards Exchange Online. Check `apps.{app}.smtp_host` "
    "({smtp_host}) and that nothing on the way strips STARTTLS. If both are fine, report an "
    "m365relay bug.",
)
_NOT_AUTHENTICATED = _Advice(
    _ADMIN,
    "Exchange Online refused the message because the session was not signed in ({status}). "
    "m365relay always signs in first, so this is a bug.",
    "Report an m365relay bug with this log line and the m365relay version.",
)
_SEND_AS = _Advice(
    _BOUNCE,
    "Exchange Online refused to send as {sender}: the relay signed in as {mailbox}, which may "
    "not send as that address ({status}).",
    "Pick one:\n"
    "1. (recommended) Sign in as the sender itself: give the app FullAccess on the sender's "
    "mailbox, `Add-MailboxPermission -Identity {sender} -User <service principal id> "
    "-AccessRights FullAccess`, list {sender} (or `*@its-domain`) in the account's "
    "`accounts[].allowed_from` and keep `accounts[].send_as: authenticate` (the default); or "
    "give the device an m365relay account whose `mailbox` is {sender}. Sent Items then "
    "stays right.\n"
    "2. Keep signing in as {mailbox} and let it send as {sender}: "
    "`Add-RecipientPermission -Identity {sender} -Trustee {mailbox} -AccessRights SendAs`, "
    "with `accounts[].send_as: sendas` and {sender} in `accounts[].allowed_from`.\n"
    "3. Set `from: rewrite` on the m365relay account that sends this mail and leave {sender} "
    "out of `accounts[].allowed_from`, so the From becomes {mailbox}.",
)
_TOO_BIG = _Advice(
    _BOUNCE,
    "The message is larger than mailbox {mailbox} may send ({status}).",
    "Send a smaller message (fewer or smaller attachments), or raise the limit: "
    "`Set-Mailbox -Identity {mailbox} -MaxSendSize 150MB` (default 35 MB, at most 150 MB).",
)
_TOO_BIG_FOR_RECIPIENT = _Advice(
    _BOUNCE,
    "The message is larger than the recipient's mailbox accepts ({status}).",
    "Send a smaller message. For a recipient in your organisation an admin can raise the limit: "
    "`Set-Mailbox -Identity <recipient> -MaxReceiveSize 150MB`.",
)
_QUOTA = _Advice(
    _R,
    "Mailbox {mailbox} hit Exchange Online's sending limit ({status}): 30 messages a minute "
    "or 10,000 recipients in a rolling 24 hours. Mail stays queued and goes out after the "
    "window has passed.",
    "Nothing to do if this is rare. If it repeats, send less through {mailbox} or spread the "
    "devices over more mailboxes; the limits count per mailbox.",
)
_TOO_MANY_CONNECTIONS = _Advice(
    _R,
    "Too many simultaneous SMTP connections for {mailbox}: Exchange Online allows 3 per "
    "mailbox ({status}). m365relay will retry.",
    "Nothing to do if this is rare. If it repeats, keep `delivery.connections_per_mailbox` at "
    "3 or lower and stop other programs and devices from using {mailbox} at the same time.",
)
_TOO_MANY_RECIPIENTS = _Advice(
    _BOUNCE,
    "The message has more recipients than {mailbox} may address at once ({status}); the "
    "default limit is 500.",
    "Send to fewer recipients per message, or raise the limit (at most 1000): "
    "`Set-Mailbox -Identity {mailbox} -RecipientLimits 1000`.",
)
_BAD_OUTBOUND_SENDER = _Advice(
    _ADMIN,
    "Microsoft 365 has blocked {mailbox} from sending, usually after it sent spam or was "
    "compromised ({status}).",
    "Secure the account (check sign-ins, inbox rules and forwarding), then release it in the "
    "Microsoft Defender portal > Email & collaboration > Review > Restricted entities "
    "(https://security.microsoft.com/restrictedentities).",
)
_TEMP_RESTRICTED = _Advice(
    _R,
    "Exchange Online is temporarily restricting mail from this tenant or IP ({status}), "
    "usually after a jump in volume or suspicious activity. m365relay will retry with backoff.",
    "Nothing to do if it clears within a few hours. If it lasts, check for compromised "
    "accounts and open a Microsoft support request.",
)
_TENANT_THRESHOLD = _Advice(
    _ADMIN,
    "Microsoft 365 has blocked outgoing mail for the whole tenant because it sent too much "
    "suspicious mail ({status}).",
    "Find and secure compromised accounts, then open a support request (Microsoft 365 admin "
    "center > Support) to lift the block.",
)
_IP_NOT_ACCEPTED = _Advice(
    _ADMIN,
    "Exchange Online does not accept mail from this tenant for now, usually because the tenant "
    "is new or sent suspicious mail ({status}).",
    "Check for compromised accounts, then open a support request (Microsoft 365 admin center "
    "> Support) to lift the block.",
)
_UNREGISTERED_DOMAIN = _Advice(
    _ADMIN,
    "Microsoft 365 blocked this tenant from sending from domains it has not registered, and "
    "the sender {sender} is not in an accepted domain ({status}).",
    "Add and verify the sender's domain in Microsoft 365 admin center > Settings > Domains, or "
    "set `from: rewrite` on the m365relay account so the From becomes {mailbox}. If the block "
    "stays after that, open a Microsoft support request.",
)
_TENANT_ATTRIBUTION = _Advice(
    _ADMIN,
    "Exchange Online could not match this connection to a tenant or connector ({status}).",
    "Set `apps.{app}.smtp_host` to smtp.office365.com (port 587, SMTP AUTH), not the tenant's "
    "MX host; it is now {smtp_host}.",
)
_HVE_EXTERNAL = _Advice(
    _BOUNCE,
    "High Volume Email accounts can only send to recipients inside the organisation ({status}).",
    "Send mail for outside recipients through a normal mailbox on smtp.office365.com.",
)
_UNKNOWN_RECIPIENT = _Advice(
    _BOUNCE,
    "The recipient address does not exist ({status}).",
    "Check the recipient address configured on the device and send again.",
)
_BAD_RECIPIENT = _Advice(
    _BOUNCE,
    "Exchange Online refused the recipient address ({reply}).",
    "Check the recipient address configured on the device and send again.",
)
_RECIPIENT_REFUSED = _Advice(
    _BOUNCE,
    "The recipient's mail system refused this address: relay access denied ({status}).",
    "Check the recipient address. If the recipient is in your own tenant, check that the "
    "address exists and its domain is an accepted domain.",
)
_NO_ROUTE = _Advice(
    _BOUNCE,
    "Exchange Online could not route the message to the recipient's domain ({reply}).",
    "Check the recipient's domain name on the device.",
)
_TLS_TOO_OLD = _Advice(
    _ADMIN,
    "Exchange Online refused the connection because TLS older than 1.2 was used ({status}).",
    "m365relay needs TLS 1.2 or newer to {smtp_host}. Check the system's OpenSSL policy "
    "(MinProtocol in /etc/ssl/openssl.cnf or the distribution's crypto policy) and any "
    "TLS-intercepting proxy on the way. Do not switch to smtp-legacy.office365.com.",
)
_LOGON_FAILED = _Advice(
    _R,
    "Exchange Online could not open mailbox {mailbox} for app {app} ({status}). m365relay will "
    "retry.",
    "If it keeps happening, check the app may use the mailbox: `Add-MailboxPermission "
    "-Identity {mailbox} -User <service principal id> -AccessRights FullAccess`, and that "
    "{mailbox} exists and has an Exchange Online licence. New permissions can take a while "
    "to apply.",
)
_SERVICE_BUSY = _Advice(
    _R,
    "{smtp_host} is not taking connections right now ({reply}). m365relay will retry.",
    "",
)
_SESSION_REFUSED = _Advice(
    _ADMIN,
    "{smtp_host} refused the session {when} ({reply}).",
    "This is a setup problem, not a problem with the message. Exchange Online is "
    "smtp.office365.com on port 587 (`apps.{app}.smtp_host` is now {smtp_host}, see also "
    "`apps.{app}.smtp_port`). If those are right, the reply above names what the server "
    "refused; report it to the m365relay maintainers if it stays unclear.",
)
_TEMPORARY = _Advice(
    _R,
    "{smtp_host} reported a temporary problem {when} ({reply}). m365relay will retry.",
    "",
)
_PERMANENT = _Advice(
    _BOUNCE,
    "{smtp_host} permanently refused the message {when} ({reply}).",
    "The sender gets a bounce with this reason; read it for what to change.",
)
_UNEXPECTED = _Advice(
    _R,
    "{smtp_host} sent an unexpected reply {when} ({reply}). m365relay will retry.",
    "If this repeats, report an m365relay bug with this log line.",
)

_SESSION_STAGES = frozenset({"connect", "ehlo", "starttls", "auth"})


@dataclass(frozen=True)
class _SmtpRule:
    """Matches when every given field matches (patterns are case-insensitive).

    reply: fullmatch on the three-digit code. The default allows only 5xx, so a
        rule can never turn a transient 4xx into a bounce by accident.
    enhanced: fullmatch on the reply's enhanced status code ("5.7.3").
    text: search anywhere in the reply text (all lines joined).
    stages: the SMTP stages the rule applies to.
    """

    advice: _Advice
    reply: str = r"5\d\d"
    enhanced: str | None = None
    text: str | None = None
    stages: frozenset[str] | None = None

    def matches(self, reply: _Reply) -> bool:
        if not re.fullmatch(self.reply, str(reply.code)):
            return False
        if self.stages is not None and reply.stage not in self.stages:
            return False
        if self.enhanced is not None and not re.fullmatch(self.enhanced, reply.enhanced):
            return False
        return self.text is None or re.search(self.text, reply.text, re.IGNORECASE) is not None


_AUTH = frozenset({"auth"})
_ANY = r"\d\d\d"
_4XX = r"4\d\d"

# First match wins: text-specific rows come before the enhanced-code rows that
# share a code with them (e.g. 554 5.2.0 is SendAs or size depending on text),
# and the catch-alls come last.
SMTP_RULES: tuple[_SmtpRule, ...] = (
    # SMTP AUTH switched off. Matched on text anywhere because Exchange nests
    # the reason in other replies ("530 5.7.57 ... Error: 535 5.7.139 ...").
    _SmtpRule(_SECURITY_DEFAULTS, text=r"security defaults"),
    _SmtpRule(_SMTP_AUTH_OFF_MAILBOX, text=r"SmtpClientAuthentication is disabled for the Mailbox"),
    _SmtpRule(_SMTP_AUTH_OFF_TENANT, text=r"SmtpClientAuthentication is disabled"),
    _SmtpRule(_SMTP_AUTH_POLICY, text=r"did not meet the criteria|configuration doesn.t allow"),
    _SmtpRule(_SMTP_AUTH_BLOCKED, text=r"\b5\.7\.139\b"),
    # Token and sign-in problems.
    _SmtpRule(_TOKEN_REJECTED, enhanced=r"5\.7\.3", stages=_AUTH),
    _SmtpRule(_BASIC_AUTH, enhanced=r"5\.7\.30"),
    _SmtpRule(_BASIC_AUTH, text=r"basic authentication is not supported"),
    _SmtpRule(_HVE_BAD_USER, enhanced=r"5\.5\.124"),
    _SmtpRule(_HVE_BAD_USER, text=r"invalid XOAUTH2 auth data"),
    _SmtpRule(_NO_XOAUTH2, enhanced=r"5\.7\.4", stages=_AUTH),
    _SmtpRule(_NO_XOAUTH2, text=r"unrecognized authentication type", stages=_AUTH),
    _SmtpRule(_NO_XOAUTH2, reply=r"504", stages=_AUTH),
    _SmtpRule(_NOT_ENCRYPTED, text=r"STARTTLS|encryption required"),
    _SmtpRule(_NOT_AUTHENTICATED, enhanced=r"5\.7\.57"),
    _SmtpRule(_NOT_AUTHENTICATED, text=r"not authenticated"),
    # From is not the signed-in mailbox.
    _SmtpRule(_SEND_AS, enhanced=r"5\.2\.252"),
    _SmtpRule(_SEND_AS, text=r"SendAsDenied|not allowed to send as"),
    _SmtpRule(_SEND_AS, enhanced=r"5\.7\.60"),
    _SmtpRule(_SEND_AS, text=r"permissions? to send as"),
    # Size.
    _SmtpRule(_TOO_BIG_FOR_RECIPIENT, text=r"RecipSizeLimit"),
    _SmtpRule(_TOO_BIG, enhanced=r"5\.3\.4"),
    _SmtpRule(_TOO_BIG, text=r"MessageSubmissionExceeded|MaxSubmissionExceeded"),
    _SmtpRule(_TOO_BIG, text=r"SendSizeLimit"),
    _SmtpRule(_TOO_BIG, enhanced=r"5\.2\.3"),
    _SmtpRule(_TOO_BIG, text=r"message size exceeds|message (is )?too (large|big)"),
    # X.2.2 is a rate limit on the sending mailbox (30/min, 10,000 recipients a
    # day), so it clears by itself after the rolling window: RETRY even when
    # Exchange sends it as 5xx. Bouncing would lose mail over a burst.
    _SmtpRule(_QUOTA, reply=r"[45]\d\d", enhanced=r"[45]\.2\.2"),
    _SmtpRule(_QUOTA, reply=r"[45]\d\d", text=r"SubmissionQuotaExceeded|submission quota"),
    # The sender's account or the tenant is blocked.
    _SmtpRule(_BAD_OUTBOUND_SENDER, enhanced=r"5\.1\.8"),
    _SmtpRule(_BAD_OUTBOUND_SENDER, text=r"bad outbound sender"),
    _SmtpRule(_TENANT_THRESHOLD, enhanced=r"5\.7\.705"),
    _SmtpRule(_IP_NOT_ACCEPTED, enhanced=r"5\.7\.708"),
    _SmtpRule(_UNREGISTERED_DOMAIN, enhanced=r"5\.7\.750"),
    _SmtpRule(_UNREGISTERED_DOMAIN, text=r"unregistered domain"),
    _SmtpRule(_TENANT_ATTRIBUTION, enhanced=r"5\.7\.64"),
    # Recipients.
    _SmtpRule(_HVE_EXTERNAL, enhanced=r"5\.5\.105"),
    _SmtpRule(_TOO_MANY_RECIPIENTS, enhanced=r"5\.5\.3"),
    _SmtpRule(_TOO_MANY_RECIPIENTS, text=r"RecipLimit|too many recipients"),
    _SmtpRule(_UNKNOWN_RECIPIENT, enhanced=r"5\.1\.1|5\.1\.10"),
    _SmtpRule(_RECIPIENT_REFUSED, enhanced=r"5\.4\.1"),
    _SmtpRule(_RECIPIENT_REFUSED, text=r"relay access denied", stages=frozenset({"rcpt"})),
    _SmtpRule(_BAD_RECIPIENT, enhanced=r"5\.1\.\d+", stages=frozenset({"rcpt"})),
    _SmtpRule(_NO_ROUTE, enhanced=r"5\.4\.\d+"),
    # Transient replies with their own advice. 4.7.66 is the one 4xx that needs
    # an admin: retrying with the same TLS settings cannot succeed.
    _SmtpRule(_TLS_TOO_OLD, reply=_4XX, enhanced=r"4\.7\.66"),
    _SmtpRule(_TLS_TOO_OLD, reply=r"[45]\d\d", text=r"TLS 1\.0 and 1\.1 are not supported"),
    _SmtpRule(_TOO_MANY_CONNECTIONS, reply=r"432", enhanced=r"4\.3\.2"),
    _SmtpRule(_TOO_MANY_CONNECTIONS, reply=_4XX, text=r"thread limit|concurrent connection"),
    _SmtpRule(_LOGON_FAILED, reply=_4XX, text=r"logon ?failure|LogonFailed"),
    _SmtpRule(_TEMP_RESTRICTED, reply=_4XX, enhanced=r"4\.7\.[56]\d\d"),
    _SmtpRule(_SERVICE_BUSY, reply=r"421"),
    # Catch-alls. A 5xx before any message is involved is our setup problem,
    # so it waits for an admin instead of bouncing the sender's mail.
    _SmtpRule(_AUTH_FAILED, reply=r"535", stages=_AUTH),
    _SmtpRule(_SESSION_REFUSED, stages=_SESSION_STAGES),
    _SmtpRule(_TEMPORARY, reply=_4XX),
    _SmtpRule(_PERMANENT),
    _SmtpRule(_UNEXPECTED, reply=r".*"),
)


@dataclass(frozen=True)
class _Reply:
    code: int
    enhanced: str  # "" when the reply has none
    text: str  # all lines joined by spaces, reply codes removed
    stage: str


# An enhanced status code (RFC 3463), not part of a longer dotted number such
# as an IP address or a version string.
_ENHANCED = re.compile(r"(?<![\w.])([245]\.\d{1,3}\.\d{1,3})(?![\w.])")
_HOST_SUFFIX = re.compile(r"\s*\[(?:Hostname=)?[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+){2,}\]")
_DIAGNOSTIC = re.compile(r"\[BeginDiagnosticData\].*", re.DOTALL)


def _parse_reply(code: int, message: str, stage: str) -> _Reply:
    own_code = re.compile(rf"^\s*{code}[ -]?") if 0 <= code <= 999 else None
    lines = []
    for line in message.splitlines():
        lines.append(own_code.sub("", line, count=1) if own_code else line)
    text = " ".join(" ".join(lines).split())
    at_start = _ENHANCED.match(text)
    anywhere = at_start or _ENHANCED.search(text)
    return _Reply(code, anywhere.group(1) if anywhere else "", text, stage)


def _quote_reply(reply: _Reply) -> str:
    """The server's words for the summary: without host suffixes and diagnostic dumps."""
    text = _DIAGNOSTIC.sub("", reply.text)
    text = _HOST_SUFFIX.sub("", text)
    return _clean(f"{reply.code} {text}", 160)


def explain_smtp(code: int, message: str, *, stage: str, ctx: Context) -> Explanation:
    """Explain an SMTP reply from upstream.

    `message` is the reply text without or with the code prefix, one or more
    lines. `stage` is where it came: connect, ehlo, starttls, auth, mail,
    rcpt or data.
    """
    reply = _parse_reply(code, message, stage)
    fields = _fields(ctx, stage)
    fields["code"] = str(code)
    fields["enhanced"] = reply.enhanced
    fields["status"] = f"{code} {reply.enhanced}" if reply.enhanced else str(code)
    fields["reply"] = _quote_reply(reply)
    for rule in SMTP_RULES:
        if rule.matches(reply):
            return _render(rule.advice, fields)
    return _render(_UNEXPECTED, fields)  # unreachable: the last rule matches anything


# ---------------------------------------------------------------------------
# Entra ID token endpoint
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# Network and TLS exceptions
# ---------------------------------------------------------------------------

_NEVER_OFF = "m365relay never switches certificate verification off."

_CERT_HOSTNAME = _Advice(
    _ADMIN,
    "The TLS certificate of {peer_host} is not valid for that name ({detail}).",
    "Use the real host name in {host_key}, not an IP address or alias (smtp.office365.com for "
    "SMTP). If a proxy inspects TLS, exempt {peer_host} or add the proxy's CA (PEM) to the file "
    "named by `apps.{app}.ca_file`. " + _NEVER_OFF,
)
_CERT_EXPIRED = _Advice(
    _ADMIN,
    "The TLS certificate of {peer_host} is expired or not yet valid ({detail}).",
    "Check this host's clock (`timedatectl status`). If the clock is right, a TLS-inspecting "
    "proxy is probably presenting an old certificate: exempt {peer_host} from inspection. "
    + _NEVER_OFF,
)
_CERT_UNTRUSTED = _Advice(
    _ADMIN,
    "The TLS certificate of {peer_host} is not trusted ({detail}).",
    "Usually a firewall or proxy inspects TLS and shows its own certificate. Exempt "
    "{peer_host} from TLS inspection, or put the inspecting CA's certificate (PEM) into the "
    "file named by `apps.{app}.ca_file`. If there is no such proxy, update the system CA "
    "certificates. " + _NEVER_OFF,
)
_TLS_VERSION = _Advice(
    _ADMIN,
    "TLS with {peer_host} failed on the protocol version ({detail}); Microsoft 365 needs TLS "
    "1.2 or newer.",
    "Check the system OpenSSL policy (MinProtocol in /etc/ssl/openssl.cnf or the "
    "distribution's crypto policy) and any proxy on the way; both must allow TLS 1.2 or 1.3.",
)
_TLS_WRONG_MODE = _Advice(
    _ADMIN,
    "{peer_host} did not answer with TLS where m365relay expected it ({detail}).",
    "Check {port_key}: smtp.office365.com uses STARTTLS on port 587, not TLS from the first "
    "byte. Also check that no proxy answers in its place.",
)
_TLS_FAILED = _Advice(
    _R,
    "The TLS handshake with {peer_host} failed {when} ({detail}). m365relay will retry.",
    "If it repeats, look for a firewall or proxy that interferes with TLS to {peer_host}.",
)
_AUTHORITY_UNKNOWN = _Advice(
    _ADMIN,
    "Entra ID does not know the tenant of app {app} ({detail}).",
    "Set `apps.{app}.tenant` ({tenant}) to the Directory (tenant) ID (a GUID, Entra admin "
    "center > Overview) or a verified domain such as contoso.onmicrosoft.com. If "
    "`apps.{app}.authority` is set, it must be https://login.microsoftonline.com/<tenant> or "
    "your cloud's equivalent.",
)
_CREDENTIAL_UNUSABLE = _Advice(
    _ADMIN,
    "m365relay could not use the credential configured for app {app} ({detail}).",
    "Check `apps.{app}.certificate`: `private_key` must be the PEM private key (with "
    "`passphrase` if it is encrypted) and `certificate` the matching PEM certificate, not a "
    "second copy of the key. Or use `apps.{app}.client_secret`.",
)
_DNS_FAILED = _Advice(
    _R,
    "Could not look up {peer_host} in DNS ({detail}). m365relay will retry.",
    "Check the host name in {host_key} (smtp.office365.com for SMTP) and that DNS works on this "
    "host: `getent hosts {peer_host}`.",
)
_REFUSED = _Advice(
    _R,
    "{peer_host} refused the connection on {port}. m365relay will retry.",
    "Check {host_key} and {port_key} (smtp.office365.com and 587 for SMTP), and that no "
    "firewall blocks outgoing connections to {peer_host}.",
)
_TIMED_OUT = _Advice(
    _R,
    "{peer_host} did not answer in time {when}. m365relay will retry.",
    "If it repeats, check that outgoing connections to {peer_host} on {port} are allowed; many "
    "networks block outgoing SMTP ports.",
)
_UNREACHABLE = _Advice(
    _R,
    "The network path to {peer_host} is unreachable ({detail}). m365relay will retry.",
    "Check this host's network connection, routing and proxy settings.",
)
_DROPPED = _Advice(
    _R,
    "The connection to {peer_host} failed or was closed {when} ({detail}). m365relay will retry.",
    "",
)
_NETWORK_OTHER = _Advice(
    _R,
    "Could not talk to {peer_host} {when} ({detail}). m365relay will retry.",
    "If it repeats, report it with this log line.",
)


@dataclass(frozen=True)
class _ConnRule:
    """Matches the first exception in the cause chain that fits ANY of the given fields.

    types: isinstance check.
    errnos: OSError.errno values.
    text: search (case-insensitive) in the exception's message; wrappers such as
        requests' ConnectionError keep only the message of what they wrap.
    within: if given, only exceptions of these types are considered at all.
    stages: the stages the rule applies to.
    """

    advice: _Advice
    types: tuple[type[BaseException], ...] = ()
    errnos: frozenset[int] = frozenset()
    text: str | None = None
    within: tuple[type[BaseException], ...] = (BaseException,)
    stages: frozenset[str] | None = None

    def culprit(self, chain: list[BaseException], stage: str) -> BaseException | None:
        """The exception that matched (its message gets quoted), or None."""
        if self.stages is not None and stage not in self.stages:
            return None
        for exc in chain:
            if not isinstance(exc, self.within):
                continue
            if self.types and isinstance(exc, self.types):
                return exc
            if isinstance(exc, OSError) and exc.errno in self.errnos:
                return exc
            if self.text is not None and re.search(self.text, _safe_str(exc), re.IGNORECASE):
                return exc
        return None


_CERT = r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"
_TOKEN_STAGE = frozenset({"token"})

CONNECTION_RULES: tuple[_ConnRule, ...] = (
    _ConnRule(_CERT_HOSTNAME, text=rf"({_CERT}).*((hostname|IP address) mismatch|doesn't match)"),
    _ConnRule(_CERT_EXPIRED, text=rf"({_CERT}).*(expired|not yet valid)"),
    _ConnRule(_CERT_UNTRUSTED, types=(ssl.SSLCertVerificationError,), text=_CERT),
    # Protocol version refused by either side, or no TLS version left to offer.
    _ConnRule(
        _TLS_VERSION,
        text=r"UNSUPPORTED_PROTOCOL|PROTOCOL_VERSION|NO_PROTOCOLS_AVAILABLE|NO_CIPHERS_AVAILABLE",
    ),
    # Plain text where TLS was expected: wrong port or TLS mode, or a proxy.
    _ConnRule(_TLS_WRONG_MODE, text=r"WRONG_VERSION_NUMBER|HTTP_REQUEST|record layer failure"),
    _ConnRule(_TLS_FAILED, types=(ssl.SSLError,)),
    # msal raises ValueError when tenant discovery answers 4xx (unknown tenant),
    # and cryptography raises ValueError/TypeError for unusable keys.
    _ConnRule(
        _AUTHORITY_UNKNOWN,
        text=r"Unable to get authority configuration|OIDC Discovery failed",
        within=(ValueError,),
        stages=_TOKEN_STAGE,
    ),
    _ConnRule(
        _CREDENTIAL_UNUSABLE,
        text=r"key|certificate|thumbprint|PFX|password|passphrase|client_credential",
        within=(ValueError, TypeError),
        stages=_TOKEN_STAGE,
    ),
    _ConnRule(
        _DNS_FAILED,
        types=(socket.gaierror,),
        text=r"Name or service not known|Temporary failure in name resolution|"
        r"nodename nor servname|getaddrinfo failed|NameResolutionError",
    ),
    _ConnRule(_REFUSED, types=(ConnectionRefusedError,), errnos=frozenset({errno.ECONNREFUSED})),
    _ConnRule(_TIMED_OUT, types=(TimeoutError,), errnos=frozenset({errno.ETIMEDOUT})),
    _ConnRule(_UNREACHABLE, errnos=frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH})),
    _ConnRule(_DROPPED, types=(ConnectionError, EOFError)),
    _ConnRule(_NETWORK_OTHER, types=(BaseException,)),
)


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc) or type(exc).__name__
    except Exception:  # a broken __str__ must not hide the real failure
        return type(exc).__name__


def _cause_chain(exc: BaseException) -> list[BaseException]:
    """exc and everything it wraps: __cause__, __context__, .reason, args, groups."""
    chain: list[BaseException] = []
    todo = [exc]
    while todo and len(chain) < 16:
        current = todo.pop(0)
        if any(current is seen for seen in chain):
            continue
        chain.append(current)
        try:
            linked = [
                current.__cause__,
                current.__context__,
                getattr(current, "reason", None),  # urllib3 MaxRetryError
                *current.args,
                *getattr(current, "exceptions", ()),  # ExceptionGroup
            ]
        except Exception:  # odd attributes on third-party exceptions
            linked = [current.__cause__, current.__context__]
        todo.extend(e for e in linked if isinstance(e, BaseException))
    return chain


def explain_connection_error(exc: BaseException, *, stage: str, ctx: Context) -> Explanation:
    """Explain a network, TLS or client-side failure talking to Exchange Online or Entra ID.

    `stage` is an SMTP stage, or "token" for the Entra ID token endpoint.
    An exception that carries an SMTP reply (aiosmtplib's SMTPResponseException)
    is explained as that reply.
    """
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None)
    if isinstance(code, int) and 400 <= code <= 599 and isinstance(message, str):
        return explain_smtp(code, message, stage=stage, ctx=ctx)

    chain = _cause_chain(exc)
    fields = _fields(ctx, stage)
    app = fields["app"]
    if stage == "token":
        fields["peer_host"] = ctx.authority_host or "login.microsoftonline.com"
        fields["port"] = "port 443 (HTTPS)"
        fields["host_key"] = f"`apps.{app}.tenant` and `apps.{app}.authority`"
        fields["port_key"] = f"`apps.{app}.authority`"
    else:
        fields["peer_host"] = fields["smtp_host"]
        fields["port"] = "the SMTP port"
        fields["host_key"] = f"`apps.{app}.smtp_host`"
        fields["port_key"] = f"`apps.{app}.smtp_port`"
    for rule in CONNECTION_RULES:
        culprit = rule.culprit(chain, stage)
        if culprit is not None:
            fields["detail"] = _clean(_safe_str(culprit), 160)
            return _render(rule.advice, fields)
    fields["detail"] = _clean(_safe_str(exc), 160)  # unreachable: the last rule matches all
    return _render(_NETWORK_OTHER, fields)
