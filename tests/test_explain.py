"""relay.diagnosis.explain: upstream replies, Entra errors and network failures -> verdict + advice.

Reply strings come from /work/shared/MICROSOFT365.md §1-§5 verbatim where it quotes them
(host suffixes and all); the few marked "representative" follow the documented
wording of codes the reference lists only by number.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import re
import socket
import ssl
import string
import warnings
from dataclasses import dataclass

import aiosmtplib
import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.diagnosis import explain
from relay.diagnosis.explain import (
    Context,
    Explanation,
    Verdict,
    explain_connection_error,
    explain_smtp,
    explain_token_error,
)

MAILBOX = "printer@contoso.com"
SENDER = "scanner@contoso.com"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
TENANT = "contoso.onmicrosoft.com"
CTX = Context(
    mailbox=MAILBOX,
    sender=SENDER,
    app="contoso",
    client_id=CLIENT_ID,
    tenant=TENANT,
    smtp_host="smtp.office365.com",
)
HOST = "[SN2PR00CA0018.namprd00.prod.outlook.com]"
STAGES = ["connect", "ehlo", "starttls", "auth", "mail", "rcpt", "data"]

SET_CAS = f"Set-CASMailbox -Identity {MAILBOX} -SmtpClientAuthenticationDisabled $false"


def split(reply: str) -> tuple[int, str]:
    """'535 5.7.3 text' -> (535, '5.7.3 text'), as aiosmtplib hands it over."""
    code, _, message = reply.partition(" ")
    return int(code), message


@dataclass(frozen=True)
class Case:
    reply: str
    stage: str
    verdict: Verdict
    fix_has: tuple[str, ...] = ()
    summary_has: tuple[str, ...] = ()


SMTP_CASES = {
    # §2 / §3: token rejected
    "5.7.3 token rejected": Case(
        f"535 5.7.3 Authentication unsuccessful {HOST}",
        "auth",
        Verdict.RETRY_NEW_TOKEN,
        (
            f"New-ServicePrincipal -AppId {CLIENT_ID} -ObjectId <enterprise app object id>",
            f"Add-MailboxPermission -Identity {MAILBOX} -User <service principal id> "
            "-AccessRights FullAccess",
            f"New-ManagementRoleAssignment -Role 'Application SMTP.SendAsApp' -App {CLIENT_ID}",
            "Application permissions > SMTP.SendAsApp",
            "Grant admin consent",
            SET_CAS,
        ),
        ("rejected the access token", MAILBOX, "535 5.7.3"),
    ),
    # §3: SMTP AUTH disabled, all variants
    "5.7.139 tenant": Case(
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
        f"Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. {HOST}",
        "auth",
        Verdict.DEFER_ADMIN,
        ("Set-TransportConfig -SmtpClientAuthenticationDisabled $false", SET_CAS),
        ("whole tenant", "535 5.7.139"),
    ),
    "5.7.139 security defaults": Case(
        "535 5.7.139 Authentication unsuccessful, user is locked by your organization's "
        f"security defaults policy. Contact your administrator. {HOST}",
        "auth",
        Verdict.DEFER_ADMIN,
        ("Manage security defaults", SET_CAS),
        ("security defaults",),
    ),
    "5.7.139 criteria": Case(
        "535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be "
        f"authenticated successfully. Contact your administrator. {HOST}",
        "auth",
        Verdict.DEFER_ADMIN,
        ("SmtpClientAuthenticationDisabled", SET_CAS, "Conditional Access", CLIENT_ID),
        ("policy",),
    ),
    "5.7.139 org configuration": Case(
        "535 5.7.139 Authentication unsuccessful, the organization configuration doesn't allow "
        f"this authentication request. Visit https://aka.ms/smtp_auth_disabled {HOST}",
        "auth",
        Verdict.DEFER_ADMIN,
        ("Get-TransportConfig", SET_CAS),
    ),
    "5.7.139 mailbox (representative)": Case(
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
        f"Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information. {HOST}",
        "auth",
        Verdict.DEFER_ADMIN,
        (SET_CAS,),
        (f"mailbox {MAILBOX}",),
    ),
    "5.7.139 unknown wording": Case(
        f"535 5.7.139 Authentication unsuccessful, something new. {HOST}",
        "auth",
        Verdict.DEFER_ADMIN,
        (SET_CAS,),
    ),
    # §3 / §5: Basic auth retired
    "5.7.30 basic auth": Case(
        "550 5.7.30 Basic authentication is not supported for Client Submission.",
        "auth",
        Verdict.DEFER_ADMIN,
        ("apps.contoso.smtp_host", "bug"),
        ("Basic authentication", "XOAUTH2"),
    ),
    # §3: From != authenticated mailbox
    "5.2.252 SendAsDenied": Case(
        f"554 5.2.252 SendAsDenied; {MAILBOX} not allowed to send as {SENDER}; "
        "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; "
        "Failed to process message due to a permanent exception with message "
        "[BeginDiagnosticData]Cannot submit message. 0.35250:0A000000[EndDiagnosticData] "
        "[Hostname=BY5PR19MB3378.namprd19.prod.outlook.com]",
        "data",
        Verdict.BOUNCE,
        (
            f"Add-RecipientPermission -Identity {SENDER} -Trustee {MAILBOX} -AccessRights SendAs",
            f"Add-MailboxPermission -Identity {SENDER} -User <service principal id> "
            "-AccessRights FullAccess",
            "from: rewrite",
            "recommended",
        ),
        (SENDER, MAILBOX, "554 5.2.252"),
    ),
    "5.2.0 SendAsDenied (older form)": Case(
        "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
        "data",
        Verdict.BOUNCE,
        (f"-Trustee {MAILBOX}", "from: rewrite"),
    ),
    "5.7.60 send as": Case(
        "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
        "data",
        Verdict.BOUNCE,
        (f"Add-RecipientPermission -Identity {SENDER}",),
    ),
    # §3 / §4: 3 connections per mailbox
    "4.3.2 thread limit": Case(
        "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
        "data",
        Verdict.RETRY,
        ("delivery.connections_per_mailbox",),
        ("3 per mailbox",),
    ),
    "4.3.2 concurrent connections": Case(
        "432 4.3.2 concurrent connection limit exceeded",
        "mail",
        Verdict.RETRY,
        summary_has=("3 per mailbox",),
    ),
    # §3: TLS
    "4.7.66 TLS": Case(
        "421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to "
        "support TLS 1.2.",
        "starttls",
        Verdict.DEFER_ADMIN,
        ("TLS 1.2", "smtp-legacy.office365.com"),
    ),
    "421 generic": Case(
        "421 4.3.2 Service not available, closing transmission channel",
        "connect",
        Verdict.RETRY,
        summary_has=("not taking connections",),
    ),
    # §3: size
    "5.3.4 size": Case(
        "552 5.3.4 Message size exceeds fixed maximum message size",
        "data",
        Verdict.BOUNCE,
        (f"Set-Mailbox -Identity {MAILBOX} -MaxSendSize", "smaller message"),
    ),
    "5.2.0 max submission": Case(
        "554 5.2.0 STOREDRV.Submission.Exception:MessageSubmissionExceededException."
        "MapiExceptionMaxSubmissionExceeded",
        "data",
        Verdict.BOUNCE,
        (f"Set-Mailbox -Identity {MAILBOX} -MaxSendSize",),
    ),
    "5.2.3 SendSizeLimit": Case(
        "550 5.2.3 RESOLVER.RST.SendSizeLimit.Sender; message too large for this sender",
        "data",
        Verdict.BOUNCE,
        (f"Set-Mailbox -Identity {MAILBOX} -MaxSendSize",),
    ),
    # §3 / §4: rate limits clear by themselves
    "5.2.2 quota as 5xx": Case(
        "554 5.2.2 Submission quota exceeded",
        "data",
        Verdict.RETRY,
        summary_has=("rolling 24 hours", "after the window", "30 messages a minute"),
    ),
    "4.2.2 quota as 4xx": Case("452 4.2.2 Submission quota exceeded", "rcpt", Verdict.RETRY),
    # §3: blocked account / tenant
    "5.1.8 bad outbound sender": Case(
        "550 5.1.8 Access denied, bad outbound sender",
        "mail",
        Verdict.DEFER_ADMIN,
        ("Restricted entities", "https://security.microsoft.com/restrictedentities"),
        (MAILBOX,),
    ),
    "4.7.500 throttled": Case(
        "451 4.7.500 Access denied, please try again later", "mail", Verdict.RETRY
    ),
    "4.7.650 throttled": Case(
        "451 4.7.650 Access denied, please try again later", "rcpt", Verdict.RETRY
    ),
    "5.7.705 tenant threshold": Case(
        "550 5.7.705 Access denied, tenant has exceeded threshold",
        "mail",
        Verdict.DEFER_ADMIN,
        ("support request",),
        ("whole tenant",),
    ),
    "5.7.708 IP": Case(
        "550 5.7.708 Access denied, traffic not accepted from this IP",
        "mail",
        Verdict.DEFER_ADMIN,
        ("support request",),
    ),
    "5.7.750 unregistered domain": Case(
        "550 5.7.750 Client blocked from sending from unregistered domains",
        "mail",
        Verdict.DEFER_ADMIN,
        ("Settings > Domains", "from: rewrite"),
        (SENDER,),
    ),
    "5.7.57 not authenticated": Case(
        "530 5.7.57 Client was not authenticated to send anonymous mail during MAIL FROM",
        "mail",
        Verdict.DEFER_ADMIN,
        ("Report an m365relay bug",),
        ("bug",),
    ),
    "4.2.0 logon failure": Case(
        "430 4.2.0 STOREDRV; mailbox logon failure; Failed to process message due to a "
        "transient exception with message Cannot open mailbox. MapiExceptionLogonFailed",
        "data",
        Verdict.RETRY,
        (f"Add-MailboxPermission -Identity {MAILBOX}", "FullAccess"),
    ),
    # §2 / §5: HVE
    "5.5.124 HVE user": Case(
        "501 5.5.124 Invalid XOAUTH2 auth data - User address provided is not valid",
        "auth",
        Verdict.DEFER_ADMIN,
        ("HVE account", "apps.contoso.smtp_host"),
    ),
    "5.5.105 HVE external": Case(
        "550 5.5.105 External sending is not supported for High Volume Email accounts",
        "rcpt",
        Verdict.BOUNCE,
    ),
    # Recipients (representative Exchange wording)
    "5.1.1 unknown recipient": Case(
        "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found",
        "rcpt",
        Verdict.BOUNCE,
        ("recipient address",),
        ("does not exist",),
    ),
    "5.1.10 recipient not found": Case(
        "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        "rcpt",
        Verdict.BOUNCE,
        summary_has=("does not exist",),
    ),
    "5.4.1 relay access denied": Case(
        f"550 5.4.1 Relay Access Denied {HOST}",
        "rcpt",
        Verdict.BOUNCE,
        summary_has=("relay access denied",),
    ),
    # Sign-in and session catch-alls
    "535 without enhanced code": Case(
        "535 Authentication failed", "auth", Verdict.RETRY_NEW_TOKEN, ("New-ServicePrincipal",)
    ),
    "530 STARTTLS required (aiosmtpd wording)": Case(
        "530 Must issue a STARTTLS command first",
        "mail",
        Verdict.DEFER_ADMIN,
        ("apps.contoso.smtp_host",),
    ),
    "504 5.7.4 no XOAUTH2": Case(
        "504 5.7.4 Unrecognized authentication type",
        "auth",
        Verdict.DEFER_ADMIN,
        ("apps.contoso.smtp_host", "smtp.office365.com"),
    ),
    # §2/§9: stock aiosmtpd refuses the long XOAUTH2 line; our setup, not the mail's fault.
    "500 line too long at auth": Case(
        "500 Command line too long", "auth", Verdict.DEFER_ADMIN, ("apps.contoso.smtp_host",)
    ),
    "generic 4xx": Case(
        "451 4.3.0 Temporary server error. Please try again later", "data", Verdict.RETRY
    ),
    "generic 5xx": Case(
        "550 5.6.0 Corrupt message content", "data", Verdict.BOUNCE, (), ("550 5.6.0",)
    ),
}


@pytest.mark.parametrize("case", SMTP_CASES.values(), ids=SMTP_CASES.keys())
def test_smtp_reply(case: Case) -> None:
    code, message = split(case.reply)
    result = explain_smtp(code, message, stage=case.stage, ctx=CTX)
    assert result.verdict is case.verdict, result
    for text in case.fix_has:
        assert text in result.fix, f"{text!r} missing from fix:\n{result.fix}"
    for text in case.summary_has:
        assert text.lower() in result.summary.lower(), result.summary
    assert "\n" not in result.summary
    assert "{" not in result.summary + result.fix  # every template field was filled


@pytest.mark.parametrize("case", SMTP_CASES.values(), ids=SMTP_CASES.keys())
def test_smtp_reply_with_code_prefix_and_odd_case(case: Case) -> None:
    """Robust to callers passing the full line and to case changes in the text."""
    code, message = split(case.reply)
    plain = explain_smtp(code, message, stage=case.stage, ctx=CTX)
    assert explain_smtp(code, case.reply, stage=case.stage, ctx=CTX) == plain
    assert explain_smtp(code, message.upper(), stage=case.stage, ctx=CTX).verdict is plain.verdict


def test_5_7_3_fix_lists_checks_in_order() -> None:
    fix = explain_smtp(535, f"5.7.3 Authentication unsuccessful {HOST}", stage="auth", ctx=CTX).fix
    steps = ["New-ServicePrincipal", "Add-MailboxPermission", "API permissions", "Set-CASMailbox"]
    positions = [fix.index(step) for step in steps]
    assert positions == sorted(positions)


def test_5_7_3_outside_auth_is_not_a_token_problem() -> None:
    result = explain_smtp(550, "5.7.3 something else", stage="data", ctx=CTX)
    assert result.verdict is Verdict.BOUNCE


def test_multiline_reply_as_aiosmtplib_joins_it() -> None:
    message = (
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
        "Tenant.\n5.7.139 Visit https://aka.ms/smtp_auth_disabled for more information. "
        f"{HOST}"
    )
    result = explain_smtp(535, message, stage="auth", ctx=CTX)
    assert result.verdict is Verdict.DEFER_ADMIN
    assert "Set-TransportConfig" in result.fix


def test_multiline_raw_lines_with_codes() -> None:
    message = (
        "535-5.7.139 Authentication unsuccessful, user is locked by your organization's\r\n"
        "535 5.7.139 security defaults policy. Contact your administrator.\r\n"
    )
    result = explain_smtp(535, message, stage="auth", ctx=CTX)
    assert "security defaults" in result.summary


def test_nested_reason_wins_over_outer_code() -> None:
    """Exchange can nest the real reason: the SMTP AUTH switch, not a relay bug."""
    message = (
        "5.7.57 Client not authenticated to send mail. Error: 535 5.7.139 Authentication "
        "unsuccessful, SmtpClientAuthentication is disabled for the Tenant."
    )
    result = explain_smtp(530, message, stage="mail", ctx=CTX)
    assert result.verdict is Verdict.DEFER_ADMIN
    assert "Set-TransportConfig" in result.fix


def test_summary_quotes_reply_without_host_or_diagnostics() -> None:
    result = explain_smtp(
        550,
        "5.6.11 Invalid characters [BeginDiagnosticData]0.1:2[EndDiagnosticData] "
        "[AM0PR01CA0123.eurprd01.prod.exchangelabs.com]",
        stage="data",
        ctx=CTX,
    )
    assert "550 5.6.11 Invalid characters" in result.summary
    assert "AM0PR01CA0123" not in result.summary
    assert "DiagnosticData" not in result.summary


def test_4xx_never_bounces_even_with_permanent_wording() -> None:
    for case in SMTP_CASES.values():
        _code, message = split(case.reply)
        result = explain_smtp(451, message, stage=case.stage, ctx=CTX)
        assert result.verdict is not Verdict.BOUNCE, case.reply


def test_5xx_before_the_message_never_bounces() -> None:
    for stage in ("connect", "ehlo", "starttls", "auth"):
        result = explain_smtp(554, "5.0.0 Something unexpected", stage=stage, ctx=CTX)
        assert result.verdict is Verdict.DEFER_ADMIN


def test_empty_context_uses_placeholders() -> None:
    result = explain_smtp(535, "5.7.3 Authentication unsuccessful", stage="auth", ctx=Context())
    assert "-AppId <client id>" in result.fix
    assert "-Identity <mailbox>" in result.fix


def test_token_shaped_text_is_never_quoted() -> None:
    jwt = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL291dGxvb2sifQ.c2lnbmF0dXJl"
    blob = "dXNlcj1wcmludGVyQGNvbnRvc28uY29tAWF1dGg9QmVhcmVyIGV5SjB" * 3
    for text in (jwt, blob):
        result = explain_smtp(554, f"5.0.0 bad {text}", stage="data", ctx=CTX)
        assert text not in result.summary + result.fix
        assert "<redacted>" in result.summary


# --- table hygiene ---------------------------------------------------------------------------


def test_bounce_rules_only_match_5xx() -> None:
    for rule in explain.SMTP_RULES:
        if rule.advice.verdict is Verdict.BOUNCE:
            assert not any(re.fullmatch(rule.reply, str(c)) for c in range(100, 500)), rule


def test_token_rules_never_bounce() -> None:
    assert all(rule.advice.verdict is not Verdict.BOUNCE for rule in explain.TOKEN_RULES)


# --- hypothesis ------------------------------------------------------------------------------

any_stage = st.one_of(st.sampled_from(STAGES), st.text(max_size=20))
context = st.builds(
    Context,
    mailbox=st.text(max_size=40),
    sender=st.text(max_size=40),
    app=st.text(max_size=20),
    client_id=st.text(max_size=40),
    tenant=st.text(max_size=40),
    smtp_host=st.text(max_size=40),
)
enhanced = st.builds(
    "{}.{}.{}".format, st.sampled_from("245"), st.integers(0, 999), st.integers(0, 999)
)
known_texts = st.sampled_from([split(c.reply)[1] for c in SMTP_CASES.values()])
reply_text = st.one_of(
    st.text(),
    st.builds("{} {}".format, enhanced, st.text(alphabet=string.printable)),
    known_texts,
)


def _check_shape(result: Explanation) -> None:
    assert isinstance(result.verdict, Verdict)
    assert result.summary
    assert "\n" not in result.summary and "\r" not in result.summary


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(code=st.integers(-10_000, 10_000), message=reply_text, stage=any_stage, ctx=context)
def test_explain_smtp_never_raises(code: int, message: str, stage: str, ctx: Context) -> None:
    _check_shape(explain_smtp(code, message, stage=stage, ctx=ctx))


def _documented_4xx_exception(message: str) -> bool:
    """The table's one 4xx that is not RETRY: 421 4.7.66, TLS too old (an admin must act)."""
    return bool(re.match(r"\s*4\.7\.66\b", message)) or "tls 1.0 and 1.1 are not supported" in (
        message.lower()
    )


