"""Per-cloud endpoints: which authority host, SMTP host and token scope an app uses.

Values come from MICROSOFT365.md §5. Those marked UNVERIFIED there are inferred, not read in a
Microsoft document, so every one is overridable per app (`authority`, `smtp_host`, `smtp_port`,
`scope`) and the README says which.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

CloudName = Literal["global", "usgov", "usgov-dod", "china"]


@dataclass(frozen=True)
class Endpoints:
    authority_host: str
    smtp_host: str
    smtp_port: int
    scope: str


CLOUDS: dict[str, Endpoints] = {
    "global": Endpoints("login.microsoftonline.com", "smtp.office365.com", 587,
                        "https://outlook.office365.com/.default"),
    # GCC High and DoD share hosts; the scope is UNVERIFIED (inferred from the mailbox host).
    "usgov": Endpoints("login.microsoftonline.us", "smtp.office365.us", 587,
                       "https://outlook.office365.us/.default"),
    "usgov-dod": Endpoints("login.microsoftonline.us", "smtp.office365.us", 587,
                           "https://outlook.office365.us/.default"),
    # 21Vianet; the scope is UNVERIFIED (email-oauth2-proxy uses this resource).
    "china": Endpoints("login.partner.microsoftonline.cn", "smtp.partner.outlook.cn", 587,
                       "https://partner.outlook.cn/.default"),
}

# High Volume Email: smtp.hve.mx.microsoft is the recommended host (smtp-hve.office365.com is
# to be deprecated). The scope is UNVERIFIED: one Microsoft page excerpt names this one.
HVE_SMTP_HOST = "smtp.hve.mx.microsoft"
HVE_SMTP_PORT = 587
HVE_SCOPE = "https://outlook.office.com/.default"
HVE_ROLE = "Mail.Send"
# HVE tokens are refreshed earlier: a bulk run should never meet an expiring token mid-burst.
HVE_REFRESH_MARGIN = 1200.0


def endpoints(cloud: str, *, hve: bool = False) -> Endpoints:
    base = CLOUDS[cloud]
    if hve:
        return Endpoints(base.authority_host, HVE_SMTP_HOST, HVE_SMTP_PORT, HVE_SCOPE)
    return base


def fill_defaults(data: Any) -> Any:
    """Raw app keys with ``smtp_host``, ``smtp_port`` and ``scope`` taken from the cloud (and
    HVE) when the config does not set them; anything malformed is left for validation."""
    if not isinstance(data, Mapping):
        return data
    cloud, hve = data.get("cloud", "global"), data.get("hve", False)
    if cloud not in CLOUDS or not isinstance(hve, bool):
        return data
    chosen = endpoints(str(cloud), hve=hve)
    out = dict(data)
    out.setdefault("smtp_host", chosen.smtp_host)
    out.setdefault("smtp_port", chosen.smtp_port)
    out.setdefault("scope", chosen.scope)
    return out


def refresh_margin(margin: float, *, hve: bool) -> float:
    return max(margin, HVE_REFRESH_MARGIN) if hve else margin
