"""Doctor's links for `flow: delegated` apps: is there a stored sign-in, and does it refresh?

App-only checks (certificate files, SMTP.SendAsApp role) do not apply to a person's sign-in,
so these replace the credential/token/claims links; upstream and XOAUTH2 run as usual.
"""

from __future__ import annotations

import re

from relay.config.records import Account, App
from relay.diagnosis.errors import TokenError
from relay.doctor.report import Check, Status
from relay.tokens.provider import TokenProvider

_AADSTS = re.compile(r"AADSTS\d+")


async def signin_checks(tokens: TokenProvider, app: App, account: Account) -> list[Check]:
    kind = "confidential client (client secret)" if app.client_secret else "public client"
    checks = [Check("credential", Status.OK, detail=f"delegated sign-in, {kind}")]
    assert tokens.delegated is not None  # noqa: S101 - Doctor enables delegated tokens
    status = next(s for s in tokens.delegated.statuses() if s.account == account.name)
    if not status.signed_in:
        checks.append(Check(
            "token", Status.FAIL, detail="no stored sign-in",
            summary=f"Account {account.name} ({account.mailbox}) has not signed in yet.",
            fix=f"Run `{status.login_command}` as the relay's user and follow the printed "
                "instructions (any browser, on any device)."))
        return checks
    try:
        await tokens.token(account.app, account.mailbox)
    except TokenError as exc:
        explanation = exc.explanation
        checks.append(Check(
            "token", Status.FAIL, detail=f"from {app.authority_url}",
            summary=explanation.summary if explanation else str(exc),
            fix=f"Run `{status.login_command}` to sign in again; queued mail is delivered "
                "afterwards without a restart.",
            code=found.group(0) if (found := _AADSTS.search(str(exc))) else ""))
        return checks
    checks.append(Check("token", Status.OK,
                        detail=f"refreshed the stored sign-in of {account.mailbox} "
                               f"(re-sign-in: `{status.login_command}`)"))
    return checks
