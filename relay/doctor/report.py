"""What ``m365relay doctor`` found, and how it is shown: a checklist for people, JSON for scripts.

The chain is fixed (:data:`LINKS`); a report lists every link of it for every account, so a
reader sees how far the chain held, where it broke, and what was never reached.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TextIO

EX_CONFIG = 78

# The chain, in the order it is walked. The first four links and the next two belong to the
# app (shared by its accounts); the last two to the account's mailbox.
LINKS: tuple[tuple[str, str], ...] = (
    ("credential", "credential readable"),
    ("token_endpoint", "token endpoint reachable"),
    ("token", "token acquired"),
    ("claims", "token grants SMTP"),
    ("upstream", "upstream reachable"),
    ("starttls", "STARTTLS ok"),
    ("xoauth2", "XOAUTH2 accepted"),
    ("graph", "Graph accepts the token"),  # instead of the three above, for transport: graph
    ("send", "test message sent"),
)
_SMTP_LINKS = frozenset({"upstream", "starttls", "xoauth2"})
TITLES = dict(LINKS)


class Status(Enum):
    OK = "ok"
    WARN = "warn"  # works, but needs attention (or cannot be judged until a later link)
    FAIL = "fail"
    SKIPPED = "skipped"  # not checked: an earlier link is broken, or not asked for


@dataclass(frozen=True)
class Check:
    link: str  # a key of TITLES; stable for scripts
    status: Status
    detail: str = ""  # what was seen; never a secret or a token
    summary: str = ""  # when not OK: what happened, in plain words
    fix: str = ""  # when not OK: what to do, ids filled in
    code: str = ""  # the upstream's code when it gave one: AADSTS7000215, 535 5.7.3

    @property
    def title(self) -> str:
        return TITLES.get(self.link, self.link)

    def to_json(self) -> dict[str, Any]:
        return {"link": self.link, "title": self.title, "status": self.status.value,
                "detail": self.detail, "code": self.code or None,
                "summary": self.summary or None, "fix": self.fix or None}


@dataclass
class AccountReport:
    account: str
    app: str
    mailbox: str
    checks: list[Check] = field(default_factory=list)
    claims: dict[str, Any] | None = None  # selected claims of the token, for scripts
    transport: str = "smtp"  # the app's; decides which upstream links the chain has

    @property
    def broken(self) -> Check | None:
        return next((c for c in self.checks if c.status is Status.FAIL), None)

    def complete(self, *, send_asked: bool) -> None:
        """List every link: those not reached are SKIPPED, so the checklist shows the chain."""
        seen = {c.link for c in self.checks}
        why = "not checked: an earlier link is broken" if self.broken else "not checked"
        skip = _SMTP_LINKS if self.transport == "graph" else {"graph"}
        for link in (link for link, _ in LINKS if link not in skip):
            if link in seen:
                continue
            reason = why if link != "send" or send_asked else "not asked for (use --send-to)"
            self.checks.append(Check(link, Status.SKIPPED, detail=reason))
        order = [link for link, _ in LINKS]
        self.checks.sort(key=lambda c: order.index(c.link))

    def to_json(self) -> dict[str, Any]:
        broken = self.broken
        return {"account": self.account, "app": self.app, "mailbox": self.mailbox,
                "ok": broken is None, "broken_link": broken.link if broken else None,
                "checks": [c.to_json() for c in self.checks], "token_claims": self.claims}


@dataclass
class Report:
    config_path: str
    config: Check  # link "config"
    problems: list[str] = field(default_factory=list)  # config problems by key path
    accounts: list[AccountReport] = field(default_factory=list)
    listeners: list[Check] = field(default_factory=list)  # TLS certificates the devices see

    @property
    def exit_code(self) -> int:
        if self.config.status is Status.FAIL:
            return EX_CONFIG
        failed = any(c.status is Status.FAIL for c in self.listeners)
        return 1 if failed or any(a.broken for a in self.accounts) else 0

    def to_json(self) -> dict[str, Any]:
        return {"config": {"path": self.config_path, "status": self.config.status.value,
                           "detail": self.config.detail, "problems": self.problems},
                "ok": self.exit_code == 0, "exit_code": self.exit_code,
                "listeners": [c.to_json() for c in self.listeners],
                "accounts": [a.to_json() for a in self.accounts]}


# --- rendering -----------------------------------------------------------------------------

_MARKS = {Status.OK: "✓", Status.WARN: "!", Status.FAIL: "✗", Status.SKIPPED: "·"}
# A service account or container may have an ASCII-only stdout; a crash there helps nobody.
_ASCII_MARKS = {Status.OK: "ok  ", Status.WARN: "warn", Status.FAIL: "FAIL",
                Status.SKIPPED: "--  "}
_WIDTH = max(len(title) for _, title in LINKS)


def _marks(stream: TextIO) -> dict[Status, str]:
    try:
        "✓✗·".encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return _ASCII_MARKS
    return _MARKS


def _indent(text: str, prefix: str) -> list[str]:
    return [prefix + line if line else "" for line in text.splitlines()]


def _advice(check: Check, prefix: str) -> list[str]:
    lines = []
    if check.summary:
        lines += _indent(f"What happened: {check.summary}", prefix)
    if check.fix:
        lines.append(f"{prefix}Fix:")
        lines += _indent(check.fix, prefix + "  ")
    return lines


def render_text(report: Report, stream: TextIO | None = None) -> str:
    marks = _marks(stream or sys.stdout)
    out = [f"m365relay doctor: {report.config_path}", ""]
    config = report.config
    out.append(f"{marks[config.status]} {'config valid':<{_WIDTH}}  {config.detail}")
    if config.status is Status.FAIL:
        out += [f"    - {p}" for p in report.problems]
        out += ["", *_advice(config, "    ")]
        return "\n".join(out) + "\n"
    for check in report.listeners:
        out.append(f"{marks[check.status]} {check.title:<{_WIDTH}}  {check.detail}".rstrip())
        if check.status is not Status.OK:
            out += [*_advice(check, "    "), ""]
    for account in report.accounts:
        out += ["", f"account {account.account}: mailbox {account.mailbox}, app {account.app}"]
        first = account.broken
        for check in account.checks:
            out.append(f"  {marks[check.status]} {check.title:<{_WIDTH}}  {check.detail}".rstrip())
            # The fix goes under the first broken link only: later failures follow from it.
            if check is first or check.status is Status.WARN:
                out += [*_advice(check, "      "), ""]
    out += ["", _verdict(report)]
    return "\n".join(out) + "\n"


def _verdict(report: Report) -> str:
    broken = [a for a in report.accounts if a.broken]
    listeners = [c.title for c in report.listeners if c.status is Status.FAIL]
    if listeners:
        return f"Broken: {', '.join(listeners)}. " + _verdict(Report(
            report.config_path, report.config, accounts=report.accounts))
    if not broken:
        return f"All links hold for {len(report.accounts)} account(s)."
    names = ", ".join(f"{a.account} at '{a.broken.title}'" for a in broken if a.broken)
    return f"{len(broken)} of {len(report.accounts)} account(s) have a broken link: {names}."


def render_json(report: Report) -> str:
    return json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"
