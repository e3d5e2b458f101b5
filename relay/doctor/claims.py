"""The claims link: is the token Entra issued one Exchange Online SMTP will take?

The signature is not checked: we are the client, not the resource, and Exchange checks it. The
claims still tell a lot: which tenant and app Entra thinks we are, whether admin consent for
SMTP.SendAsApp reached the token, its audience and lifetime, and the object id of the app's
service principal, which is exactly the id ``New-ServicePrincipal -ObjectId`` and
``Add-MailboxPermission -User`` need.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from relay.config.clouds import HVE_ROLE
from relay.config.records import App
from relay.doctor.graphlink import (
    GRAPH_DRAFT_ROLE,
    GRAPH_ROLE,
    graph_role_fix,
    large_messages_possible,
)
from relay.doctor.report import Check, Status

SEND_ROLE = "SMTP.SendAsApp"
# Entra may name Exchange Online by its first-party app id instead of its URL.
EXCHANGE_APP_ID = "00000002-0000-0ff1-ce00-000000000000"
CLOCK_SKEW = 300  # what Entra and Exchange tolerate
# Claims worth showing; the rest (aio, rh, uti, signatures) mean nothing to an admin.
SHOWN = ("tid", "appid", "azp", "oid", "roles", "aud", "iss", "iat", "nbf", "exp", "ver")


class NotAJwt(ValueError):
    pass


def decode_claims(token: str) -> dict[str, Any]:
    """The payload of a compact JWS, signature unchecked."""
    parts = token.split(".")
    if len(parts) != 3:
        raise NotAJwt(f"{len(parts)} dot-separated parts instead of 3 (an encrypted token?)")
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise NotAJwt(f"the payload is not base64url JSON ({exc})") from None
    if not isinstance(claims, dict):
        raise NotAJwt("the payload is not a JSON object")
    return claims


@dataclass(frozen=True)
class ClaimsResult:
    check: Check
    claims: dict[str, Any]  # the SHOWN subset, for the JSON report
    object_id: str  # oid: the service principal's object id ("" if absent)
    role_missing: bool  # no SMTP.SendAsApp: fine only with RBAC for Applications


def expected_tenant(app: App) -> str:
    """The tenant the token should be from, or "" when configured as a domain name."""
    segment = next((p for p in urlsplit(app.authority_url).path.split("/") if p), app.tenant)
    return "" if "." in segment else segment


def expected_audiences(app: App) -> set[str]:
    resource = app.scope.removesuffix("/.default").rstrip("/")
    return {resource, resource + "/", EXCHANGE_APP_ID}


def consent_url(app: App) -> str:
    parts = urlsplit(app.authority_url)
    return f"{parts.scheme}://{parts.netloc}/{app.tenant}/adminconsent?client_id={app.client_id}"


def role_fix(app_name: str, app: App, mailbox: str = "<mailbox>") -> str:
    if app.transport == "graph":
        return graph_role_fix(app, mailbox)
    if app.hve:
        return (f"Entra admin center > App registrations > {app.client_id} > API permissions > "
                "Add a permission > APIs my organization uses > Office 365 Exchange Online > "
                f"Application permissions > {HVE_ROLE}, then 'Grant admin consent' (High Volume "
                "Email takes Mail.Send, not SMTP.SendAsApp).")
    return (
        "Either grant the permission (the usual way):\n"
        f"  Entra admin center > App registrations > {app.client_id} > API permissions > Add a "
        "permission > APIs my organization uses > Office 365 Exchange Online > Application "
        f"permissions > {SEND_ROLE}, then 'Grant admin consent'. Or let a Global or Privileged "
        f"Role Administrator open {consent_url(app)}\n"
        "Or, with RBAC for Applications (no Entra permission at all), assign the role in "
        "Exchange Online PowerShell:\n"
        f"  New-ManagementRoleAssignment -Role 'Application {SEND_ROLE}' -App {app.client_id} "
        f"-CustomResourceScope <management scope that includes {mailbox}>\n"
        f"New consent can take a few minutes to reach new tokens; then run doctor again."
    )


@dataclass(frozen=True)
class _Claims:
    """The claims doctor compares with the config, read leniently (a missing one is empty)."""

    tid: str
    appid: str
    oid: str
    aud: str
    roles: list[str]
    exp: float | None
    nbf: float | None

    @classmethod
    def read(cls, claims: dict[str, Any]) -> _Claims:
        raw_roles = claims.get("roles")
        exp, nbf = claims.get("exp"), claims.get("nbf")
        return cls(tid=str(claims.get("tid", "")),
                   appid=str(claims.get("appid") or claims.get("azp") or ""),
                   oid=str(claims.get("oid", "")), aud=str(claims.get("aud", "")),
                   roles=[str(r) for r in raw_roles] if isinstance(raw_roles, list) else [],
                   exp=exp if isinstance(exp, int | float) else None,
                   nbf=nbf if isinstance(nbf, int | float) else None)

    def describe(self, now: float) -> str:
        lifetime = f"expires in {int((self.exp - now) // 60)} min" if self.exp else "no expiry"
        return (f"tenant {self.tid or '?'}, app {self.appid or '?'}, roles "
                f"{', '.join(self.roles) or 'none'}, audience {self.aud or '?'}, {lifetime}, "
                f"service principal object id {self.oid or '?'}")


def _wrong_claim(app_name: str, app: App, c: _Claims, now: float) -> tuple[str, str] | None:
    """(summary, fix) for a token from the wrong tenant, app or audience, or one outside its
    lifetime by this host's clock; None when those claims fit the config."""
    tenant = expected_tenant(app)
    if tenant and c.tid and c.tid.casefold() != tenant.casefold():
        return (f"The token is from tenant {c.tid}, but `apps.{app_name}` asks tenant {tenant}.",
                f"Set `apps.{app_name}.tenant` to the Directory (tenant) ID of the tenant "
                f"that holds the mailboxes, and check `apps.{app_name}.authority` (it "
                "overrides the tenant when set).")
    if c.appid and c.appid.casefold() != app.client_id.casefold():
        return (f"The token belongs to app {c.appid}, not to `apps.{app_name}.client_id` "
                f"({app.client_id}).",
                f"Check `apps.{app_name}.authority`: something other than Entra ID answers "
                "there. Remove the key to use login.microsoftonline.com.")
    if c.aud and c.aud not in expected_audiences(app):
        return (f"The token is for {c.aud}, but Exchange Online SMTP takes only tokens for "
                "https://outlook.office365.com.",
                f"Set `apps.{app_name}.scope` to https://outlook.office365.com/.default "
                "(or remove it: that is the default).")
    if c.exp is not None and c.exp <= now:
        stamp = datetime.fromtimestamp(c.exp, UTC)
        return (f"The token Entra just issued expired at {stamp:%Y-%m-%d %H:%M:%S} UTC by "
                "this host's clock, so this host's clock is ahead.",
                "Sync the clock: `timedatectl status`, and enable NTP "
                "(`timedatectl set-ntp true`).")
    if c.nbf is not None and c.nbf > now + CLOCK_SKEW:
        return ("The token is not valid yet by this host's clock, so this host's clock is "
                "behind.", "Sync the clock: `timedatectl status`, and enable NTP "
                           "(`timedatectl set-ntp true`).")
    return None


