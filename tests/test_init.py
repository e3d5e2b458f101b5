"""`m365relay init`: the real command (a subprocess, and on a pseudo-terminal), the config it
writes checked by `check-config` and delivering through the sandbox with the certificate it made,
re-runs that add without losing anything, and the setup scripts it writes."""

from __future__ import annotations

import asyncio
import grp
import os
import re
import select
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msal
import pytest
import yaml
from conftest import message, send
from pssyntax import grammar_errors, problems

from relay.config import records as config_mod
from relay.sandbox import Sandbox, SandboxApp
from relay.service.lifecycle import Relay
from relay.setup.targets import EXCHANGE_ONLINE_APP_ID, MICROSOFT_GRAPH_APP_ID

CLIENT_ID = "0f1e2d3c-4b5a-6978-8695-a4b3c2d1e0f9"
TENANT = "contoso.onmicrosoft.com"
MAILBOX = "scanner@contoso.example"
GUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


@pytest.fixture(autouse=True)
def _requests_honours_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    # requests lets these override Session.verify, which is how msal passes verify= (see
    # tests/test_sandbox.py).
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


def init(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "relay", "init", *args], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)


def passwords(output: str) -> dict[str, str]:
    return dict(re.findall(r"^  (\S+): username \S+  password (\S+)$", output, re.MULTILINE))