@settings(max_examples=400)
@given(code=st.integers(400, 499), message=reply_text, stage=any_stage)
def test_4xx_is_retry(code: int, message: str, stage: str) -> None:
    result = explain_smtp(code, message, stage=stage, ctx=CTX)
    if _documented_4xx_exception(message):
        assert result.verdict is Verdict.DEFER_ADMIN
    else:
        assert result.verdict is Verdict.RETRY, (code, message, result)


@settings(max_examples=300)
@given(
    error=st.one_of(st.text(), st.sampled_from(["invalid_client", "invalid_request", ""])),
    description=st.one_of(
        st.text(), st.builds("AADSTS{}: {}".format, st.integers(0, 10**8), st.text())
    ),
    status=st.one_of(st.none(), st.integers(-1, 999)),
    ctx=context,
)
def test_token_errors_never_bounce_or_raise(
    error: str, description: str, status: int | None, ctx: Context
) -> None:
    result = explain_token_error(error, description, status=status, ctx=ctx)
    _check_shape(result)
    assert result.verdict is not Verdict.BOUNCE


@settings(max_examples=200)
@given(message=st.text(), stage=any_stage, ctx=context)
def test_connection_errors_never_raise(message: str, stage: str, ctx: Context) -> None:
    for exc in (OSError(message), ValueError(message), RuntimeError(message)):
        result = explain_connection_error(exc, stage=stage, ctx=ctx)
        _check_shape(result)
        assert result.verdict in (Verdict.RETRY, Verdict.DEFER_ADMIN)


