"""`m365relay db upgrade|status` and `queue list` against a real PostgreSQL, as real processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
import yaml
from pgserver import PgServer

from relay.spool import pgschema

pytest.importorskip("asyncpg")


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *argv], capture_output=True,
                          text=True, timeout=60, check=False,
                          env=None if env is None else {**os.environ, **env})


def _config(tmp_path: Path, dsn: str) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({"spool": {"postgres": dsn, "node": "n1"}}))
    return path


def test_upgrade_twice_then_status_and_queue_list(tmp_path: Path, pg_dsn: str) -> None:
    config = str(_config(tmp_path, pg_dsn))
    first = _run("db", "upgrade", "--config", config)
    assert first.returncode == 0, first.stderr
    assert "applied schema version(s) 1" in first.stdout
    again = _run("db", "upgrade", "--config", config)
    assert again.returncode == 0 and "already current" in again.stdout
    status = _run("db", "status", "--config", config)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "primary" in status.stdout and f"schema:    version {pgschema.LATEST}" in status.stdout
    listed = _run("queue", "list", "--config", config)
    assert listed.returncode == 0, listed.stderr


def test_a_missing_database_and_a_stopped_server_are_explained(
        tmp_path: Path, pg_server: PgServer) -> None:
    config = str(_config(tmp_path, pg_server.dsn("no_such_db")))
    missing = _run("db", "status", "--config", config)
    assert missing.returncode == 69
    assert "database no_such_db does not exist" in missing.stderr
    assert "createdb" in missing.stderr
    refused = str(_config(tmp_path, "postgresql://postgres@127.0.0.1:1/x"))
    down = _run("db", "upgrade", "--config", refused)
    assert down.returncode == 69 and "start PostgreSQL" in down.stderr


def test_upgrade_and_queue_list_from_the_variables(tmp_path: Path, pg_dsn: str) -> None:
    """The image's way: no config file where --config points, the M365RELAY_* variables (a
    Kubernetes init container with the Deployment's environment)."""
    url = tmp_path / "database-url"
    url.write_text(pg_dsn)
    env = {"M365RELAY_DATABASE_URL_FILE": str(url), "M365RELAY_NODE": "pod-1"}
    absent = str(tmp_path / "absent.yaml")
    upgraded = _run("db", "upgrade", "--config", absent, "--config-from-env", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "applied schema version(s)" in upgraded.stdout
    status = _run("db", "status", "--config", absent, "--config-from-env", env=env)
    assert status.returncode == 0, status.stdout + status.stderr
    assert re.search(r"schema:    version (\d+) \(this relay: \1\)", status.stdout), status.stdout
    listed = _run("queue", "list", "--config", absent, "--config-from-env", env=env)
    assert listed.returncode == 0, listed.stderr
    both = _run("db", "status", "--config", absent, "--config-from-env",
                env=env | {"M365RELAY_DATABASE_URL": pg_dsn})
    assert both.returncode == 78
    assert "M365RELAY_DATABASE_URL and M365RELAY_DATABASE_URL_FILE are both set" in both.stderr
    spool = _run("db", "status", "--config", absent, "--config-from-env",
                 env={"M365RELAY_SPOOL": str(tmp_path)})
    assert spool.returncode == 78 and "set M365RELAY_DATABASE_URL" in spool.stderr


def test_db_refuses_a_file_spool(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({"spool": {"directory": str(tmp_path / "spool")}}))
    out = _run("db", "status", "--config", str(path))
    assert out.returncode == 78 and "for spool.postgres" in out.stderr


def test_tls_verify_full_against_the_servers_ca_and_a_wrong_one(
        tmp_path: Path, pg_server: PgServer) -> None:
    db = pg_server.new_database("tls")
    good = f"{pg_server.dsn(db)}?sslmode=verify-full&sslrootcert={pg_server.ca_file}"
    status = _run("db", "status", "--config", str(_config(tmp_path, good)))
    assert status.returncode in (0, 1), status.stderr  # 1: no schema yet, said as such
    assert "TLSv1.3" in status.stdout, status.stdout  # encrypted, and the CA checked
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    wrong = f"{pg_server.dsn(db)}?sslmode=verify-full&sslrootcert={other}"
    refused = _run("db", "status", "--config", str(_config(tmp_path, wrong)))
    assert refused.returncode == 69, refused.stdout + refused.stderr
    assert "does not verify" in refused.stderr and "sslrootcert=" in refused.stderr
