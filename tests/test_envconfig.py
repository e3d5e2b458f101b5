"""Config from M365RELAY_* variables, and the healthcheck probe against real listeners."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TLSFiles

from relay.config.env import from_env, load_source, spool_from_env
from relay.config.records import ConfigError
from relay.policy.passwords import hash_password
from relay.service import healthcheck

GUID = "11111111-2222-3333-4444-555555555555"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        "M365RELAY_TENANT": "contoso.onmicrosoft.com",
        "M365RELAY_CLIENT_ID": GUID,
        "M365RELAY_CLIENT_SECRET": "s3cret",
        "M365RELAY_MAILBOX": "scanner@contoso.example",
        "M365RELAY_NETWORKS": "192.168.1.0/24, 10.0.0.5",
        "M365RELAY_SPOOL": str(tmp_path / "spool"),
        "HOME": "/root",  # not ours: ignored
    }


def problems(environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        from_env(environ)
    return caught.value.problems


def test_networks_send_without_login(env: dict[str, str]) -> None:
    config = from_env(env)
    (account,) = config.accounts
    lan = (ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("10.0.0.5/32"))
    assert account.networks == lan
    assert account.username is None
    assert [lis.bind for lis in config.listeners] == ["0.0.0.0:2525", "0.0.0.0:587"]
    for listener in config.listeners:
        assert set(lan) < set(listener.networks)
        assert ipaddress.ip_network("127.0.0.0/8") in listener.networks  # the HEALTHCHECK
        assert listener.tls == "none"
    secret = config.apps["m365"].client_secret
    assert secret is not None
    assert secret.value == "s3cret"
    assert "s3cret" not in repr(config)


def test_login_allowed_in_clear_only_from_the_networks(env: dict[str, str]) -> None:
    config = from_env(env | {"M365RELAY_USERNAME": "app",
                             "M365RELAY_PASSWORD_HASH": hash_password("pw")})
    (account,) = config.accounts
    assert account.username == "app"
    assert account.networks == ()  # everyone logs in
    assert all(lis.cleartext_auth_networks == config.listeners[0].cleartext_auth_networks
               and len(lis.cleartext_auth_networks) == 2 for lis in config.listeners)


def test_tls_certificate_turns_on_starttls(env: dict[str, str], tls_files: TLSFiles) -> None:
    config = from_env(env | {"M365RELAY_TLS_CERTIFICATE": str(tls_files.cert),
                             "M365RELAY_TLS_PRIVATE_KEY": str(tls_files.key),
                             "M365RELAY_USERNAME": "app",
                             "M365RELAY_PASSWORD_HASH": hash_password("pw")})
    for listener in config.listeners:
        assert listener.tls == "starttls"
        assert listener.cleartext_auth_networks == ()  # with TLS, no login in clear


def test_starttls_without_files_serves_a_self_signed_certificate(env: dict[str, str]) -> None:
    """A container with printers that need TLS (or TLS 1.0) and no certificate to mount."""
    config = from_env(env | {"M365RELAY_TLS": "starttls", "M365RELAY_MIN_TLS_VERSION": "1.0"})
    for listener in config.listeners:
        assert (listener.tls, listener.certificate, listener.min_tls_version) == (
            "starttls", None, "1.0")
    found = problems(env | {"M365RELAY_TLS": "none", "M365RELAY_MIN_TLS_VERSION": "1.0"})
    assert any(p.startswith("M365RELAY_MIN_TLS_VERSION set with M365RELAY_TLS=none")
               for p in found), found
    found = problems(env | {"M365RELAY_TLS": "startls"})
    assert any(p.startswith("M365RELAY_TLS") and "'starttls'" in p for p in found), found


def test_every_problem_names_its_variable(env: dict[str, str]) -> None:
    found = problems(env | {"M365RELAY_CLIENT_SECRET_FILE": "/run/secrets/x",
                            "M365RELAY_LISTEN": "0.0.0.0:smtp",
                            "M365RELAY_NETWORKS": "192.168.1.0/24,lan",
                            "M365RELAY_FROM": "keep",
                            "M365RELAY_USERNAME": "app"})
    assert found[0].startswith("more than one app credential is set")
    assert any(p.startswith("M365RELAY_USERNAME and M365RELAY_PASSWORD_HASH go together")
               for p in found)
    assert any(p.startswith("M365RELAY_LISTEN: '0.0.0.0:smtp' is not HOST:PORT") for p in found)
    # One variable fills several keys; its problem is still said once.
    assert sum(p.startswith("M365RELAY_NETWORKS: 'lan'") for p in found) == 1
    assert any(p.startswith("M365RELAY_FROM:") for p in found)
    assert not [p for p in found if not p.startswith(("M365RELAY_", "more than one"))]


def test_nothing_set_lists_what_is_needed() -> None:
    found = problems({})
    assert found[0].startswith("no app credential")
    for name in ("M365RELAY_NETWORKS", "M365RELAY_TENANT", "M365RELAY_CLIENT_ID",
                 "M365RELAY_MAILBOX"):
        assert any(p.startswith(name) for p in found), name


def test_a_mounted_file_wins_over_the_variables(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "m365relay.yaml"
    config, source = load_source(path, from_env_vars=True, environ=env)
    assert source is None
    assert config.accounts[0].name == "default"
    data: dict[str, Any] = {
        "listeners": [{"name": "file", "bind": "127.0.0.1:2525"}],
        "apps": {"a": {"tenant": "t", "client_id": GUID, "client_secret": "x"}},
        "accounts": [{"name": "from-file", "app": "a", "mailbox": "a@contoso.example",
                      "networks": ["127.0.0.1"]}],
        "spool": {"directory": str(tmp_path / "spool")},
    }
    path.write_text(yaml.safe_dump(data))
    config, source = load_source(path, from_env_vars=True, environ=env)
    assert source == path  # SIGHUP reloads it
    assert config.accounts[0].name == "from-file"
    with pytest.raises(ConfigError, match=r"no config file at .* and no M365RELAY_"):
        load_source(tmp_path / "absent.yaml", from_env_vars=True, environ={})


# The password in the connection strings below: no repr and no message may show any of it.
PASSWORD = "Hunter2Zq"
DATABASE = f"postgresql://relay:{PASSWORD}@db.example:6432/mail?sslmode=verify-full"


@pytest.fixture
def cluster_env(env: dict[str, str]) -> dict[str, str]:
    """The variables of one cluster node: no spool directory, a database instead."""
    return {k: v for k, v in env.items() if k != "M365RELAY_SPOOL"} | {
        "M365RELAY_DATABASE_URL": DATABASE, "M365RELAY_NODE": "m365relay-7f9c-x2",
        "M365RELAY_LEASE": "45s"}


def test_database_url_is_the_cluster_queue(cluster_env: dict[str, str]) -> None:
    config = from_env(cluster_env)
    spool = config.spool
    assert spool.clustered and spool.directory is None
    assert spool.postgres is not None and spool.postgres.shown == "postgresql db.example:6432/mail"
    assert spool.postgres.sslmode == "verify-full"
    assert (spool.node, spool.lease) == ("m365relay-7f9c-x2", 45.0)
    for shown in (repr(config), str(config), repr(spool), repr(spool.postgres)):
        assert PASSWORD not in shown
    # `queue` and `db` read only the spool: no app credential or mailbox needed there.
    alone = spool_from_env({k: v for k, v in cluster_env.items()
                            if k.startswith(("M365RELAY_DATABASE", "M365RELAY_NODE",
                                             "M365RELAY_LEASE"))})
    assert alone == spool


def test_database_url_file_is_read_as_a_secret(cluster_env: dict[str, str],
                                               tmp_path: Path) -> None:
    secret = tmp_path / "database-url"
    secret.write_text(DATABASE + "\n")  # as `kubectl create secret --from-file` may keep it
    del cluster_env["M365RELAY_DATABASE_URL"]
    config = from_env(cluster_env | {"M365RELAY_DATABASE_URL_FILE": str(secret)})
    assert config.spool.postgres is not None
    assert config.spool.postgres.params["dbname"] == "mail"
    assert PASSWORD not in repr(config)
    found = problems(cluster_env | {"M365RELAY_DATABASE_URL_FILE": str(tmp_path / "absent")})
    assert [p for p in found if p.startswith("M365RELAY_DATABASE_URL_FILE: cannot read")], found


def test_spool_takes_the_directory_or_the_database(cluster_env: dict[str, str],
                                                   tmp_path: Path) -> None:
    found = problems(cluster_env | {"M365RELAY_DATABASE_URL_FILE": str(tmp_path / "url"),
                                    "M365RELAY_SPOOL": str(tmp_path / "spool")})
    assert "M365RELAY_DATABASE_URL and M365RELAY_DATABASE_URL_FILE are both set; keep one " \
           "(the _FILE one for a mounted Secret)" in found
    assert any(p.startswith("M365RELAY_SPOOL and M365RELAY_DATABASE_URL are both set") and
               "unset M365RELAY_SPOOL" in p for p in found), found
    # Cluster variables without a database: most likely the URL was forgotten.
    found = problems({k: v for k, v in cluster_env.items() if k != "M365RELAY_DATABASE_URL"})
    assert any(p.startswith("M365RELAY_NODE, M365RELAY_LEASE set without "
                            "M365RELAY_DATABASE_URL") for p in found), found
    found = problems(cluster_env | {"M365RELAY_NODE": "no spaces", "M365RELAY_LEASE": "1s"})
    assert any(p.startswith("M365RELAY_NODE: a node name is") for p in found), found
    found = problems(cluster_env | {"M365RELAY_LEASE": "1s"})
    assert any("`lease` must be between 5s and 10m" in p for p in found), found


def test_cluster_mode_needs_the_listener_certificate(cluster_env: dict[str, str],
                                                     tls_files: TLSFiles) -> None:
    """No spool volume to keep a self-signed certificate in; said once, by variable."""
    (problem,) = problems(cluster_env | {"M365RELAY_TLS": "starttls"})
    assert problem.startswith("M365RELAY_TLS=starttls needs M365RELAY_TLS_CERTIFICATE and "
                              "M365RELAY_TLS_PRIVATE_KEY in cluster mode")
    config = from_env(cluster_env | {"M365RELAY_TLS_CERTIFICATE": str(tls_files.cert),
                                     "M365RELAY_TLS_PRIVATE_KEY": str(tls_files.key)})
    assert all(lis.tls == "starttls" for lis in config.listeners)


@pytest.mark.parametrize("url", [
    f"postgresql://relay:{PASSWORD}@db/mail?sslmode=verify-al",  # a bad value elsewhere
    f"postgresql://relay:{PASSWORD[:4]}/{PASSWORD[4:]}@db/mail",  # '/' not percent-encoded
    f"postgresql://relay:{PASSWORD[:4]}?{PASSWORD[4:]}@db/mail",
    f"postgresql://relay:{PASSWORD[:4]}#{PASSWORD[4:]}@db/mail",
    f"postgresql://relay:{PASSWORD[:4]}:{PASSWORD[4:]}@db:port/mail",
    f"host=db password={PASSWORD[:4]} {PASSWORD[4:]} dbname=mail",  # a space, unquoted
    f"host=db password={PASSWORD} sslmod=require",
], ids=["sslmode", "slash", "question", "hash", "port", "space", "keyword"])
def test_the_password_is_in_no_problem(cluster_env: dict[str, str], url: str) -> None:
    found = problems(cluster_env | {"M365RELAY_DATABASE_URL": url})
    (problem,) = found
    assert problem.startswith("M365RELAY_DATABASE_URL: ")
    assert problem.endswith("(config key spool.postgres)")
    for piece in (PASSWORD, PASSWORD[:4], PASSWORD[4:]):
        assert piece not in problem
    with pytest.raises(ConfigError) as caught:
        spool_from_env({"M365RELAY_DATABASE_URL": url})
    assert PASSWORD[4:] not in str(caught.value) and PASSWORD[:4] not in str(caught.value)


async def test_probe_sees_a_banner_a_refusal_and_nothing(relays: Any) -> None:
    data = relays.config()
    data["listeners"].append({"name": "lan-only", "bind": "127.0.0.1:0",
                              "networks": ["10.0.0.0/8"]})
    relay = await relays.start(data)
    host, port = relay.addresses["local"]
    alive, said = await asyncio.to_thread(
        healthcheck.probe, healthcheck.Target("local", host, port), 5)
    assert alive
    assert said.startswith("220 ")
    # Alive but refusing the checker's address: healthy, with the fix for a 220.
    host, port = relay.addresses["lan-only"]
    alive, said = await asyncio.to_thread(
        healthcheck.probe, healthcheck.Target("lan", host, port), 5)
    assert alive
    assert "554" in said
    assert "networks" in said
    await relays.stop(relay)
    alive, said = await asyncio.to_thread(
        healthcheck.probe, healthcheck.Target("local", host, port), 5)
    assert not alive


async def test_probe_speaks_implicit_tls(relays: Any, tls_files: TLSFiles) -> None:
    data = relays.config()
    data["listeners"] = [{"name": "smtps", "bind": "127.0.0.1:0", "tls": "implicit",
                          "certificate": str(tls_files.cert),
                          "private_key": str(tls_files.key)}]
    relay = await relays.start(data)
    host, port = relay.addresses["smtps"]
    (target,) = healthcheck.targets(relay.config)
    assert target.implicit_tls
    alive, said = await asyncio.to_thread(
        healthcheck.probe, healthcheck.Target("smtps", host, port, implicit_tls=True), 5)
    assert alive, said
    assert said.startswith("220 ")


def test_wildcard_binds_are_checked_on_loopback(env: dict[str, str]) -> None:
    config = from_env(env | {"M365RELAY_LISTEN": "0.0.0.0:2525,[::]:587,10.1.2.3:25"})
    assert [(t.host, t.port) for t in healthcheck.targets(config)] == [
        ("127.0.0.1", 2525), ("::1", 587), ("10.1.2.3", 25)]
