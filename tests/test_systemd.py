"""The systemd unit: systemd's own checks (verify, security score) and its claims about the relay.

These run systemd's tools on the files; scripts/setup installs them (Debian package `systemd`).
Without them the tests fail rather than skip, so a CI machine without them cannot pass silently.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from relay import cli

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "m365relay.service"
SYSUSERS = ROOT / "systemd" / "m365relay.sysusers"
TMPFILES = ROOT / "systemd" / "m365relay.tmpfiles"
MAX_EXPOSURE = 1.5
INSTALLED_BINARY = "/opt/m365relay/bin/m365relay"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; it comes with Debian's `systemd` package, which "
                    "scripts/setup installs (apt-get install systemd)")
    return path


def service_section(path: Path = UNIT) -> dict[str, list[str]]:
    """Key -> values of [Service], in order (keys such as SystemCallFilter= repeat)."""
    values: dict[str, list[str]] = defaultdict(list)
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            values[key].append(value)
    return values


def one(key: str) -> str:
    found = service_section()[key]
    assert len(found) == 1, f"{key}= appears {len(found)} times"
    return found[0]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    # verify insists that ExecStart's binary exists: point it at this checkout's console script.
    binary = Path(sys.executable).parent / "m365relay"
    assert binary.exists(), "run scripts/setup to install the m365relay console script"
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_BINARY} " in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={binary} "))
    result = run(analyze, "verify", "--man=no", str(copy))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown or misspelt keys are only warnings ("Unknown key ..., ignoring"), exit code 0.
    ours = [line for line in output.splitlines() if UNIT.name in line]
    assert not ours, "\n".join(ours)


def test_security_exposure_at_most_1_5() -> None:
    analyze = tool("systemd-analyze")
    result = run(analyze, "security", "--offline=true", "--no-pager", str(UNIT))
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"no exposure level in the output:\n{result.stdout}{result.stderr}"
    exposure = float(match.group(1))
    failing = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    assert exposure <= MAX_EXPOSURE, (
        f"exposure {exposure} > {MAX_EXPOSURE}; open items:\n" + "\n".join(failing))


def test_unit_matches_the_relay() -> None:
    argv = shlex.split(one("ExecStart"))
    assert argv[0] == INSTALLED_BINARY
    args = cli.build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    assert str(args.config) == "/etc/m365relay/m365relay.yaml"
    assert one("ConfigurationDirectory") == "m365relay"
    # systemd's SIGKILL must come after the relay's own drain deadline, not cut it short.
    stop = float(one("TimeoutStopSec").removesuffix("s"))
    assert args.shutdown_timeout < stop <= args.shutdown_timeout + 30
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Restart") == "on-failure"
    assert one("RestartPreventExitStatus") == str(cli.EX_CONFIG)
    assert one("CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert one("AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one("User") == "m365relay"
    assert one("ReadWritePaths") == "/var/spool/m365relay"


def test_sysusers_and_tmpfiles_create_the_user_and_spool(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = run(tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS))
    assert result.returncode == 0, result.stderr
    users = {line.split(":")[0]: line.split(":") for line in
             (tmp_path / "etc" / "passwd").read_text().splitlines()}
    assert users["m365relay"][6].endswith("nologin")
    uid = int(users["m365relay"][2])
    result = run(tool("systemd-tmpfiles"), f"--root={tmp_path}", "--create", str(TMPFILES))
    assert result.returncode == 0, result.stderr
    spool = tmp_path / "var" / "spool" / "m365relay"
    assert spool.stat().st_uid == uid
    assert spool.stat().st_mode & 0o777 == 0o750


def unit_writable_paths(values: dict[str, list[str]]) -> list[Path]:
    """What the unit lets the relay write under ProtectSystem=strict (systemd.exec(5))."""
    assert values["ProtectSystem"] == ["strict"], "the rest assumes a read-only file system"
    paths = [Path(p.lstrip("-+")) for v in values["ReadWritePaths"] for p in v.split()]
    for key, root in (("StateDirectory", "/var/lib"), ("CacheDirectory", "/var/cache"),
                      ("LogsDirectory", "/var/log"), ("RuntimeDirectory", "/run")):
        paths += [Path(root) / name for v in values[key] for name in v.split()]
    return paths


def config_writable_paths(path: Path) -> dict[str, Path]:
    """Key path -> directory the relay writes, for one shipped config."""
    data = yaml.safe_load(path.read_text())
    found = {"spool.directory": data["spool"]["directory"]}
    if data.get("token_store"):
        found["token_store.directory"] = data["token_store"]["directory"]
    return {key: (path.parent / value).resolve() if not Path(value).is_absolute()
            else Path(value) for key, value in found.items()}


def test_every_path_the_example_configs_write_is_writable_under_the_unit(
        tmp_path: Path) -> None:
    writable = unit_writable_paths(service_section())
    assert Path("/var/lib/m365relay") in writable and Path("/var/spool/m365relay") in writable
    configs = sorted((ROOT / "config").glob("*.yaml"))
    assert {c.name for c in configs} >= {"m365relay.example.yaml",
                                         "outlook-personal.example.yaml"}
    checked = 0
    for config in configs:
        for key, path in config_writable_paths(config).items():
            if config.name == "demo.yaml":  # runs from a checkout, never under the unit
                assert ROOT in path.parents, f"{config.name}: {key} {path} leaves the checkout"
                continue
            assert any(path == w or w in path.parents for w in writable), (
                f"{config.name}: {key} {path} is not writable under {UNIT.name} (writable: "
                f"{', '.join(map(str, writable))}); add it to ReadWritePaths= or move it")
            checked += 1
    assert checked >= 3
    # ... and what the unit makes writable, the tmpfiles entry creates for `login` beforehand.
    (tmp_path / "etc").mkdir()
    assert run(tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS)).returncode == 0
    result = run(tool("systemd-tmpfiles"), f"--root={tmp_path}", "--create", str(TMPFILES))
    assert result.returncode == 0, result.stderr
    tokens = tmp_path / "var" / "lib" / "m365relay" / "tokens"
    assert tokens.is_dir() and tokens.stat().st_mode & 0o777 == 0o700
    readme = (ROOT / "README.md").read_text()
    assert "directory: /var/lib/m365relay/tokens" in readme
