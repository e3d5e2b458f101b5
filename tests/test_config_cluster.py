"""spool.postgres and its neighbours, checked at load with key-path errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay.config import records as config_mod
from relay.config.pgdsn import parse_dsn


def _config(base: dict[str, Any], spool: dict[str, Any]) -> dict[str, Any]:
    return {**base, "spool": spool}


def _minimal(tmp_path: Path) -> dict[str, Any]:
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    return {
        "listeners": [{"name": "lan", "bind": "127.0.0.1:0"}],
        "apps": {"a": {"tenant": "contoso.onmicrosoft.com",
                       "client_id": "00000000-0000-0000-0000-000000000001",
                       "client_secret": {"file": str(secret)}}},
        "accounts": [{"name": "p", "networks": ["127.0.0.1/32"], "app": "a",
                      "mailbox": "p@contoso.example"}],
    }


def test_postgres_spool_with_node_from_the_environment(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "relay-7f9c-x2")
    monkeypatch.setenv("M365RELAY_TEST_DSN", "postgresql://relay:pw@db.example:6432/mail"
                                             "?sslmode=verify-full&sslrootcert=/etc/ca.pem")
    config = config_mod.parse(_config(_minimal(tmp_path), {
        "postgres": {"env": "M365RELAY_TEST_DSN"}, "node": {"env": "POD_NAME"}}),
        base_dir=tmp_path)
    spool = config.spool
    assert spool.clustered and spool.directory is None and spool.node == "relay-7f9c-x2"
    assert spool.postgres is not None and spool.postgres.sslmode == "verify-full"
    assert "pw" not in spool.postgres.shown and "pw" not in repr(spool.postgres.params)
    assert spool.postgres.shown == "postgresql db.example:6432/mail"
    assert spool.lease == 30.0


def test_every_spool_problem_is_listed_by_key_path(tmp_path: Path) -> None:
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse(_config(_minimal(tmp_path), {
            "postgres": "host=db sslmode=verify-all", "node": "bad name!", "lease": "1s"}),
            base_dir=tmp_path)
    text = str(err.value)
    assert "spool.postgres: sslmode=verify-all is not one of" in text
    assert "spool.node: a node name is" in text
    with pytest.raises(config_mod.ConfigError, match="set exactly one of `directory`"):
        config_mod.parse(_config(_minimal(tmp_path), {
            "postgres": "host=db", "directory": str(tmp_path)}), base_dir=tmp_path)
    with pytest.raises(config_mod.ConfigError, match="`lease` must be between"):
        config_mod.parse(_config(_minimal(tmp_path), {"postgres": "host=db", "lease": "1s"}),
                         base_dir=tmp_path)


@pytest.mark.parametrize(("text", "uri"), [
    ("host=db.example port=5433 dbname=mail user=relay password='a b\\'c' sslmode=require",
     "postgresql://relay:a%20b%27c@db.example:5433/mail?sslmode=require"),
    ("host=/run/postgresql dbname=mail", "postgresql:///mail?host=%2Frun%2Fpostgresql"),
    ("postgres://u@[::1]:5432/d", "postgresql://u@[::1]:5432/d"),
])
def test_libpq_forms_become_the_uri_the_driver_takes(text: str, uri: str) -> None:
    assert parse_dsn(text).uri == uri


def test_a_typo_in_a_keyword_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown connection keyword"):
        parse_dsn("host=db sslmod=require")


def test_token_store_needs_a_directory_only_with_files(tmp_path: Path) -> None:
    """Delegated sign-ins are files beside a file spool, rows beside a PostgreSQL one."""
    from cryptography.fernet import Fernet

    key = tmp_path / "token.key"
    key.write_text(Fernet.generate_key().decode())
    base = _minimal(tmp_path)
    base["apps"]["a"].update(flow="delegated")
    del base["apps"]["a"]["client_secret"]
    base["token_store"] = {"key": {"file": str(key)}}
    clustered = config_mod.parse(_config(base, {"postgres": "host=db", "node": "n1"}),
                                 base_dir=tmp_path)
    assert clustered.token_store is not None and clustered.token_store.directory is None
    with pytest.raises(config_mod.ConfigError) as problem:
        config_mod.parse(_config(base, {"directory": str(tmp_path / "spool")}),
                         base_dir=tmp_path)
    assert "token_store.directory: required with spool.directory" in str(problem.value)
