"""The value types of the configuration: how one YAML value becomes a typed, checked one
(durations, sizes, networks, addresses, secrets from env or file, paths relative to the config
file). :mod:`relay.config.records` builds the sections from these."""

from __future__ import annotations

import ipaddress
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.config import progname
from relay.config.check import (
    Check,
    Failed,
    Run,
    integer,
    mapping,
    plain,
    text,
    then,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
EXCHANGE_SCOPE = "https://outlook.office365.com/.default"
# Delegated (user) sign-in: msal adds offline_access itself and refuses it in scope lists.
DELEGATED_SCOPE = "https://outlook.office.com/SMTP.Send"
# Personal Outlook.com/Hotmail SMTP (MICROSOFT365.md §10, [P]: configurable via smtp_host).
CONSUMER_SMTP_HOST = "smtp-mail.outlook.com"
GRAPH_ENDPOINT = "https://graph.microsoft.com"
# Microsoft Graph per `cloud` (MICROSOFT365.md §6 names graph.microsoft.us for GCC High; DoD
# and 21Vianet hosts are UNVERIFIED, from Microsoft's national cloud deployment list).
_GRAPH_CLOUDS = {"global": GRAPH_ENDPOINT, "usgov": "https://graph.microsoft.us",
                 "usgov-dod": "https://dod-graph.microsoft.us",
                 "china": "https://microsoftgraph.chinacloudapi.cn"}
_EMAIL = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+\.[^@\s<>\"]+$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?i?b?)\s*$", re.IGNORECASE)


# --- value types ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Secret:
    """A secret value resolved at load time; repr and str never show it."""

    value: str
    source: str  # "inline", "env:NAME" or "file:PATH": safe to show in messages

    def __repr__(self) -> str:
        return f"Secret({self.source})"

    __str__ = __repr__


def _base_dir(run: Run) -> Path:
    return Path(run.context.get("base_dir", "."))


def _resolve_path(value: Any, run: Run) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise ValueError("expected a file path")
    path = Path(str(value)).expanduser()
    # Relative paths are relative to the config file, so a config works from any cwd.
    return path if path.is_absolute() else _base_dir(run) / path


def _secret(value: Any, run: Run) -> Secret:
    if isinstance(value, Secret):
        return value
    if isinstance(value, str):
        if not value:
            raise ValueError("is empty")
        return Secret(value, "inline")
    if isinstance(value, Mapping) and len(value) == 1:
        (kind, ref), = value.items()
        if kind == "env" and isinstance(ref, str):
            found = os.environ.get(ref)
            if not found:
                raise ValueError(f"environment variable {ref} is not set or empty; export it "
                                 "in the service's environment (e.g. systemd EnvironmentFile=)")
            return Secret(found, f"env:{ref}")
        if kind == "file" and isinstance(ref, str):
            path = _resolve_path(ref, run)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read secret file {path}: {exc.strerror}; check the path "
                                 f"and that the relay's user may read it{_sandbox_hint(path)}"
                                 ) from None
            # Files written by editors and `echo` end with a newline that is not part of a secret.
            text = text.strip() if "BEGIN" not in text else text
            if not text.strip():
                raise ValueError(f"secret file {path} is empty")
            return Secret(text, f"file:{path}")
    raise ValueError("expected a string, {env: VARIABLE} or {file: PATH}")


def _readable(path: Path, run: Run) -> Path:
    if not os.access(path, os.R_OK):
        raise ValueError(f"cannot read {path}; check the path and its permissions"
                         f"{_sandbox_hint(path)}")
    return path


# What `m365relay sandbox` writes as it starts (relay/sandbox/core.py): a config naming one
# that is missing is most often a demo config used before the sandbox was started.
_SANDBOX_FILES = frozenset({"demo-client-secret", "ca.pem"})


def _sandbox_hint(path: Path) -> str:
    if path.name not in _SANDBOX_FILES or path.exists():
        return ""
    try:
        folder = path.parent.resolve().relative_to(Path.cwd())
    except ValueError:
        folder = path.parent
    return (f". If it is the sandbox's, start the sandbox first (`{progname.command()} sandbox "
            f"--dir {folder}`, in its own terminal): it writes this file as it starts")


def _duration(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration: seconds, or a number with s, m, h or d (e.g. 5m)")
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def _size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        unit = m.group(2).lower()[:1]
        size = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]
    else:
        raise ValueError("expected a size in bytes, or a number with KB, MB or GB (e.g. 35MB)")
    if size < 0:
        raise ValueError("must not be negative")
    return size


