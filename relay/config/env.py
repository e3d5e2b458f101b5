"""The config from ``M365RELAY_*`` environment variables: one app, one mailbox (containers).

The variables become the same data a YAML file would hold and go through :func:`config.parse`,
so the checks are the same; each problem is then reported by the variable to change
(``M365RELAY_CLIENT_ID: 'x' is not a GUID ...``), not by a key path the user never wrote.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from relay.config import records as config_mod
from relay.config.check import Failed, Run, validate
from relay.config.records import Config, ConfigError, SpoolSettings
from relay.config.values import Secret

PREFIX = "M365RELAY_"
# Docker's conventions: unprivileged ports inside the container, mapped by `-p` outside.
DEFAULT_LISTEN = ("0.0.0.0:2525", "0.0.0.0:587")
DEFAULT_SPOOL = "/var/spool/m365relay"
APP = "m365"
ACCOUNT = "default"
SOURCE = "environment (M365RELAY_* variables)"

# Variable -> the config key it fills; `[]` stands for every list index.
KEYS = {
    "M365RELAY_TENANT": f"apps.{APP}.tenant",
    "M365RELAY_CLIENT_ID": f"apps.{APP}.client_id",
    "M365RELAY_CLIENT_SECRET": f"apps.{APP}.client_secret",
    "M365RELAY_CLIENT_SECRET_FILE": f"apps.{APP}.client_secret",
    "M365RELAY_CERTIFICATE_FILE": f"apps.{APP}.certificate.certificate",
    "M365RELAY_PRIVATE_KEY_FILE": f"apps.{APP}.certificate.private_key",
    "M365RELAY_PRIVATE_KEY_PASSPHRASE": f"apps.{APP}.certificate.passphrase",
    "M365RELAY_AUTHORITY": f"apps.{APP}.authority",
    "M365RELAY_SMTP_HOST": f"apps.{APP}.smtp_host",
    "M365RELAY_SMTP_PORT": f"apps.{APP}.smtp_port",
    "M365RELAY_CA_FILE": f"apps.{APP}.ca_file",
    "M365RELAY_MAILBOX": "accounts[].mailbox",
    "M365RELAY_FROM": "accounts[].from",
    "M365RELAY_USERNAME": "accounts[].username",
    "M365RELAY_PASSWORD_HASH": "accounts[].password_hash",
    "M365RELAY_NETWORKS": "accounts[].networks",
    "M365RELAY_LISTEN": "listeners[].bind",
    "M365RELAY_TLS_CERTIFICATE": "listeners[].certificate",
    "M365RELAY_TLS_PRIVATE_KEY": "listeners[].private_key",
    "M365RELAY_TLS": "listeners[].tls",
    "M365RELAY_MIN_TLS_VERSION": "listeners[].min_tls_version",
    "M365RELAY_SPOOL": "spool.directory",
    "M365RELAY_DATABASE_URL": "spool.postgres",
    "M365RELAY_DATABASE_URL_FILE": "spool.postgres",
    "M365RELAY_NODE": "spool.node",
    "M365RELAY_LEASE": "spool.lease",
    "M365RELAY_HOSTNAME": "hostname",
}
_ALSO = {"listeners[].networks": "M365RELAY_NETWORKS",
         "listeners[].cleartext_auth_networks": "M365RELAY_NETWORKS"}
REQUIRED = ("M365RELAY_TENANT", "M365RELAY_CLIENT_ID", "M365RELAY_MAILBOX", "M365RELAY_NETWORKS")
_LOOPBACK = ["127.0.0.0/8", "::1/128"]
# The last: cluster mode's certificate rule, which build() words by variable too.
_CHECKED_BY_BUILD = (f"apps.{APP}: ", "accounts[0]: ", "(top level): listeners[")


def _items(value: str) -> list[str]:
    return [item for item in re.split(r"[\s,]+", value) if item]


def _ours(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k.startswith(PREFIX) and v.strip()}


def _plain(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value.strip() if value is not None else None


def build(environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """The config data, the problems found on the way, and key path -> variable."""
    env = _ours(environ)
    problems = []
    for name in sorted(set(env) - set(KEYS)):
        guess = difflib.get_close_matches(name, KEYS, n=1)
        problems.append(f"{name}: unknown variable"
                        + (f" (did you mean {guess[0]}?)" if guess else ""))
    sources = {key: var for var, key in KEYS.items()} | _ALSO

    app: dict[str, Any] = {}
    for name, key in (("M365RELAY_TENANT", "tenant"), ("M365RELAY_CLIENT_ID", "client_id"),
                      ("M365RELAY_AUTHORITY", "authority"), ("M365RELAY_SMTP_HOST", "smtp_host"),
                      ("M365RELAY_SMTP_PORT", "smtp_port"), ("M365RELAY_CA_FILE", "ca_file")):
        if (value := _plain(env, name)) is not None:
            app[key] = value
    problems += _credential(env, app, sources)

    networks = _items(env.get("M365RELAY_NETWORKS", ""))
    account, logs_in = _account(env, networks, problems)
    data: dict[str, Any] = {
        "listeners": _listeners(env, networks, logs_in, problems),
        "apps": {APP: app},
        "accounts": [account],
        "spool": _spool(env, problems, sources),
    }
    if (hostname := _plain(env, "M365RELAY_HOSTNAME")) is not None:
        data["hostname"] = hostname
    if not networks:
        problems.append("M365RELAY_NETWORKS is not set: list who may connect, e.g. "
                        "172.16.0.0/12 for containers on Docker's networks, or 192.168.1.0/24 "
                        "for a LAN (comma-separated)")
    return data, problems, sources


def _account(env: Mapping[str, str], networks: list[str], problems: list[str]
             ) -> tuple[dict[str, Any], bool]:
    """The one account, and whether its devices log in (else they are known by network)."""
    account: dict[str, Any] = {"name": ACCOUNT, "app": APP}
    for name, key in (("M365RELAY_MAILBOX", "mailbox"), ("M365RELAY_FROM", "from"),
                      ("M365RELAY_USERNAME", "username"),
                      ("M365RELAY_PASSWORD_HASH", "password_hash")):
        if (value := _plain(env, name)) is not None:
            account[key] = value
    logs_in = "username" in account or "password_hash" in account
    if logs_in and not ("username" in account and "password_hash" in account):
        problems.append("M365RELAY_USERNAME and M365RELAY_PASSWORD_HASH go together (devices "
                        "log in with it); make the hash with `m365relay hash-password`")
    if not logs_in:
        # Devices on these networks send without logging in, as with Postfix's mynetworks.
        account["networks"] = networks
    return account, logs_in


def _listeners(env: Mapping[str, str], networks: list[str], logs_in: bool,
               problems: list[str]) -> list[dict[str, Any]]:
    """One listener per M365RELAY_LISTEN address, all with the same TLS settings."""
    tls_files = {key: _plain(env, name)
                 for name, key in (("M365RELAY_TLS_CERTIFICATE", "certificate"),
                                   ("M365RELAY_TLS_PRIVATE_KEY", "private_key"))}
    tls: dict[str, Any] = {k: v for k, v in tls_files.items() if v is not None}
    # TLS with the files given, or M365RELAY_TLS=starttls with none: a self-signed certificate
    # kept in the spool volume (relay/ingress/selfsigned.py).
    mode = _plain(env, "M365RELAY_TLS") or ("starttls" if tls else "none")
    if mode != "none" and not tls and _database(env):
        problems.append(f"M365RELAY_TLS={mode} needs M365RELAY_TLS_CERTIFICATE and "
                        "M365RELAY_TLS_PRIVATE_KEY in cluster mode (M365RELAY_DATABASE_URL): "
                        "every relay behind the load balancer presents the same certificate, "
                        "and there is no spool volume to keep a self-signed one")
    ignored = [n for n in ("M365RELAY_TLS_CERTIFICATE", "M365RELAY_TLS_PRIVATE_KEY",
                           "M365RELAY_MIN_TLS_VERSION") if mode == "none" and _plain(env, n)]
    if ignored:
        problems.append(f"{', '.join(ignored)} set with M365RELAY_TLS=none; unset them, or "
                        "set M365RELAY_TLS=starttls")
    if mode != "none":
        tls["tls"] = mode
        if (version := _plain(env, "M365RELAY_MIN_TLS_VERSION")) is not None:
            tls["min_tls_version"] = version
    listeners = []
    for i, bind in enumerate(_items(env.get("M365RELAY_LISTEN", "")) or DEFAULT_LISTEN):
        port = bind.rpartition(":")[2]
        listener: dict[str, Any] = {
            "name": f"smtp-{port}" if port != "0" else f"smtp-{i}",
            "bind": bind,
            # Loopback too, so the container's HEALTHCHECK (`m365relay healthcheck`) gets a 220.
            "networks": networks + _LOOPBACK,
        }
        if mode != "none":
            listener |= tls
        elif logs_in:
            # No certificate: allow the login in clear, but only from the listed networks.
            listener["cleartext_auth_networks"] = networks
        listeners.append(listener)
    return listeners


def _database(env: Mapping[str, str]) -> str | None:
    return "M365RELAY_DATABASE_URL" if "M365RELAY_DATABASE_URL" in env else (
        "M365RELAY_DATABASE_URL_FILE" if "M365RELAY_DATABASE_URL_FILE" in env else None)


def _spool(env: Mapping[str, str], problems: list[str], sources: dict[str, str]
           ) -> dict[str, Any]:
    """The file spool (M365RELAY_SPOOL, or the image's volume), or with a database URL the
    cluster queue: exactly one, as spool takes."""
    spool: dict[str, Any] = {}
    url, url_file = env.get("M365RELAY_DATABASE_URL"), env.get("M365RELAY_DATABASE_URL_FILE")
    if url and url_file:
        problems.append("M365RELAY_DATABASE_URL and M365RELAY_DATABASE_URL_FILE are both set; "
                        "keep one (the _FILE one for a mounted Secret)")
    if url:
        # A Secret, as the client secret: the URL may hold the password, and the value comes
        # from `environ`, which may not be os.environ.
        spool["postgres"] = Secret(url.strip(), "env:M365RELAY_DATABASE_URL")
        sources["spool.postgres"] = "M365RELAY_DATABASE_URL"
    elif url_file:
        spool["postgres"] = {"file": url_file.strip()}
        sources["spool.postgres"] = "M365RELAY_DATABASE_URL_FILE"
    directory = _plain(env, "M365RELAY_SPOOL")
    if "postgres" not in spool:
        spool["directory"] = directory or DEFAULT_SPOOL
        stray = [n for n in ("M365RELAY_NODE", "M365RELAY_LEASE") if n in env]
        if stray:
            problems.append(f"{', '.join(stray)} set without M365RELAY_DATABASE_URL (or "
                            "_FILE): they are for cluster mode; set the database URL, or "
                            "unset them")
    elif directory is not None:
        problems.append(f"M365RELAY_SPOOL and {_database(env)} are both set: in cluster mode "
                        "mail waits in the database; unset M365RELAY_SPOOL")
    for name, key in (("M365RELAY_NODE", "node"), ("M365RELAY_LEASE", "lease")):
        if (value := _plain(env, name)) is not None:
            spool[key] = value
    return spool


def spool_from_env(environ: Mapping[str, str] | None = None) -> SpoolSettings:
    """Only the spool of the variables: what `queue` and `db` act on. They need no app
    credential, so the other variables are not required (nor checked) here."""
    env = _ours(os.environ if environ is None else environ)
    problems: list[str] = []
    sources = {key: var for var, key in KEYS.items()}
    data = _spool(env, problems, sources)
    run = Run({}, "spool")
    try:
        settings = validate(SpoolSettings, data, run)
    except Failed:
        problems += [_rename(p, sources) for p in run.problems]
    if problems:
        raise ConfigError(SOURCE, problems)
    return settings


def _credential(env: Mapping[str, str], app: dict[str, Any], sources: dict[str, str]
                ) -> list[str]:
    secret = env.get("M365RELAY_CLIENT_SECRET")
    secret_file = env.get("M365RELAY_CLIENT_SECRET_FILE")
    cert = env.get("M365RELAY_CERTIFICATE_FILE")
    key = env.get("M365RELAY_PRIVATE_KEY_FILE")
    chosen = sum(map(bool, (secret, secret_file, cert or key)))
    if secret:
        # A Secret, not {env: NAME}: the value comes from `environ`, which may not be os.environ.
        app["client_secret"] = Secret(secret, "env:M365RELAY_CLIENT_SECRET")
    elif secret_file:
        app["client_secret"] = {"file": secret_file.strip()}
        sources[f"apps.{APP}.client_secret"] = "M365RELAY_CLIENT_SECRET_FILE"
    elif cert or key:
        credential: dict[str, Any] = {}
        if cert:
            credential["certificate"] = {"file": cert.strip()}
        if key:
            credential["private_key"] = {"file": key.strip()}
        if passphrase := env.get("M365RELAY_PRIVATE_KEY_PASSPHRASE"):
            credential["passphrase"] = Secret(passphrase, "env:M365RELAY_PRIVATE_KEY_PASSPHRASE")
        app["certificate"] = credential
    if chosen == 1:
        return []
    # A stand-in, so that the other variables are still checked and reported in the same pass.
    app.pop("certificate", None)
    app["client_secret"] = Secret("unset", "unset")
    if chosen == 0:
        return ["no app credential: set M365RELAY_CLIENT_SECRET (or M365RELAY_CLIENT_SECRET_FILE, "
                "e.g. a Docker secret under /run/secrets), or M365RELAY_CERTIFICATE_FILE + "
                "M365RELAY_PRIVATE_KEY_FILE (a certificate is what Microsoft recommends)"]
    return ["more than one app credential is set (M365RELAY_CLIENT_SECRET, "
            "M365RELAY_CLIENT_SECRET_FILE, M365RELAY_CERTIFICATE_FILE); keep exactly one"]


def _rename(problem: str, sources: Mapping[str, str]) -> str:
    path, _, message = problem.partition(": ")
    var = sources.get(path) or sources.get(re.sub(r"\[\d+\]", "[]", path))
    if var is None:
        return problem
    if message == "required key is missing":
        return f"{var} is not set (it fills {path})"
    return f"{var}: {message} (config key {path})"


def from_env(environ: Mapping[str, str] | None = None, *, base_dir: Path | None = None) -> Config:
    """Build and validate the config; ConfigError names the variables to fix."""
    data, problems, sources = build(os.environ if environ is None else environ)
    try:
        config = config_mod.parse(data, source=SOURCE, base_dir=base_dir)
    except ConfigError as exc:
        # Checks on a whole record (which credential; login or networks) were made by build()
        # in terms of variables; the same findings by key path would only repeat them.
        problems += [_rename(p, sources) for p in exc.problems
                     if not p.startswith(_CHECKED_BY_BUILD)]
    if problems:
        # One variable fills several keys (M365RELAY_NETWORKS, M365RELAY_LISTEN): say it once.
        unique: dict[str, str] = {}
        for problem in problems:
            unique.setdefault(problem.split(" (config key ")[0], problem)
        raise ConfigError(SOURCE, list(unique.values()))
    return config


def load_source(path: Path | None, *, from_env_vars: bool,
                environ: Mapping[str, str] | None = None) -> tuple[Config, Path | None]:
    """The config for ``serve`` and ``healthcheck``, and the file to reload on SIGHUP (if any).

    With both a path and ``from_env_vars`` (the container image's default), the file wins when it
    exists, so one image serves both a mounted config and the variables.
    """
    env = os.environ if environ is None else environ
    if path is not None and (not from_env_vars or path.exists()):
        return config_mod.load(path), path
    if path is not None and not any(k.startswith(PREFIX) for k in env):
        raise ConfigError(str(path), [
            f"there is no config file at {path} and no {PREFIX}* variables are set: mount "
            f"the config file there, or set {', '.join(REQUIRED)} and a client secret or "
            "certificate (README: Operations, Docker)"])
    return from_env(env), None
