"""Exchange Online's SMTP replies, explained: a declarative table of rules (:data:`SMTP_RULES`,
first match wins) from a reply code, enhanced status and text to a verdict and advice."""

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

__all__ = ["SMTP_RULES", "explain_smtp"]

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