def _networks(value: Any) -> tuple[IPNetwork, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        # Reported with the key path like every other problem, so a ValueError.
        raise ValueError("expected a list of networks such as [192.168.1.0/24, 10.0.0.5]")  # noqa: TRY004
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network (CIDR)") from None
    return tuple(out)


def _email(value: Any) -> str:
    if not isinstance(value, str) or not _EMAIL.match(value):
        raise ValueError(f"{value!r} is not an email address")
    return value


_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")
_DOMAIN = re.compile(r"^\*@[^@\s<>*]+\.[^@\s<>*]+$")


def _patterns(value: Any) -> tuple[str, ...]:
    """``allowed_from`` / ``allowed_recipients``: matched by relay.policy.identity."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError("expected a list of addresses or `*@domain` patterns")  # noqa: TRY004 - the config reports ValueError per key
    out = []
    for item in items:
        if not isinstance(item, str) or not (_ADDRESS.match(item) or _DOMAIN.match(item)):
            raise ValueError(f"{item!r} is neither an email address nor `*@domain`")
        out.append(item)
    return tuple(out)


def _split_bind(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 0.0.0.0:587 or [::]:25)")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - ":587" means all interfaces, as in Postfix
    return host, int(port)


def _bind(raw: Any, run: Run) -> str:
    value = text(raw, run)
    _split_bind(value)
    return value


def _pfx_path(value: Any, run: Run) -> Path:
    if isinstance(value, Mapping) and set(value) == {"file"}:
        value = value["file"]
    return _resolve_path(value, run)


def _https(raw: Any, run: Run) -> str:
    value = text(raw, run)
    if not value.startswith("https://"):
        raise ValueError("must be an https:// URL; token requests are never sent in clear")
    return value.rstrip("/")


def _graph_https(raw: Any, run: Run) -> str:
    value = text(raw, run)
    if not value.startswith("https://"):
        raise ValueError("must be an https:// URL such as https://graph.microsoft.com "
                         "(GCC High: https://graph.microsoft.us)")
    return value.rstrip("/")


def _tls_version(raw: Any, run: Run) -> str:
    # YAML reads an unquoted 1.0 as a number; accept it as the admin meant it.
    value = f"{raw:.1f}" if isinstance(raw, float) else raw
    if value not in ("1.0", "1.1", "1.2", "1.3"):
        raise ValueError(f"{raw!r} is not a TLS version: use \"1.2\" (the default), \"1.3\", "
                         "or \"1.0\"/\"1.1\" for old devices that cannot do better")
    return str(value)


def _guid(raw: Any, run: Run) -> str:
    value = text(raw, run)
    try:
        uuid.UUID(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a GUID; copy the Application (client) ID from the "
                         "app registration's Overview page in the Entra admin center") from None
    return value


def _known_app(raw: Any, run: Run) -> str:
    value, apps = text(raw, run), run.context.get("apps")
    if apps is not None and value not in apps:
        known = ", ".join(sorted(apps)) or "none defined"
        raise ValueError(f"no app named {value!r} under `apps` (known: {known})")
    return value


def _argon2(raw: Any, run: Run, note: str = "") -> str:
    value = text(raw, run)
    if not value.startswith("$argon2"):
        raise ValueError("not an argon2 hash; create one with "
                         f"`{progname.command()} hash-password`{note}")
    return value


def _not_inline(value: Any, run: Run) -> Secret:
    secret = _secret(value, run)
    if secret.source == "inline":
        raise ValueError("must be {env: VARIABLE} or {file: PATH}, never inline: the key "
                         "decrypts every stored sign-in")
    return secret


def _fernet_key(value: Any, run: Run) -> Secret:
    """The token store's key, refused at load unless Fernet takes it, so a bad key is a config
    error naming where it came from, not a traceback in doctor or serve (or on SIGHUP)."""
    secret = _not_inline(value, run)
    from cryptography.fernet import Fernet

    try:
        Fernet(secret.value.strip().encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        where = secret.source.replace(":", " ", 1)
        raise ValueError(f"the key from {where} is not a Fernet key (32 random bytes in "
                         "url-safe base64, 44 characters ending in '='); create one with "
                         "`m365relay login --new-key` and put it there") from None
    return secret


SecretValue: Check = _secret
FilePath: Check = _resolve_path
ReadableFile: Check = then(_resolve_path, _readable)
PfxFile: Check = then(_pfx_path, _readable)
Duration: Check = plain(_duration)
# 0 switches the feature off (auth_limits.cache_ttl).
DurationOrOff: Check = plain(lambda value: 0.0 if value in (0, "0") else _duration(value))
Networks: Check = plain(_networks)
Email: Check = plain(_email)
Patterns: Check = plain(_patterns)


def Size(ge: int | None = None) -> Check:  # named as a type, like the checks above
    return then(plain(_size), integer(ge))


def _web_password_hash(raw: Any, run: Run) -> str:
    # The devices' kind of hash (one hash-password for both), not an exporter's bcrypt.
    return _argon2(raw, run, " (bcrypt hashes from a Prometheus exporter's web config are not "
                             "accepted)")


def _web_users(raw: Any, run: Run) -> dict[str, str]:
    bad = [name for name in raw if isinstance(name, str) and (":" in name or not name)
           ] if isinstance(raw, Mapping) else []
    for name in bad:
        run.at(name).report("a user name must be non-empty and without `:` (HTTP Basic)")
    users: dict[str, str] = mapping(_web_password_hash, min_length=1)(raw, run)
    if bad:
        raise Failed
    return users
