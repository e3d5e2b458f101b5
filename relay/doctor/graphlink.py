"""The Graph links of ``m365relay doctor`` for apps with ``transport: graph``: instead of TCP,
STARTTLS and XOAUTH2 to Exchange, one authenticated request to Microsoft Graph (reachability,
TLS, token accepted, mailbox exists), then the optional test message through sendMail."""

from __future__ import annotations

from relay.config.records import Account, App
from relay.diagnosis.errors import DeliveryError
from relay.doctor.report import Check, Status
from relay.tokens.provider import TokenProvider
from relay.upstream.graph import GraphConnection

GRAPH_ROLE = "Mail.Send"  # sendMail and messages/{id}/send
# Drafts, attachments and upload sessions: the path of messages too large for one sendMail
# (Graph's permission tables; MICROSOFT365.md §6).
GRAPH_DRAFT_ROLE = "Mail.ReadWrite"


def graph_role_fix(app: App, mailbox: str = "<mailbox>",
                   roles: tuple[str, ...] = (GRAPH_ROLE, GRAPH_DRAFT_ROLE)) -> str:
    names = " and ".join(roles)
    rbac = "".join(
        f"  New-ManagementRoleAssignment -Role 'Application {role}' -App {app.client_id} "
        f"-CustomResourceScope <management scope that includes {mailbox}>\n" for role in roles)
    return (
        f"Entra admin center > App registrations > {app.client_id} > API permissions > Add a "
        f"permission > Microsoft Graph > Application permissions > {names}, then 'Grant admin "
        "consent' (Mail.Send sends through sendMail; messages over about 3 MB go as a draft "
        "with upload sessions, which needs Mail.ReadWrite). Or, with RBAC for Applications, in "
        f"Exchange Online PowerShell:\n{rbac}"
        "New consent can take a few minutes to reach new tokens; then run doctor again."
    )


def large_messages_possible(app: App, largest_message: int) -> bool:
    """Whether a message the listeners accept can be too large for one sendMail request
    (its base64 is about 4/3 of it), so it takes the draft path that needs Mail.ReadWrite."""
    return (largest_message + 2) // 3 * 4 > app.graph_request_limit


async def graph_checks(tokens: TokenProvider, app_name: str, app: App, account: Account, *,
                       timeout: float, send_to: str | None, message: bytes | None
                       ) -> list[Check]:
    conn = GraphConnection(app_name=app_name, app=app, mailbox=account.mailbox, tokens=tokens,
                           timeout=timeout)
    try:
        try:
            await conn.login()
        except DeliveryError as exc:
            explanation = exc.explanation
            return [Check("graph", Status.FAIL, detail=str(exc),
                          summary=explanation.summary if explanation else str(exc),
                          fix=explanation.fix if explanation else "",
                          code=str(exc.code or ""))]
        checks = [Check("graph", Status.OK,
                        detail=f"{app.graph_endpoint} accepted the token for {account.mailbox} "
                               "(only --send-to proves Mail.Send itself)")]
        if send_to is not None and message is not None:
            try:
                _, reply = await conn.send(account.mailbox, [send_to], message)
            except DeliveryError as exc:
                explanation = exc.explanation
                checks.append(Check("send", Status.FAIL, detail=str(exc),
                                    summary=explanation.summary if explanation else str(exc),
                                    fix=explanation.fix if explanation else "",
                                    code=str(exc.code or "")))
            else:
                checks.append(Check("send", Status.OK, detail=f"to {send_to}: {reply}"))
        return checks
    finally:
        await conn.close()
