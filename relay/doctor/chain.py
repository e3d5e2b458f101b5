"""Walk the chain from config to Exchange Online for each account; stop at the first broken link.

The app's links (credential, token endpoint, token, claims, upstream, STARTTLS) are walked once
per app by :mod:`relay.doctor.applinks` and shared by its accounts; XOAUTH2 and the test
message are per mailbox, here. The token and
the XOAUTH2 login go through the relay's own TokenProvider and UpstreamConnection, and every
upstream failure is explained by relay.diagnosis.explain, so doctor says what the relay would log.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from pathlib import Path

from relay.config import progname
from relay.config.commands import command
from relay.config.records import Account, Config
from relay.diagnosis.errors import DeliveryError
from relay.diagnosis.explain import Explanation, Verdict
from relay.doctor.applinks import AppLinks, AppResult, failed
from relay.doctor.claims import SEND_ROLE, role_fix
from relay.doctor.graphlink import graph_checks
from relay.doctor.report import AccountReport, Check, Status
from relay.doctor.signin import signin_checks
from relay.tokens.provider import TokenProvider
from relay.upstream.smtp import UpstreamConnection

_ENHANCED = re.compile(r"(?<![\w.])[245]\.\d{1,3}\.\d{1,3}(?![\w.])")
# relay.diagnosis.explain writes these where it cannot know the id; doctor knows it from the token.
_OBJECT_ID_PLACEHOLDERS = ("<enterprise app object id>", "<service principal id>")


class Doctor:
    def __init__(self, config: Config, *, timeout: float = 20.0,
                 send_to: str | None = None, config_path: Path | None = None) -> None:
        self.config = config
        self.timeout = timeout
        self.send_to = send_to
        self.tokens = TokenProvider(config.apps, margin=config.delivery.token_refresh_margin,
                                    timeout=timeout)
        self.tokens.use_delegated(config, config_path)
        self.config_path = config_path
        self._apps: dict[str, AppResult] = {}
        self._accepted: dict[str, list[str]] = {}  # app -> mailboxes Exchange let it use

    async def run(self, accounts: list[Account]) -> list[AccountReport]:
        try:
            reports = [await self._account(account) for account in accounts]
        finally:
            self.tokens.close()
        # Fix texts say "run doctor again" where they cannot know the config; name it here.
        again = (f"run `{command('doctor', config=self.config_path, program=progname.command())}`"
                 " again")
        for report in reports:
            self._narrow(report)
            report.checks = [replace(c, fix=c.fix.replace("run doctor again", again))
                             for c in report.checks]
        return reports

    # -- per account ------------------------------------------------------------------------

    async def _account(self, account: Account) -> AccountReport:
        report = AccountReport(account.name, account.app, account.mailbox,
                               transport=self.config.apps[account.app].transport)
        if self.config.apps[account.app].flow == "delegated":
            report.checks = await signin_checks(self.tokens, self.config.apps[account.app],
                                                account)
            if all(c.status is not Status.FAIL for c in report.checks):
                await self._mailbox(account, AppResult(), report)
            report.complete(send_asked=self.send_to is not None)
            return report
        if account.app not in self._apps:
            self._apps[account.app] = await AppLinks(self.config, self.tokens,
                                                     timeout=self.timeout).walk(account.app)
        result = self._apps[account.app]
        report.checks = list(result.checks)
        report.claims = result.claims
        if result.ok:
            await self._mailbox(account, result, report)
        report.complete(send_asked=self.send_to is not None)
        return report

    async def _mailbox(self, account: Account, result: AppResult, report: AccountReport) -> None:
        app = self.config.apps[account.app]
        if app.transport == "graph":
            report.checks += await graph_checks(
                self.tokens, account.app, app, account, timeout=self.timeout,
                send_to=self.send_to, message=None if self.send_to is None else
                _test_message(account, self.send_to, self.config.hostname))
            return
        conn = UpstreamConnection(app_name=account.app, app=app, mailbox=account.mailbox,
                                  tokens=self.tokens, timeout=self.timeout,
                                  local_hostname=self.config.hostname)
        try:
            login = await self._login(conn, result)
            report.checks.append(login)
            self._resolve_role(account, result, report, login)
            if login.status is Status.OK and self.send_to is not None:
                report.checks.append(await self._send(conn, account))
        finally:
            await conn.close()

    async def _login(self, conn: UpstreamConnection, result: AppResult) -> Check:
        try:
            await conn.login()
        except DeliveryError as exc:
            explanation = exc.explanation or Explanation(Verdict.DEFER_ADMIN, str(exc), "")
            fix = explanation.fix
            if result.object_id:
                for placeholder in _OBJECT_ID_PLACEHOLDERS:
                    fix = fix.replace(placeholder, result.object_id)
            code = ""
            if exc.code is not None:
                enhanced = _ENHANCED.search(str(exc).rsplit(f": {exc.code}", 1)[-1])
                code = f"{exc.code} {enhanced.group(0)}" if enhanced else str(exc.code)
            return Check("xoauth2", Status.FAIL, detail=str(exc), summary=explanation.summary,
                         fix=fix, code=code)
        self._accepted.setdefault(conn.app_name, []).append(conn.mailbox)
        return Check("xoauth2", Status.OK,
                     detail=f"signed in as {conn.mailbox} at {conn.relay}")

    def _resolve_role(self, account: Account, result: AppResult, report: AccountReport,
                      login: Check) -> None:
        """A token without SMTP.SendAsApp is broken unless RBAC for Applications grants SMTP;
        only Exchange's answer tells the two apart."""
        if not result.role_missing:
            return
        index = next(i for i, c in enumerate(report.checks) if c.link == "claims")
        claims = report.checks[index]
        app = self.config.apps[account.app]
        if login.status is Status.OK:
            report.checks[index] = Check(
                "claims", Status.OK,
                detail=f"{claims.detail} (no {SEND_ROLE} role, and Exchange accepted the "
                       "sign-in: RBAC for Applications grants it)")
        elif _token_refused(login):
            report.checks[index] = Check(
                "claims", Status.FAIL, detail=claims.detail, code=login.code,
                summary=f"The token carries no {SEND_ROLE} role, and Exchange Online refused "
                        f"it for {account.mailbox} ({login.code or 'AUTH failed'}): app "
                        f"{app.client_id} has no admin consent for {SEND_ROLE}, and no RBAC "
                        "for Applications role covers the mailbox.",
                fix=role_fix(account.app, app, account.mailbox))

    def _narrow(self, report: AccountReport) -> None:
        """Exchange says the same 535 5.7.3 for every sign-in problem; what doctor saw on the
        way there rules some causes out, so say which remain."""
        index = next((i for i, c in enumerate(report.checks) if c.link == "xoauth2"), None)
        if index is None or report.broken is not report.checks[index]:
            return
        login = report.checks[index]
        if not _token_refused(login):
            return
        result = self._apps[report.app]
        others = [m for m in self._accepted.get(report.app, []) if m != report.mailbox]
        app = self.config.apps[report.app]
        sp = result.object_id or "<service principal id>"
        claims_ok = any(c.link == "claims" and c.status is Status.OK for c in report.checks)
        if not (others or claims_ok):
            return
        if others:
            lead = (f"Exchange Online accepted app {app.client_id} for {others[0]}, so its "
                    "service principal is registered. What is missing is the app's permission "
                    f"on {report.mailbox}:\n  Add-MailboxPermission -Identity {report.mailbox} "
                    f"-User {sp} -AccessRights FullAccess\n(with RBAC for Applications: widen "
                    f"the management scope to include {report.mailbox}). Also check that "
                    f"{report.mailbox} is the mailbox's primary SMTP address. New permissions "
                    "can take up to an hour to apply.")
        else:
            lead = (f"The token is valid and carries {SEND_ROLE}, so Exchange Online refuses "
                    f"app {app.client_id} for {report.mailbox} itself: steps 1 and 2 below "
                    f"(service principal {sp} unknown to Exchange, or without permission on "
                    f"{report.mailbox}).")
        if result.object_id:
            lead += (f"\n{sp} is the token's oid claim: the Object ID of the app's Enterprise "
                     "application (service principal) in your tenant.")
        # The relay's advice starts with its own retry, which has already happened here.
        checklist = login.fix.split("\n", 1)[-1] if login.fix.startswith("m365relay fetches") \
            else login.fix
        report.checks[index] = replace(
            login, fix=f"{lead}\n\nAll causes of {login.code}, in order:\n{checklist}")

    async def _send(self, conn: UpstreamConnection, account: Account) -> Check:
        assert self.send_to is not None  # noqa: S101 - only called with --send-to
        data = _test_message(account, self.send_to, self.config.hostname)
        try:
            refused, reply = await conn.send(account.mailbox, [self.send_to], data)
        except DeliveryError as exc:
            return failed("send", exc.explanation or Explanation(Verdict.RETRY, str(exc), ""),
                           detail=str(exc), code=str(exc.code or ""))
        if refused:
            error = refused[self.send_to]
            return failed("send", error.explanation or Explanation(Verdict.BOUNCE, str(error),
                                                                     ""),
                           detail=str(error), code=str(error.code or ""))
        return Check("send", Status.OK, detail=f"to {self.send_to}: {reply}")

def _token_refused(login: Check) -> bool:
    """Exchange refused the token itself (535 5.7.3 or a bare 535), not a policy (5.7.139)."""
    return login.status is Status.FAIL and login.code.startswith("535") \
        and "5.7.139" not in login.code and "5.7.139" not in login.detail


def _test_message(account: Account, to: str, hostname: str | None) -> bytes:
    message = EmailMessage()
    message["From"] = f"m365relay doctor <{account.mailbox}>"
    message["To"] = to
    message["Subject"] = f"m365relay doctor: test message from account {account.name}"
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid("doctor", domain=hostname or account.mailbox.split("@")[1])
    message.set_content(
        f"This test message was sent by `m365relay doctor --send-to {to}`.\n\n"
        f"It went from m365relay to Exchange Online as mailbox {account.mailbox} (app "
        f"{account.app}), the same way the relay delivers mail from devices of account "
        f"{account.name}. If you can read it, that path works.\n")
    return message.as_bytes(policy=SMTP)
