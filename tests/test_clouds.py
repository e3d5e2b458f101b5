"""Clouds and High Volume Email: which endpoints an app resolves to (config level only; no test
ever contacts a real Microsoft endpoint), and HVE's longer token-refresh margin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import base_config

from relay.config import clouds
from relay.config import records as config_mod
from relay.sandbox import Sandbox
from relay.tokens.provider import TokenProvider

GUID = "11111111-2222-3333-4444-555555555555"


def app(**keys: Any) -> config_mod.App:
    return config_mod.App.model_validate({"tenant": "contoso.example", "client_id": GUID,
                                          "client_secret": "s", **keys})


@pytest.mark.parametrize(("cloud", "authority", "smtp", "scope"), [
    ("global", "https://login.microsoftonline.com/contoso.example", "smtp.office365.com",
     "https://outlook.office365.com/.default"),
    ("usgov", "https://login.microsoftonline.us/contoso.example", "smtp.office365.us",
     "https://outlook.office365.us/.default"),
    ("usgov-dod", "https://login.microsoftonline.us/contoso.example", "smtp.office365.us",
     "https://outlook.office365.us/.default"),
    ("china", "https://login.partner.microsoftonline.cn/contoso.example",
     "smtp.partner.outlook.cn", "https://partner.outlook.cn/.default"),
])
def test_cloud_chooses_authority_smtp_host_and_scope(cloud: str, authority: str, smtp: str,
                                                     scope: str) -> None:
    resolved = app(cloud=cloud)
    assert (resolved.authority_url, resolved.smtp_host, resolved.smtp_port, resolved.scope) == \
        (authority, smtp, 587, scope)


def test_default_cloud_is_global() -> None:
    resolved = app()
    assert resolved.cloud == "global"
    assert resolved.smtp_host == "smtp.office365.com"
    assert resolved.scope == config_mod.EXCHANGE_SCOPE


def test_each_endpoint_is_overridable() -> None:
    resolved = app(cloud="china", authority="https://login.chinacloudapi.cn/t",
                   smtp_host="smtp.example.cn", smtp_port=465, scope="https://x.example/.default")
    assert resolved.authority_url == "https://login.chinacloudapi.cn/t"
    assert (resolved.smtp_host, resolved.smtp_port) == ("smtp.example.cn", 465)
    assert resolved.scope == "https://x.example/.default"
    # Overriding one key keeps the cloud's choice for the others.
    partial = app(cloud="usgov", scope="https://outlook.office365.com/.default")
    assert partial.smtp_host == "smtp.office365.us"
    assert partial.scope == "https://outlook.office365.com/.default"


def test_unknown_cloud_is_reported_by_key_path(tmp_path: Path) -> None:
    data = {"listeners": [{"name": "l"}], "spool": {"directory": str(tmp_path)},
            "apps": {"gov": {"tenant": "t", "client_id": GUID, "client_secret": "s",
                             "cloud": "gcc-high"}},
            "accounts": [{"name": "a", "app": "gov", "mailbox": "a@b.example",
                          "networks": ["10.0.0.0/8"]}]}
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.parse(data)
    assert any(p.startswith("apps.gov.cloud:") and "usgov" in p for p in info.value.problems)


def test_hve_defaults() -> None:
    resolved = app(hve=True)
    assert (resolved.smtp_host, resolved.smtp_port) == ("smtp.hve.mx.microsoft", 587)
    assert resolved.scope == clouds.HVE_SCOPE
    assert resolved.authority_url == "https://login.microsoftonline.com/contoso.example"
    assert app(hve=True, smtp_host="smtp-hve.office365.com").smtp_host == \
        "smtp-hve.office365.com"
    assert clouds.refresh_margin(600, hve=True) == clouds.HVE_REFRESH_MARGIN
    assert clouds.refresh_margin(1800, hve=True) == 1800
    assert clouds.refresh_margin(600, hve=False) == 600


async def test_hve_app_refreshes_its_token_earlier(sandbox: Sandbox, tmp_path: Path,
                                                   password_hash: str) -> None:
    data = base_config(sandbox, tmp_path, password_hash)
    plain = data["apps"]["contoso"]
    # The sandbox plays Exchange Online, so the HVE app keeps the sandbox's host and scope.
    hve = {**plain, "hve": True, "smtp_host": plain["smtp_host"],
           "scope": config_mod.EXCHANGE_SCOPE}
    data["apps"]["hve"] = hve
    config = config_mod.parse(data, base_dir=tmp_path)
    now = [1_000_000.0]
    provider = TokenProvider(config.apps, margin=600, clock=lambda: now[0])
    try:
        await provider.token("contoso")
        await provider.token("hve")
        # 3600 s tokens: past 3600 - 1200 but before 3600 - 600.
        now[0] += 2500
        await provider.token("contoso")
        await provider.token("hve")
        assert provider.stats("contoso") == (1, 0)
        assert provider.stats("hve") == (2, 0)
    finally:
        provider.close()


def test_doctor_accepts_mail_send_for_hve_apps() -> None:
    from relay.doctor.claims import check_claims
    from relay.doctor.report import Status
    from relay.sandbox.tokens import sign_hs256

    claims = {"aud": "https://outlook.office.com", "tid": "t", "appid": GUID,
              "roles": ["Mail.Send"], "exp": 2_000_000_000, "nbf": 0}
    token = sign_hs256(claims, b"k" * 32)
    hve = check_claims("bulk", app(hve=True, tenant="t"), token)
    assert hve.check.status is Status.OK, hve.check.summary
    assert not hve.role_missing
    plain = check_claims("bulk", app(tenant="t", scope="https://outlook.office.com/.default"),
                         token)
    assert plain.role_missing
    missing = check_claims("bulk", app(hve=True, tenant="t"),
                           sign_hs256({**claims, "roles": []}, b"k" * 32))
    assert missing.role_missing
    assert "Mail.Send" in missing.check.summary and "Mail.Send" in missing.check.fix
