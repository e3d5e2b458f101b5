"""The shared part of the explanations: the :class:`Context` (ids to name in a fix), the
advice record each rule row holds, and its rendering (placeholders, redaction of anything
token-shaped). One module per stage holds the rules: :mod:`relay.diagnosis.smtp` (Exchange's
SMTP replies), :mod:`relay.diagnosis.entra` (the token endpoint), :mod:`relay.diagnosis.network`
(network and TLS exceptions) and :mod:`relay.diagnosis.graph` (Graph's error bodies).

Rules never quote tokens or secrets: only the server's reply text (cut short, with diagnostic
blobs and anything token-shaped removed) and config *names*.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.diagnosis.verdict import Explanation, Verdict

__all__ = ["Context", "Explanation", "Verdict"]


@dataclass(frozen=True)
class Context:
    mailbox: str = ""  # the mailbox we authenticated as (XOAUTH2 user=)
    sender: str = ""  # envelope/From sender
    app: str = ""  # m365relay config name of the app (config key path apps.<app>)
    client_id: str = ""
    tenant: str = ""
    smtp_host: str = ""  # the upstream host: smtp_host, or Graph's host with graph=True
    authority_host: str = ""  # token endpoint host[:port]; login.microsoftonline.com when unset
    smtp_port: int = 0  # 0: not known
    graph: bool = False  # the upstream is Microsoft Graph (HTTPS), not SMTP


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