def check_claims(app_name: str, app: App, token: str, now: float | None = None, *,
                 largest_message: int = 0) -> ClaimsResult:
    """``largest_message``: the largest message a listener accepts (for a Graph app, whether
    the token needs Mail.ReadWrite too)."""
    now = time.time() if now is None else now
    # High Volume Email apps hold Mail.Send instead of SMTP.SendAsApp (MICROSOFT365.md §5).
    role = HVE_ROLE if app.hve else GRAPH_ROLE if app.transport == "graph" else SEND_ROLE
    try:
        claims = decode_claims(token)
    except NotAJwt as exc:
        check = Check("claims", Status.WARN, detail=f"cannot read the token's claims: {exc}",
                      summary="The token's claims could not be read, so doctor cannot check "
                              "tenant, role and audience; Exchange's answer below decides.")
        return ClaimsResult(check, {}, "", role_missing=False)
    shown = {k: claims[k] for k in SHOWN if k in claims}
    token_claims = _Claims.read(claims)
    oid, roles = token_claims.oid, token_claims.roles
    detail = token_claims.describe(now)
    wrong = _wrong_claim(app_name, app, token_claims, now)
    if wrong is not None:
        summary, fix = wrong
        return ClaimsResult(Check("claims", Status.FAIL, detail=detail, summary=summary, fix=fix),
                            shown, oid, role_missing=role not in roles)
    if role not in roles:
        # Not yet a failure: RBAC for Applications grants SMTP in Exchange, with no role in
        # the token. Exchange's answer at XOAUTH2 decides (see chain.resolve_role).
        check = Check("claims", Status.WARN, detail=detail,
                      summary=f"The token carries no {role} role. That is right only with "
                              "RBAC for Applications; the XOAUTH2 link tells.",
                      fix=role_fix(app_name, app))
        return ClaimsResult(check, shown, oid, role_missing=True)
    if app.transport == "graph" and GRAPH_DRAFT_ROLE not in roles \
            and large_messages_possible(app, largest_message):
        check = Check("claims", Status.WARN, detail=detail,
                      summary=f"The token carries {GRAPH_ROLE} but not {GRAPH_DRAFT_ROLE}: "
                              "messages too large for one sendMail request (over about "
                              f"{app.graph_request_limit * 3 // 4 // 1_000_000} MB; the "
                              f"listeners accept up to {largest_message // 1_000_000} MB) go "
                              f"as a draft with upload sessions, and Graph refuses drafts "
                              f"without {GRAPH_DRAFT_ROLE} (403), so they would stay queued.",
                      fix=graph_role_fix(app, roles=(GRAPH_DRAFT_ROLE,)))
        return ClaimsResult(check, shown, oid, role_missing=False)
    return ClaimsResult(Check("claims", Status.OK, detail=detail), shown, oid, role_missing=False)