# --- Entra token errors ----------------------------------------------------------------------

TRACE = (
    "\r\nTrace ID: 0000aaaa-11bb-cccc-dd22-eeeeee333333\r\nCorrelation ID: "
    "aaaa0000-bb11-2222-33cc-444444dddddd\r\nTimestamp: 2026-01-09 02:02:12Z"
)


@dataclass(frozen=True)
class TokenCase:
    error: str
    description: str
    status: int | None
    verdict: Verdict
    fix_has: tuple[str, ...] = ()
    summary_has: tuple[str, ...] = ()


TOKEN_CASES = {
    "7000215 invalid secret": TokenCase(
        "invalid_client",
        "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the "
        "request is the client secret value, not the client secret ID, for a secret added to "
        f"app '{CLIENT_ID}'." + TRACE,
        401,
        Verdict.DEFER_ADMIN,
        (
            "apps.contoso.client_secret",
            f"App registrations > {CLIENT_ID} > Certificates & secrets",
            "expire",
        ),
        ("AADSTS7000215", CLIENT_ID),
    ),
    "7000222 expired secret": TokenCase(
        "invalid_client",
        f"AADSTS7000222: The provided client secret keys for app '{CLIENT_ID}' are expired. "
        "Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret",
        401,
        Verdict.DEFER_ADMIN,
        ("apps.contoso.client_secret", f"App registrations > {CLIENT_ID}"),
        ("expired",),
    ),
    "700016 app not found": TokenCase(
        "unauthorized_client",
        f"AADSTS700016: Application with identifier '{CLIENT_ID}' was not found in the "
        "directory 'Contoso'. This can happen if the application has not been installed by the "
        "administrator of the tenant or consented to by any user in the tenant. You may have "
        "sent your authentication request to the wrong tenant." + TRACE,
        400,
        Verdict.DEFER_ADMIN,
        (
            "apps.contoso.client_id",
            "apps.contoso.tenant",
            f"https://login.microsoftonline.com/{TENANT}/adminconsent?client_id={CLIENT_ID}",
        ),
    ),
    "90002 tenant not found": TokenCase(
        "invalid_request",
        f"AADSTS90002: Tenant '{TENANT}' not found. Check to make sure you have the correct "
        "tenant ID and are signing into the correct cloud." + TRACE,
        400,
        Verdict.DEFER_ADMIN,
        ("apps.contoso.tenant",),
        (TENANT,),
    ),
    "900023 tenant malformed": TokenCase(
        "invalid_request",
        "AADSTS900023: Specified tenant identifier 'token' is neither a valid DNS name, nor a "
        "valid external domain.",
        400,
        Verdict.DEFER_ADMIN,
        ("apps.contoso.tenant",),
    ),
    "90023 invalid STS request": TokenCase(
        "invalid_request",
        "AADSTS90023: Invalid STS request.",
        400,
        Verdict.DEFER_ADMIN,
        ("apps.contoso.tenant",),
    ),
    "70011 invalid scope": TokenCase(
        "invalid_scope",
        "AADSTS70011: The provided value for the input parameter 'scope' isn't valid. The scope "
        "https://example.contoso.com/activity.read isn't valid." + TRACE,
        400,
        Verdict.DEFER_ADMIN,
        ("apps.contoso.scope", "https://outlook.office365.com/.default"),
    ),
    "700027 certificate": TokenCase(
        "invalid_client",
        "AADSTS700027: Client assertion contains an invalid signature. [Reason - The key was "
        "not found., Thumbprint of key used by client: 'ABC123']",
        401,
        Verdict.DEFER_ADMIN,
        ("Certificates & secrets > Certificates", "apps.contoso.certificate"),
    ),
    "700024 clock": TokenCase(
        "invalid_client",
        "AADSTS700024: Client assertion is not within its valid time range.",
        401,
        Verdict.DEFER_ADMIN,
        ("timedatectl",),
        ("clock",),
    ),
    "65001 consent": TokenCase(
        "invalid_grant",
        "AADSTS65001: The user or administrator has not consented to use the application with "
        f"ID '{CLIENT_ID}'.",
        400,
        Verdict.DEFER_ADMIN,
        ("SMTP.SendAsApp", "Grant admin consent", CLIENT_ID),
    ),
    "650057 consent": TokenCase(
        "invalid_client",
        "AADSTS650057: Invalid resource. The client has requested access to a resource which "
        "is not listed in the requested permissions in the client's application registration.",
        400,
        Verdict.DEFER_ADMIN,
        ("SMTP.SendAsApp", "Grant admin consent"),
    ),
    "53003 conditional access": TokenCase(
        "access_denied",
        "AADSTS53003: Access has been blocked by Conditional Access policies. The access policy "
        "does not allow token issuance.",
        400,
        Verdict.DEFER_ADMIN,
        ("Service principal sign-ins", CLIENT_ID),
    ),
    "7000112 app disabled": TokenCase(
        "unauthorized_client",
        f"AADSTS7000112: Application '{CLIENT_ID}'(relay) is disabled.",
        400,
        Verdict.DEFER_ADMIN,
        (f"Enterprise applications > {CLIENT_ID} > Properties",),
    ),
    "500011 resource not found": TokenCase(
        "invalid_resource",
        "AADSTS500011: The resource principal named https://outlook.office365.com was not found "
        "in the tenant named Contoso.",
        400,
        Verdict.DEFER_ADMIN,
        ("apps.contoso.tenant", "Exchange Online"),
    ),
    "msal result without status": TokenCase(
        "invalid_client",
        "AADSTS7000215: Invalid client secret provided.",
        None,
        Verdict.DEFER_ADMIN,
        ("apps.contoso.client_secret",),
    ),
    "503 unavailable": TokenCase(
        "temporarily_unavailable",
        "AADSTS90033: A transient error has occurred. Please try again.",
        503,
        Verdict.RETRY,
    ),
    "429 throttled": TokenCase("", "", 429, Verdict.RETRY),
    "500 with a setup code still retries": TokenCase(
        "invalid_client", "AADSTS7000215: Invalid client secret provided.", 500, Verdict.RETRY
    ),
    "no answer": TokenCase("", "", None, Verdict.RETRY),
    "other 4xx": TokenCase(
        "invalid_request",
        "AADSTS9002313: Invalid request. Request is malformed or invalid." + TRACE,
        400,
        Verdict.DEFER_ADMIN,
        ("https://login.microsoftonline.com/error?code=9002313", "apps.contoso"),
        ("AADSTS9002313", "malformed"),
    ),
    "unknown invalid_client": TokenCase(
        "invalid_client", "", 401, Verdict.DEFER_ADMIN, ("apps.contoso.client_id",)
    ),
}


