"""The Graph links of ``m365relay doctor`` for apps with ``transport: graph``: instead of TCP,
STARTTLS and XOAUTH2 to Exchange, one authenticated request to Microsoft Graph (reachability,
TLS, token accepted, mailbox exists), then the optional test message through sendMail."""

from __future__ import annotations

from relay.config.records import Account, App
from relay.diagnosis.errors import DeliveryError
from relay.doctor.report import Check, Status
from relay.tokens.provider import TokenProvider
from relay.upstream.graph import GraphConnection

GRAPH_ROLE = "Mail.Send"


def graph_role_fix(app: App, mailbox: str = "<mailbox>") -> str:
    return (
        f"Entra admin center > App registrations > {app.client_id} > API permissions > Add a "
        "permission > Microsoft Graph > Application permissions > Mail.Send, then 'Grant admin "
        "consent'. Or, with RBAC for Applications, in Exchange Online PowerShell:\n"
        f"  New-ManagementRoleAssignment -Role 'Application Mail.Send' -App {app.client_id} "
        f"-CustomResourceScope <management scope that includes {mailbox}>\n"
        "New consent can take a few minutes to reach new tokens; then run doctor again."
    )


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