def basic(tmp_path: Path, *extra: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    path = tmp_path / "etc" / "m365relay.yaml"
    result = init("--config", str(path), "--tenant", TENANT, "--mailbox", MAILBOX,
                  "--spool", str(tmp_path / "spool"), "--non-interactive", *extra)
    return path, result


# -- the config: check-config, then a real relay delivering with the generated certificate ----


def sandbox_ready(data: dict[str, Any], box: Sandbox, tenant: str) -> dict[str, Any]:
    """The generated config, pointed at the sandbox instead of Microsoft (only endpoints)."""
    app = data["apps"]["contoso"]
    app.update(authority=box.authority(tenant), smtp_host=box.smtp_host,
               smtp_port=box.smtp_port, ca_file=str(box.ca_file))
    data["listeners"][0]["bind"] = "127.0.0.1:0"
    data["spool"]["min_free_space"] = 0
    data["delivery"] = {"pacing": {"messages_per_minute": 0}}
    return data


@pytest.mark.parametrize("transport", ["smtp", "graph"])
async def test_non_interactive_config_checks_and_delivers_with_the_generated_certificate(
        tmp_path: Path, transport: str) -> None:
    tenant = "contoso"  # the sandbox's authority path; a domain or GUID works the same way
    path = tmp_path / "etc" / "m365relay.yaml"
    result = init("--config", str(path), "--tenant", tenant, "--app", "contoso",
                  "--client-id", CLIENT_ID, "--mailbox", MAILBOX, "--device", "copier",
                  "--listen", "127.0.0.1:2587", "--tls", "starttls", "--transport", transport,
                  "--spool", str(tmp_path / "spool"), "--yes")
    checked = check_config(path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 listener(s), 1 app(s), 1 account(s)" in checked.stdout
    password = passwords(result.stdout)["copier"]
    folder = path.parent
    cert_pem = (folder / "contoso-app.crt").read_bytes()
    # The sandbox's Entra knows the app by the certificate init made, as Entra would after
    # setup-m365.ps1 uploaded it; it verifies every client assertion against it.
    app = SandboxApp(tenant=tenant, client_id=CLIENT_ID, certificate_pem=cert_pem,
                     mailboxes=frozenset({MAILBOX}))
    async with Sandbox(tmp_path / "sandbox", apps=(app,), graph=transport == "graph") as box:
        data = sandbox_ready(yaml.safe_load(path.read_text()), box, tenant)
        if transport == "graph":
            data["apps"]["contoso"]["graph_endpoint"] = box.graph_url
        relay = Relay(config_mod.parse(data, base_dir=folder))
        await relay.start()
        try:
            tls = ssl.create_default_context(cafile=str(folder / "listener.crt"))
            code, _ = await asyncio.to_thread(
                send, relay.addresses["devices"], message("init e2e"), login=("copier", password),
                starttls=tls, sender="copier@printers.example")
            if transport == "graph":
                assert box.graph is not None
                graph = await box.graph.wait_for_messages(1)
                delivered = [(m.client_id, m.auth_user) for m in graph]
            else:
                smtp = await box.exchange.wait_for_messages(1)
                delivered = [(m.client_id, m.auth_user) for m in smtp]
                assert b"Subject: init e2e" in smtp[0].data
        finally:
            await relay.stop(timeout=5)
        requests = box.entra.token_requests

    assert code == 250
    assert delivered == [(CLIENT_ID, MAILBOX)]
    assert "client_secret" not in requests[0] and requests[0]["client_assertion"] == "***"


async def test_the_fake_entra_refuses_an_assertion_from_another_certificate(
        tmp_path: Path) -> None:
    """The delivery above proves something: a key whose certificate is not registered fails."""
    first, _ = basic(tmp_path / "a", "--app", "contoso")
    second, _ = basic(tmp_path / "b", "--app", "contoso")
    registered = (first.parent / "contoso-app.crt").read_bytes()
    app = SandboxApp(tenant="contoso", client_id=CLIENT_ID, certificate_pem=registered)
    async with Sandbox(tmp_path / "sandbox", apps=(app,)) as box:

        def acquire(folder: Path) -> dict[str, Any]:
            client = msal.ConfidentialClientApplication(
                CLIENT_ID, authority=box.authority("contoso"), instance_discovery=False,
                verify=str(box.ca_file), client_credential={
                    "private_key": (folder / "contoso-app.key").read_text(),
                    "public_certificate": (folder / "contoso-app.crt").read_text()})
            result: dict[str, Any] = client.acquire_token_for_client(
                ["https://outlook.office365.com/.default"])
            return result

        good = await asyncio.to_thread(acquire, first.parent)
        bad = await asyncio.to_thread(acquire, second.parent)

    assert "access_token" in good, good
    assert bad.get("error") == "invalid_client" and 700027 in bad.get("error_codes", []), bad


# -- the interactive path, on a real pseudo-terminal -----------------------------------------


class Terminal:
    """A child process on a pty, read with a deadline (no sleeps)."""

    def __init__(self, argv: list[str]) -> None:
        master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True)
        os.close(slave)
        self.fd, self.output, self._seen = master, b"", 0

    def _read(self, deadline: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        self.output += chunk
        return bool(chunk)

    def expect(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.output[self._seen:]:
            if time.monotonic() > deadline or not self._read(deadline):
                raise AssertionError(f"{text!r} did not appear; the terminal showed:\n"
                                     f"{self.output.decode(errors='replace')}")
        self._seen = self.output.index(text.encode(), self._seen) + len(text)

    def answer(self, prompt: str, reply: str) -> None:
        self.expect(prompt)
        os.write(self.fd, reply.encode() + b"\r")

    def finish(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            pass
        os.close(self.fd)
        return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))


def test_interactive_init_on_a_terminal(tmp_path: Path) -> None:
    path = tmp_path / "m365relay.yaml"
    term = Terminal([sys.executable, "-m", "relay", "init", "--config", str(path),
                     "--spool", str(tmp_path / "spool")])
    term.answer("Microsoft 365 tenant", TENANT)
    term.answer("Cloud (global, usgov, usgov-dod, china) [global]: ", "")
    term.answer("Deliver over SMTP AUTH or Microsoft Graph (smtp, graph) [smtp]: ", "graph")
    term.answer("Mailbox(es) to send as", "not-an-address")
    term.expect("is not an email address")  # asked again, not a traceback
    term.expect("Mailbox(es) to send as")
    os.write(term.fd, f"{MAILBOX}\r".encode())
    term.answer("WITHOUT a password", "192.168.10.0/24")
    term.answer("generated password", "copier")
    term.answer("Other networks devices connect from", "")
    term.answer("TLS on the device port (none, starttls, implicit) [starttls]: ", "")
    term.answer("Address the relay listens on [0.0.0.0:587]: ", "")
    term.answer("Write these files? [Y/n] ", "y")
    code = term.finish()
    shown = term.output.decode(errors="replace")

    assert code == 0, shown
    assert check_config(path).returncode == 0
    data = yaml.safe_load(path.read_text())
    assert data["apps"]["contoso"]["transport"] == "graph"
    assert [a["name"] for a in data["accounts"]] == ["copier", "network-192.168.10.0-24"]
    assert data["listeners"][0]["tls"] == "starttls"
    password = passwords(shown.replace("\r\n", "\n"))["copier"]
    assert shown.count(password) == 1
    assert "Mail.ReadWrite" in (tmp_path / "setup-m365.ps1").read_text()


def test_missing_flags_are_named_without_a_terminal(tmp_path: Path) -> None:
    result = init("--config", str(tmp_path / "c.yaml"), "--non-interactive", check=False)

    assert result.returncode == 2
    assert "--tenant" in result.stderr and "--mailbox" in result.stderr
    assert not (tmp_path / "c.yaml").exists()
    assert list(tmp_path.iterdir()) == []  # no key made for a config never written


# -- re-running on an existing config ----------------------------------------------------------


def test_rerun_adds_a_mailbox_a_device_and_the_client_id_keeping_everything(
        tmp_path: Path) -> None:
    path, first = basic(tmp_path, "--trusted-network", "192.168.10.0/24")
    # What an admin adds by hand afterwards: comments, a top-level key, an account key.
    text = path.read_text().replace("accounts:", "# printers on the 2nd floor\nhostname: "
                                    "relay.contoso.example\n\naccounts:", 1)
    text = text.replace("from: rewrite", "from: rewrite\n    allowed_recipients: "
                        "['*@contoso.example']   # keep me", 1)
    path.write_text(text)
    path.chmod(0o640)
    before = yaml.safe_load(text)
    key_before = (path.parent / "contoso-app.key").read_bytes()

    second = init("--config", str(path), "--mailbox", "alerts@contoso.example", "--device",
                  f"copier={MAILBOX}", "--client-id", CLIENT_ID, "--yes")

    after_text = path.read_text()
    after = yaml.safe_load(after_text)
    old_lines = [line for line in text.splitlines() if "client_id:" not in line]
    new_lines = iter(after_text.splitlines())
    assert all(line in new_lines for line in old_lines)  # every line kept, in order
    assert after["accounts"][:len(before["accounts"])] == before["accounts"]
    assert [a["name"] for a in after["accounts"][len(before["accounts"]):]] == ["copier",
                                                                                "alerts"]
    assert after["apps"]["contoso"] == {**before["apps"]["contoso"], "client_id": CLIENT_ID}
    assert after["hostname"] == "relay.contoso.example"
    assert {k: v for k, v in after.items() if k not in {"accounts", "apps"}} == \
        {k: v for k, v in before.items() if k not in {"accounts", "apps"}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the admin's mode is kept
    assert (path.parent / "m365relay.yaml.bak").read_text() == text
    assert (path.parent / "contoso-app.key").read_bytes() == key_before  # same credential
    assert check_config(path).returncode == 0
    assert set(passwords(second.stdout)) == {"copier", "alerts"}
    assert passwords(first.stdout).keys().isdisjoint(passwords(second.stdout))
    script = (path.parent / "setup-m365.ps1").read_text()
    assert f"$Mailboxes = @('{MAILBOX}', 'alerts@contoso.example')" in script
    assert f"[string] $ClientId = '{CLIENT_ID}'" in script


def test_rerun_with_an_existing_name_or_nothing_to_add_changes_nothing(tmp_path: Path) -> None:
    path, _ = basic(tmp_path)
    text = path.read_text()

    taken = init("--config", str(path), "--device", "scanner", "--yes", check=False)
    nothing = init("--config", str(path), "--yes", check=False)

    assert taken.returncode == 2 and "exists already" in taken.stderr
    assert nothing.returncode == 2 and "nothing to add" in nothing.stderr
    assert path.read_text() == text


def test_rerun_refuses_a_layout_it_cannot_append_to(tmp_path: Path) -> None:
    path, _ = basic(tmp_path)
    data = yaml.safe_load(path.read_text())
    flow = yaml.safe_dump(data, default_flow_style=True)  # `accounts: [...]` on one line
    path.write_text(flow)

    result = init("--config", str(path), "--device", "copier", "--yes", check=False)

    assert result.returncode == 78
    assert "nothing was written" in result.stderr or "add the entry by hand" in result.stderr
    assert path.read_text() == flow


def test_a_second_app_is_added_beside_the_first(tmp_path: Path) -> None:
    path, _ = basic(tmp_path)
    init("--config", str(path), "--app", "fabrikam", "--tenant", "fabrikam.onmicrosoft.com",
         "--mailbox", "scan@fabrikam.example", "--cloud", "usgov", "--yes")

    data = yaml.safe_load(path.read_text())
    assert set(data["apps"]) == {"contoso", "fabrikam"}
    assert data["apps"]["fabrikam"]["cloud"] == "usgov"
    assert (path.parent / "fabrikam-app.key").exists()
    assert check_config(path).returncode == 0
    script = (path.parent / "setup-m365.ps1").read_text()
    assert "$Mailboxes = @('scan@fabrikam.example')" in script
    assert "$GraphEnvironment = 'USGov'" in script


# -- secrets ---------------------------------------------------------------------------------


def test_no_secret_is_readable_by_others_or_printed_twice(tmp_path: Path) -> None:
    path, result = basic(tmp_path, "--device", "copier", "--tls", "starttls")
    folder = path.parent
    output = result.stdout + result.stderr
    password = passwords(result.stdout)["copier"]

    for secret in (path, folder / "contoso-app.key", folder / "listener.key"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert output.count(password) == 1
    assert "PRIVATE KEY" not in output
    for item in folder.iterdir():
        body = item.read_bytes()
        assert password.encode() not in body, item  # only the argon2 hash is stored
        if item.name.startswith("setup-m365"):
            assert b"PRIVATE KEY" not in body
    from argon2 import PasswordHasher

    account = next(a for a in yaml.safe_load(path.read_text())["accounts"]
                   if a["name"] == "copier")
    assert PasswordHasher().verify(account["password_hash"], password)
    assert check_config(path).stderr == ""  # no permission warnings


# -- the setup scripts -----------------------------------------------------------------------


def guarded(script: str, look: str, change: str) -> None:
    """``look`` appears in the code, before the first ``change``: each step checks first."""
    script = re.sub(r"<#.*?#>", "", script, flags=re.DOTALL)  # code, not the citations
    script = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert look in script and change in script, (look, change)
    assert script.index(look) < script.index(change), f"{change} before {look}"


def scripts_for(tmp_path: Path, *extra: str) -> tuple[str, str, str]:
    path, result = basic(tmp_path, "--client-id", CLIENT_ID, *extra)
    folder = path.parent
    ps1 = (folder / "setup-m365.ps1").read_text()
    az = (folder / "setup-m365-az.sh").read_text()
    return ps1, az, result.stdout


def test_powershell_script_has_the_ids_and_checks_before_each_change(tmp_path: Path) -> None:
    ps1, _, output = scripts_for(tmp_path, "--device", "copier")
    thumbprint = re.search(r"SHA-1, as Entra shows it\): ([0-9A-F]{40})", output)
    assert thumbprint is not None

    for value in (TENANT, CLIENT_ID, MAILBOX, thumbprint.group(1), EXCHANGE_ONLINE_APP_ID,
                  "SMTP.SendAsApp", "$GraphEnvironment = 'Global'",
                  "$ExchangeEnvironment = 'O365Default'"):
        assert value in ps1, value
    guarded(ps1, "Get-MgApplication -Filter", "New-MgApplication -DisplayName")
    guarded(ps1, "$present", "Update-MgApplication -ApplicationId $app.Id -KeyCredentials")
    guarded(ps1, "Get-MgServicePrincipal -Filter \"appId eq '$($app.AppId)'\"",
            "New-MgServicePrincipal -AppId")
    guarded(ps1, "Get-MgServicePrincipalAppRoleAssignment -ServicePrincipalId",
            "New-MgServicePrincipalAppRoleAssignment -ServicePrincipalId")
    guarded(ps1, "Get-ServicePrincipal -ErrorAction", "New-ServicePrincipal -AppId")
    guarded(ps1, "Get-MailboxPermission -Identity", "Add-MailboxPermission -Identity")
    guarded(ps1, "Get-CASMailbox", "Set-CASMailbox -Identity")
    assert "-ObjectId $ObjectId" in ps1  # the enterprise application's object id
    assert "-SmtpClientAuthenticationDisabled $false" in ps1
    assert "-AccessRights FullAccess" in ps1
    assert "Connect-MgGraph -TenantId $TenantId -Environment $GraphEnvironment" in ps1
    assert "Connect-ExchangeOnline -ExchangeEnvironmentName $ExchangeEnvironment" in ps1
    # The role is found by its value; the only GUIDs are the documented well-known appIds,
    # the placeholder-free client id and none invented.
    assert "$_.Value -eq $permission.Value" in ps1
    assert set(GUID.findall(ps1)) == {EXCHANGE_ONLINE_APP_ID, MICROSOFT_GRAPH_APP_ID, CLIENT_ID}
    assert ps1.isascii()  # Windows PowerShell 5.1 reads a BOM-less file as ANSI
    assert problems(ps1) == []
    assert grammar_errors(ps1) == []


@pytest.mark.parametrize(("flags", "present", "absent"), [
    (("--transport", "graph"),
     ["Value = 'Mail.Send'; Name = 'Microsoft Graph'", "Value = 'Mail.ReadWrite'",
      "$NeedSmtpAuth = $false", "$NeedFullAccess = $false"], ["'SMTP.SendAsApp'"]),
    (("--hve",),
     ["$Hve = $true", "Value = 'Mail.Send'; Name = 'Office 365 Exchange Online'",
      "Get-HVEAccountSettings", "Add-HVEAppAccess -Identity $Account -AppIds $AppId"],
     ["'SMTP.SendAsApp'"]),
    (("--grant", "RBAC"),
     ["[string] $Grant = 'RBAC'", "$RbacRoles = @('Application SMTP.SendAsApp')",
      "New-ManagementRoleAssignment -Role $role -App $AppId -CustomResourceScope $scopeName",
      "-RecipientRestrictionFilter $filter"], []),
    (("--cloud", "usgov-dod"),
     ["$GraphEnvironment = 'USGovDoD'", "$ExchangeEnvironment = 'O365USGovDoD'"], []),
    (("--cloud", "china"), ["$GraphEnvironment = 'China'", "$ExchangeEnvironment = 'O365China'"],
     []),
])
def test_script_variants(tmp_path: Path, flags: tuple[str, ...], present: list[str],
                         absent: list[str]) -> None:
    ps1, az, _ = scripts_for(tmp_path, *flags)

    for text in present:
        assert text in ps1, text
    for text in absent:
        assert text not in ps1, text
    guarded(ps1, "Get-ManagementScope -Identity", "New-ManagementScope -Name")
    guarded(ps1, "Get-ManagementRoleAssignment -Role", "New-ManagementRoleAssignment -Role")
    guarded(ps1, "Get-HVEAccountSettings -Identity", "Add-HVEAppAccess -Identity")
    assert problems(ps1) == []
    assert grammar_errors(ps1) == []
    assert subprocess.run(["bash", "-n"], input=az, text=True, check=False).returncode == 0


def test_az_script_has_the_ids_and_checks_before_each_change(tmp_path: Path) -> None:
    _, az, _ = scripts_for(tmp_path, "--cloud", "usgov")

    for value in (TENANT, CLIENT_ID, "AZ_CLOUD='AzureUSGovernment'", EXCHANGE_ONLINE_APP_ID,
                  'PERMISSIONS="${EXO_APP_ID}=SMTP.SendAsApp"', "BEGIN CERTIFICATE"):
        assert value in az, value
    guarded(az, "az ad app list --filter", "az ad app create")
    guarded(az, "az ad app credential list", "az ad app credential reset")
    guarded(az, "az ad sp list --filter \"appId eq '$APP_ID'\"", "az ad sp create")
    guarded(az, "az ad app permission list", "az ad app permission add")
    guarded(az, "az rest --method GET", "az rest --method POST")
    assert "appRoles[?value=='$value'" in az  # the role by its value
    assert "setup-m365.ps1\" -ExchangeOnly" in az
    assert set(GUID.findall(az)) == {EXCHANGE_ONLINE_APP_ID, MICROSOFT_GRAPH_APP_ID, CLIENT_ID}
    assert subprocess.run(["bash", "-n"], input=az, text=True, check=False).returncode == 0
    assert os.access(tmp_path / "etc" / "setup-m365-az.sh", os.X_OK)


@pytest.mark.parametrize("broken", [
    "if ($a) { Write-Host 'x'\n",  # a brace never closed
    "Write-Host 'unterminated\n",
    "$x = @'\nnever closed\n",
    "Connect-MgGraph `  \n    -NoWelcome\n",  # a space after the backtick ends the command
    "foo(]\n",
])
def test_the_syntax_checks_catch_broken_powershell(broken: str) -> None:
    assert problems(broken)
    if "`" not in broken:  # the grammar takes a dangling backtick as an escape
        assert grammar_errors(broken)


def test_group_gets_read_access_to_secrets_and_keeps_it_on_a_rerun(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getegid()).gr_name if os.geteuid() else "nogroup"
    gid = grp.getgrnam(group).gr_gid
    path, _ = basic(tmp_path, "--group", group)
    key = path.parent / "contoso-app.key"

    for item in (path, key):
        assert (stat.S_IMODE(item.stat().st_mode), item.stat().st_gid) == (0o640, gid), item
    init("--config", str(path), "--device", "copier", "--yes")
    assert (stat.S_IMODE(path.stat().st_mode), path.stat().st_gid) == (0o640, gid)


@pytest.mark.parametrize(("flags", "expected"), [
    (("--tls-cert", "x.pem"), "--tls-cert and --tls-key go together"),
    (("--hve", "--transport", "graph"), "--hve sends over SMTP"),
    (("--group", "no-such-group-here"), "no such group"),
])
def test_contradicting_flags_are_refused(tmp_path: Path, flags: tuple[str, ...],
                                         expected: str) -> None:
    path = tmp_path / "c.yaml"
    result = init("--config", str(path), "--tenant", TENANT, "--mailbox", MAILBOX, "-y", *flags,
                  check=False)

    assert result.returncode == 2 and expected in result.stderr
    assert not path.exists()


@pytest.mark.parametrize(("flags", "expected"), [
    (("--cloud", "china"), "apps.contoso.cloud is 'global'"),
    (("--tenant", "fabrikam.onmicrosoft.com"), "apps.contoso.tenant is"),
    (("--listen", "0.0.0.0:2525"), "--listen: init writes listeners"),
])
def test_an_existing_config_is_not_silently_changed(tmp_path: Path, flags: tuple[str, ...],
                                                    expected: str) -> None:
    path, _ = basic(tmp_path)
    text = path.read_text()

    result = init("--config", str(path), *flags, "--device", "copier", "-y", check=False)

    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert path.read_text() == text


def test_devices_without_tls_get_cleartext_auth_for_their_networks_only(tmp_path: Path) -> None:
    path, _ = basic(tmp_path, "--device", "copier", "--tls", "none", "--network",
                    "192.168.20.0/24")

    listener = yaml.safe_load(path.read_text())["listeners"][0]
    assert listener["tls"] == "none" and listener["bind"] == "0.0.0.0:25"
    assert listener["cleartext_auth_networks"] == ["192.168.20.0/24"]
    assert check_config(path).returncode == 0


def test_interactive_rerun_asks_what_to_add(tmp_path: Path) -> None:
    path, _ = basic(tmp_path)
    term = Terminal([sys.executable, "-m", "relay", "init", "--config", str(path)])
    term.answer("Mailbox(es) to add, comma-separated: ", "alerts@contoso.example")
    term.answer("WITHOUT a password", "")
    term.answer("generated password", "")
    term.answer("Write these files? [Y/n] ", "")
    code = term.finish()

    assert code == 0, term.output.decode(errors="replace")
    names = [a["name"] for a in yaml.safe_load(path.read_text())["accounts"]]
    assert names == ["scanner", "alerts"]
    assert check_config(path).returncode == 0


def test_doctor_accepts_the_generated_credential_and_shows_the_same_thumbprint(
        tmp_path: Path) -> None:
    from relay.doctor.credential import check_credential
    from relay.doctor.report import Status

    path, result = basic(tmp_path)
    printed = re.search(r"SHA-1, as Entra shows it\): ([0-9A-F]{40})", result.stdout)
    config = config_mod.load(path)

    check, _ = check_credential("contoso", config.apps["contoso"])

    assert check.status is Status.OK, check.summary
    assert printed is not None and printed.group(1) in check.detail.upper().replace(":", "")
    assert "RSA 2048-bit key matches" in check.detail


def test_the_scripts_know_every_cloud_the_config_accepts() -> None:
    from relay.config.clouds import CLOUDS as CONFIG_CLOUDS
    from relay.setup.answers import CLOUD_NAMES
    from relay.setup.targets import CLOUDS as SCRIPT_CLOUDS

    assert set(SCRIPT_CLOUDS) == set(CONFIG_CLOUDS) == set(CLOUD_NAMES)


def test_a_terminal_with_every_required_flag_is_not_asked_anything(tmp_path: Path) -> None:
    path = tmp_path / "m365relay.yaml"
    term = Terminal([sys.executable, "-m", "relay", "init", "--config", str(path),
                     "--tenant", TENANT, "--mailbox", MAILBOX, "--spool", str(tmp_path / "s")])
    code = term.finish()
    shown = term.output.decode(errors="replace")

    assert code == 0, shown
    assert shown.lstrip().startswith("Wrote"), shown  # no question came first
    assert check_config(path).returncode == 0
