"""Config: every problem reported at once with its key path; secrets from env or file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from relay.config import records as config_mod

GUID = "11111111-2222-3333-4444-555555555555"

GOOD = textwrap.dedent(f"""\
    listeners:
      - name: lan
        bind: 0.0.0.0:2525
        networks: [192.168.0.0/16]
    apps:
      contoso:
        tenant: contoso.onmicrosoft.com
        client_id: {GUID}
        client_secret: {{env: TEST_M365_SECRET}}
    accounts:
      - name: printers
        networks: [192.168.10.0/24]
        app: contoso
        mailbox: printers@contoso.com
    spool:
      directory: spool
    """)

BAD = textwrap.dedent("""\
    listeners:
      - name: lan
        bind: 0.0.0.0:99999
        tls: starttls
        networks: [192.168.0.0/16, not-a-network]
    apps:
      contoso:
        tenant: contoso.onmicrosoft.com
        client_id: not-a-guid
        client_secret: {env: SURELY_UNSET_M365_SECRET}
    accounts:
      - name: scanner
        username: scanner01
        pasword_hash: "$argon2id$..."
        app: fabrikam
        mailbox: scanner
      - name: scanner
        networks: [192.168.10.0/24]
        app: contoso
        mailbox: printers@contoso.com
    spool: {}
    """)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m365relay.yaml"
    path.write_text(text)
    return path


def test_good_config_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_M365_SECRET", "s3cret-value")
    config = config_mod.load(write(tmp_path, GOOD))
    app = config.apps["contoso"]
    assert app.client_secret is not None
    assert app.client_secret.value == "s3cret-value"
    assert "s3cret-value" not in repr(config)  # secrets never show in reprs or logs
    assert app.authority_url == "https://login.microsoftonline.com/contoso.onmicrosoft.com"
    assert app.smtp_host == "smtp.office365.com" and app.smtp_port == 587
    assert config.spool.directory == tmp_path / "spool"  # relative to the config file
    assert config.listeners[0].port == 2525
    assert config.delivery.connections_per_mailbox == 3
    with pytest.raises(Exception, match="frozen"):
        config.listeners[0].bind = "x"  # type: ignore[misc]


def test_every_problem_reported_with_key_path(tmp_path: Path) -> None:
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.load(write(tmp_path, BAD))
    problems = "\n".join(info.value.problems)
    for expected in (
        "listeners[0].bind:",
        "listeners[0].networks: 'not-a-network' is not an IP address",
        "apps.contoso.client_id: 'not-a-guid' is not a GUID",
        "apps.contoso.client_secret: environment variable SURELY_UNSET_M365_SECRET is not set",
        "accounts[0].app: no app named 'fabrikam'",
        "accounts[0].mailbox: 'scanner' is not an email address",
        "accounts[0].pasword_hash: unknown key (did you mean `password_hash`?)",
        "accounts[1].name: 'scanner' is already used by accounts[0]",
        "spool: set exactly one of `directory` (the file spool on this machine) and `postgres`",
    ):
        assert expected in problems, f"missing {expected!r} in:\n{problems}"


def test_secret_from_file_and_certificate_needs_its_key(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("from-a-file\n")
    (tmp_path / "cert.pem").write_text("x")
    text = GOOD.replace("{env: TEST_M365_SECRET}", "{file: secret}").replace(
        "bind: 0.0.0.0:2525", "bind: 0.0.0.0:2525\n    tls: starttls\n    certificate: cert.pem")
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.load(write(tmp_path, text))
    assert any(p.startswith("listeners[0]: `certificate` and `private_key` go together")
               for p in info.value.problems), info.value.problems
    # Neither: a self-signed certificate (relay/selfsigned.py), no problem at load.
    config = config_mod.load(write(tmp_path, text.replace("    certificate: cert.pem\n", "")))
    assert config.listeners[0].tls == "starttls" and config.listeners[0].certificate is None
    config = config_mod.load(write(tmp_path, GOOD.replace("{env: TEST_M365_SECRET}",
                                                          "{file: secret}")))
    secret = config.apps["contoso"].client_secret
    assert secret is not None and secret.value == "from-a-file"


def test_exactly_one_credential(tmp_path: Path) -> None:
    text = GOOD.replace("client_secret: {env: TEST_M365_SECRET}", "scope: x")
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.load(write(tmp_path, text))
    assert any(p.startswith("apps.contoso:") and "client_secret" in p
               for p in info.value.problems)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.load(write(tmp_path, "listeners:\n  - name: [unclosed\n"))
    assert "line " in info.value.problems[0]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_check_config_cli(tmp_path: Path) -> None:
    bad = run_cli("check-config", str(write(tmp_path, BAD)))
    assert bad.returncode == 78
    assert "accounts[0].mailbox" in bad.stderr and "apps.contoso.client_id" in bad.stderr

    (tmp_path / "secret").write_text("x")
    good = run_cli("check-config", str(write(tmp_path, GOOD.replace(
        "{env: TEST_M365_SECRET}", "{file: secret}"))))
    assert good.returncode == 0, good.stderr
    assert "OK" in good.stdout


def test_hash_password_cli_produces_a_verifiable_hash() -> None:
    from argon2 import PasswordHasher

    result = subprocess.run([sys.executable, "-m", "relay", "hash-password", "--stdin"],
                            input="printer-pass\n", capture_output=True, text=True, timeout=60,
                            check=True)
    hashed = result.stdout.strip()
    assert hashed.startswith("$argon2id$")
    assert PasswordHasher().verify(hashed, "printer-pass")
    assert "printer-pass" not in result.stdout