@pytest.mark.parametrize("case", TOKEN_CASES.values(), ids=TOKEN_CASES.keys())
def test_token_error(case: TokenCase) -> None:
    result = explain_token_error(case.error, case.description, status=case.status, ctx=CTX)
    assert result.verdict is case.verdict, result
    for text in case.fix_has:
        assert text in result.fix, f"{text!r} missing from fix:\n{result.fix}"
    for text in case.summary_has:
        assert text.lower() in result.summary.lower(), result.summary
    assert "Trace ID" not in result.summary
    assert "{" not in result.summary + result.fix


# --- network and TLS -------------------------------------------------------------------------


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext | None, host: str) -> ssl.SSLError:
    """Run a TLS handshake in memory and return the client's real error."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    tls = client.wrap_bio(c_in, c_out, server_hostname=host)
    peer = server.wrap_bio(s_in, s_out, server_side=True) if server else None
    for _ in range(10):
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            return exc
        if peer is None:  # a plain-text SMTP server where TLS was expected
            c_in.write(b"220 smtp.example ESMTP ready\r\n")
            continue
        s_in.write(c_out.read())
        with contextlib.suppress(ssl.SSLError):  # the client reports the failure
            peer.do_handshake()
        c_in.write(s_out.read())
    raise AssertionError("handshake did not fail")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _server(cert: trustme.LeafCert) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx


def _client(ca: trustme.CA | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=None)
    if ca is not None:
        ca.configure_trust(ctx)
    return ctx


def _wrapped(exc: BaseException) -> BaseException:
    """How aiosmtplib hands it over: SMTPConnectError(...) from exc."""
    wrapped = aiosmtplib.SMTPConnectError(
        f"Error connecting to smtp.office365.com on port 587: {exc}"
    )
    wrapped.__cause__ = exc
    return wrapped


def test_untrusted_certificate_names_ca_file(ca: trustme.CA) -> None:
    server = _server(ca.issue_cert("smtp.office365.com"))
    exc = _handshake(_client(None), server, "smtp.office365.com")
    for candidate in (exc, _wrapped(exc)):
        result = explain_connection_error(candidate, stage="starttls", ctx=CTX)
        assert result.verdict is Verdict.DEFER_ADMIN
        assert "apps.contoso.ca_file" in result.fix
        assert "never switches certificate verification off" in result.fix
        assert "not trusted" in result.summary


def test_hostname_mismatch(ca: trustme.CA) -> None:
    server = _server(ca.issue_cert("smtp.office365.com"))
    exc = _handshake(_client(ca), server, "10.0.0.1.example")
    result = explain_connection_error(_wrapped(exc), stage="starttls", ctx=CTX)
    assert result.verdict is Verdict.DEFER_ADMIN
    assert "apps.contoso.smtp_host" in result.fix
    assert "not valid for that name" in result.summary


def test_expired_certificate(ca: trustme.CA) -> None:
    old = ca.issue_cert(
        "smtp.office365.com",
        not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2021, 1, 1, tzinfo=datetime.UTC),
    )
    exc = _handshake(_client(ca), _server(old), "smtp.office365.com")
    result = explain_connection_error(exc, stage="starttls", ctx=CTX)
    assert result.verdict is Verdict.DEFER_ADMIN
    assert "timedatectl" in result.fix
    assert "never switches certificate verification off" in result.fix


def test_tls_version_refused(ca: trustme.CA) -> None:
    """The 421 4.7.66 analogue: the server will not speak TLS below 1.2."""
    server = _server(ca.issue_cert("smtp.office365.com"))
    server.minimum_version = ssl.TLSVersion.TLSv1_2
    client = _client(ca)
    client.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        client.minimum_version = ssl.TLSVersion.TLSv1
        client.maximum_version = ssl.TLSVersion.TLSv1_1
    exc = _handshake(client, server, "smtp.office365.com")
    result = explain_connection_error(exc, stage="starttls", ctx=CTX)
    assert result.verdict is Verdict.DEFER_ADMIN
    assert "TLS 1.2" in result.summary + result.fix


def test_plain_text_where_tls_expected(ca: trustme.CA) -> None:
    exc = _handshake(_client(ca), None, "smtp.office365.com")
    result = explain_connection_error(_wrapped(exc), stage="connect", ctx=CTX)
    assert result.verdict is Verdict.DEFER_ADMIN
    assert "apps.contoso.smtp_port" in result.fix


@pytest.mark.parametrize(
    ("exc", "stage", "summary_has", "fix_has"),
    [
        (
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            "connect",
            "DNS",
            "getent hosts smtp.office365.com",
        ),
        (
            ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed"),
            "connect",
            "refused",
            "apps.contoso.smtp_port",
        ),
        (aiosmtplib.SMTPConnectTimeoutError("Timed out connecting"), "connect", "in time", ""),
        (aiosmtplib.SMTPReadTimeoutError("Timed out waiting"), "data", "in time", ""),
        (TimeoutError(), "token", "login.microsoftonline.com", "port 443"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "connect", "unreachable", ""),
        (aiosmtplib.SMTPServerDisconnected("Unexpected EOF"), "data", "closed", ""),
        (ConnectionResetError(errno.ECONNRESET, "reset by peer"), "auth", "closed", ""),
        (RuntimeError("something odd"), "data", "something odd", ""),
    ],
)
def test_transient_network_errors_retry(
    exc: BaseException, stage: str, summary_has: str, fix_has: str
) -> None:
    for candidate in (exc, _wrapped(exc)):
        result = explain_connection_error(candidate, stage=stage, ctx=CTX)
        assert result.verdict is Verdict.RETRY, result
        assert summary_has in result.summary
        assert fix_has in result.fix


def test_requests_style_certificate_error_at_token_endpoint() -> None:
    requests = pytest.importorskip("requests")
    exc = requests.exceptions.SSLError(
        "HTTPSConnectionPool(host='login.microsoftonline.com', port=443): Max retries exceeded "
        "with url: /contoso.onmicrosoft.com/v2.0/.well-known/openid-configuration (Caused by "
        "SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate "
        "verify failed: unable to get local issuer certificate (_ssl.c:1006)')))"
    )
    result = explain_connection_error(exc, stage="token", ctx=CTX)
    assert result.verdict is Verdict.DEFER_ADMIN
    assert "apps.contoso.ca_file" in result.fix
    assert "login.microsoftonline.com" in result.summary


def test_msal_unknown_tenant_is_admin_problem() -> None:
    # msal raises the second inside `except` for the first, so it is the __context__.
    exc = ValueError(
        "Unable to get authority configuration for https://login.microsoftonline.com/nope. "
        "Also please double check your tenant name or GUID is correct."
    )
    exc.__context__ = ValueError(
        "OIDC Discovery failed on https://login.microsoftonline.com/nope/v2.0/.well-known"
        '/openid-configuration. HTTP status: 400, Error: {"error":"invalid_tenant"}'
    )
    result = explain_connection_error(exc, stage="token", ctx=CTX)
    assert result.verdict is Verdict.DEFER_ADMIN
    assert "apps.contoso.tenant" in result.fix


def test_unusable_private_key_is_admin_problem() -> None:
    exc = ValueError("Could not deserialize key data. The data may be in an incorrect format")
    result = explain_connection_error(exc, stage="token", ctx=CTX)
    assert result.verdict is Verdict.DEFER_ADMIN
    assert "apps.contoso.certificate" in result.fix


def test_smtp_response_exception_is_explained_as_reply() -> None:
    exc = aiosmtplib.SMTPAuthenticationError(535, f"5.7.3 Authentication unsuccessful {HOST}")
    result = explain_connection_error(exc, stage="auth", ctx=CTX)
    assert result.verdict is Verdict.RETRY_NEW_TOKEN


def test_broken_exception_str_does_not_crash() -> None:
    class Weird(OSError):
        def __str__(self) -> str:
            raise RuntimeError("no")

    result = explain_connection_error(Weird(), stage="data", ctx=CTX)
    assert result.verdict is Verdict.RETRY
    assert "Weird" in result.summary


def test_unknown_failure_says_to_report_it() -> None:
    result = explain_connection_error(RuntimeError("something odd"), stage="data", ctx=CTX)
    assert result.verdict is Verdict.RETRY
    assert "report" in result.fix
