"""The HTTP endpoint beyond loopback: TLS, basic auth, separate networks for /metrics, the
start-up warning; tested with real curl and a real Prometheus scraping over TLS with auth."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from conftest import PASSWORD, RelayFactory, TLSFiles
from tools import need

from relay.config import records as config_mod
from relay.http.guard import exposure_warnings
from relay.service.lifecycle import Relay

USER = "admin"


def secured(relays: RelayFactory, tls_files: TLSFiles, **http: Any) -> dict[str, Any]:
    data = relays.config()
    data["http"] = {"bind": "127.0.0.1:0",
                    "tls": {"certificate": str(tls_files.cert),
                            "private_key": str(tls_files.key)},
                    "basic_auth_users": {USER: relays.password_hash}, **http}
    return data


def curl(url: str, *args: str) -> tuple[int, str, str]:
    """(exit status, HTTP status or "000", body) from a real curl."""
    out = subprocess.run(
        [need("curl", "curl"), "-sS", "--noproxy", "*", "--max-time", "10", "-o", "-",
         "-w", "\n%{http_code}", *args, url],
        capture_output=True, text=True, timeout=30, check=False)
    body, _, code = out.stdout.rpartition("\n")
    return out.returncode, code, body + out.stderr


def url(relay: Relay, path: str, scheme: str = "https") -> str:
    assert relay.http_address is not None
    host, port = relay.http_address
    return f"{scheme}://{host}:{port}{path}"


async def acurl(relay: Relay, path: str, *args: str, scheme: str = "https"
                ) -> tuple[int, str, str]:
    return await asyncio.to_thread(curl, url(relay, path, scheme), *args)


async def test_tls_and_basic_auth_with_curl(relays: RelayFactory, tls_files: TLSFiles) -> None:
    relay = await relays.start(secured(relays, tls_files))
    ca = ("--cacert", str(tls_files.ca_file))
    good = ("-u", f"{USER}:{PASSWORD}")
    rc, code, body = await acurl(relay, "/", *ca, "-D", "/dev/stderr")
    assert (rc, code) == (0, "401")
    assert 'WWW-Authenticate: Basic realm="m365relay"' in body
    assert "http.basic_auth_users" in body
    assert (await acurl(relay, "/", *ca, "-u", f"{USER}:wrong"))[1] == "401"
    assert (await acurl(relay, "/", *ca, "-u", f"nobody:{PASSWORD}"))[1] == "401"
    rc, code, body = await acurl(relay, "/", *ca, *good)
    assert (rc, code) == (0, "200") and "<h1>m365relay on" in body
    rc, code, body = await acurl(relay, "/api/status", *ca, *good)
    assert code == "200" and json.loads(body)["queue"]["count"] == 0
    assert (await acurl(relay, "/status.js", *ca))[1] == "401"
    assert (await acurl(relay, "/metrics", *ca))[1] == "401"
    rc, code, body = await acurl(relay, "/metrics", *ca, *good)
    assert code == "200" and "m365relay_certificate_expiry_timestamp_seconds{" in body
    assert 'kind="http",name="http"' in body
    # Probes need no password: kubelet and load balancers have none.
    assert (await acurl(relay, "/healthz", *ca))[1:] == ("200", "ok\n")
    assert (await acurl(relay, "/readyz", *ca))[1] == "200"
    # Without the CA curl refuses the certificate (exit 60); plain HTTP gets no answer.
    assert (await acurl(relay, "/healthz"))[0] == 60
    rc, code, _ = await acurl(relay, "/healthz", scheme="http")
    assert rc != 0 and code == "000"


async def test_password_guessing_is_blocked_like_device_logins(
        relays: RelayFactory, tls_files: TLSFiles) -> None:
    data = secured(relays, tls_files)
    data["auth_limits"] = {"failures_per_ip": 3, "failures_per_user": 0, "block": "10m"}
    relay = await relays.start(data)
    ca = ("--cacert", str(tls_files.ca_file))
    good = ("-u", f"{USER}:{PASSWORD}")
    assert (await acurl(relay, "/api/status", *ca, *good))[1] == "200"  # remembered
    for guess in ("a", "b", "c"):
        assert (await acurl(relay, "/", *ca, "-u", f"{USER}:{guess}"))[1] == "401"
    _rc, code, body = await acurl(relay, "/", *ca, "-u", f"{USER}:d", "-D", "/dev/stderr")
    assert code == "429" and "Retry-After: 600" in body and "auth_limits" in body
    # Blocked: even the right password is refused now, as for device logins (one AuthGuard).
    assert (await acurl(relay, "/", *ca, "-u", f"other:{PASSWORD}"))[1] == "429"
    assert (await acurl(relay, "/", *ca, *good))[1] == "429"
    assert (await acurl(relay, "/healthz", *ca))[1] == "200"


async def test_renewed_certificate_is_used_without_restart(
        relays: RelayFactory, tls_files: TLSFiles, tmp_path: Path) -> None:
    cert, key = tmp_path / "http.crt", tmp_path / "http.key"
    cert.write_bytes(tls_files.cert.read_bytes())
    key.write_bytes(tls_files.key.read_bytes())
    data = secured(relays, tls_files)
    data["http"]["tls"] = {"certificate": str(cert), "private_key": str(key)}
    relay = await relays.start(data)
    assert relay.http_address is not None

    def serial() -> int:
        context = ssl.create_default_context(cafile=str(tls_files.ca_file))
        with socket.create_connection(relay.http_address, timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            peer = tls.getpeercert()
            assert peer is not None
            return int(str(peer["serialNumber"]), 16)

    first = await asyncio.to_thread(serial)
    renewed = tls_files.ca.issue_cert("localhost", "127.0.0.1")
    renewed.private_key_pem.write_to_path(str(key))
    renewed.private_key_and_cert_chain_pem.write_to_path(str(cert))
    second = await asyncio.to_thread(serial)
    assert second != first
    # A half-written renewal (a key that does not match) keeps the working certificate.
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(str(key))
    assert await asyncio.to_thread(serial) == second
    rc, code, _ = await acurl(relay, "/healthz", "--cacert", str(tls_files.ca_file))
    assert (rc, code) == (0, "200")


async def test_metrics_networks_apart_from_the_page(relays: RelayFactory) -> None:
    data = relays.config()
    data["http"] = {"bind": "127.0.0.1:0", "networks": ["192.0.2.0/24"],
                    "metrics_networks": ["127.0.0.0/8"]}
    relay = await relays.start(data)
    _rc, code, body = await acurl(relay, "/", scheme="http")
    assert code == "403" and "not in http.networks" in body
    assert (await acurl(relay, "/api/status", scheme="http"))[1] == "403"
    assert (await acurl(relay, "/metrics", scheme="http"))[1] == "200"
    assert (await acurl(relay, "/healthz", scheme="http"))[1] == "200"
    await relays.stop(relay)
    data["http"] = {"bind": "127.0.0.1:0", "metrics_networks": ["192.0.2.10"]}
    relay = await relays.start(data)
    assert (await acurl(relay, "/", scheme="http"))[1] == "200"
    _rc, code, body = await acurl(relay, "/metrics", scheme="http")
    assert code == "403" and "not in http.metrics_networks" in body


async def test_warning_at_start_when_open_beyond_loopback(
        relays: RelayFactory, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture) -> None:
    data = relays.config()
    # All interfaces, but the test only ever connects over loopback.
    data["http"] = {"bind": "0.0.0.0:0", "networks": ["10.0.0.0/8", "127.0.0.0/8"]}
    with caplog.at_level(logging.WARNING, logger="m365relay.http"):
        relay = await relays.start(data)
    warned = [r.getMessage() for r in caplog.records if r.name == "m365relay.http"]
    assert len(warned) == 1
    assert "without a password" in warned[0] and "http.basic_auth_users" in warned[0]
    assert "10.0.0.0/8" in warned[0]
    await relays.stop(relay)

    def warnings(**http: Any) -> list[str]:
        settings = config_mod.parse({**data, "http": http}).http
        assert settings is not None
        return exposure_warnings(settings)

    assert warnings(bind="127.0.0.1:9925", networks=["0.0.0.0/0"]) == []  # loopback bind
    assert warnings(bind="0.0.0.0:9925") == []  # only loopback clients allowed
    assert warnings(bind="0.0.0.0:9925", networks=["10.0.0.0/8"],
                    basic_auth_users={USER: relays.password_hash},
                    tls={"certificate": str(tls_files.cert),
                         "private_key": str(tls_files.key)}) == []
    clear = warnings(bind="0.0.0.0:9925", networks=["10.0.0.0/8"],
                     basic_auth_users={USER: relays.password_hash})
    assert len(clear) == 1 and "in clear" in clear[0] and "http.tls" in clear[0]


def test_http_access_config_errors_name_the_key(relays: RelayFactory, tmp_path: Path,
                                                tls_files: TLSFiles) -> None:
    other_key = tmp_path / "other.key"
    trustme.CA().issue_cert("x.example").private_key_pem.write_to_path(str(other_key))
    data = relays.config()
    data["http"] = {"metrics_networks": ["prometheus"],
                    "tls": {"certificate": str(tls_files.cert), "private_key": str(other_key)},
                    "basic_auth_users": {"ops": "$2y$10$abcdefghijklmnopqrstuv",
                                         "a:b": relays.password_hash}}
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.parse(data)
    problems = info.value.problems
    assert any(p.startswith("http.metrics_networks: 'prometheus' is not an IP")
               for p in problems)
    assert any(p.startswith("http.tls: cannot use certificate") and "belong together" in p
               for p in problems)
    assert any(p.startswith("http.basic_auth_users.ops: not an argon2 hash")
               and "m365relay hash-password" in p for p in problems)
    assert any(p.startswith("http.basic_auth_users.a:b: a user name") for p in problems)
    data["http"] = {"tls": {"certificate": str(tmp_path / "missing.pem")}}
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.parse(data)
    assert "http.tls.private_key: required key is missing" in info.value.problems
    assert any(p.startswith("http.tls.certificate: cannot read") for p in info.value.problems)


# --- Prometheus, for real --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape_config(relay: Relay, tls_files: TLSFiles, folder: Path) -> Path:
    assert relay.http_address is not None
    host, port = relay.http_address
    (folder / "password").write_text(PASSWORD + "\n")
    (folder / "wrong").write_text("not it\n")

    def job(name: str, password_file: Path) -> dict[str, Any]:
        return {"job_name": name, "scheme": "https", "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "tls_config": {"ca_file": str(tls_files.ca_file), "server_name": "localhost"},
                "basic_auth": {"username": USER, "password_file": str(password_file)},
                "static_configs": [{"targets": [f"{host}:{port}"]}]}

    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump({"global": {"evaluation_interval": "1s"},
                                    "rule_files": [str(Path(__file__).resolve().parent.parent
                                                       / "deploy/prometheus/m365relay-rules.yml")],
                                    "scrape_configs": [job("m365relay", folder / "password"),
                                                       job("wrong-password", folder / "wrong")]}))
    return path


def _api(port: int, path: str) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return json.loads(response.read())["data"]


@pytest.mark.slow
async def test_prometheus_scrapes_over_tls_with_basic_auth(
        relays: RelayFactory, tls_files: TLSFiles, tmp_path: Path) -> None:
    relay = await relays.start(secured(relays, tls_files))
    config = scrape_config(relay, tls_files, tmp_path)
    checked = subprocess.run([need("promtool", "prometheus"), "check", "config", str(config)],
                             capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    port = _free_port()
    server = subprocess.Popen(
        [need("prometheus", "prometheus"), f"--config.file={config}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"))
    try:
        health = await _wait_for_targets(port, {"m365relay", "wrong-password"}, server)
        assert health["m365relay"][0] == "up", health
        assert health["wrong-password"][0] == "down"
        # 401, or 429 once auth_limits.failures_per_ip blocks the guessing address.
        assert re.search(r"\b(401|429)\b", health["wrong-password"][1]), health
        result = await asyncio.to_thread(_api, port, "/api/v1/query?query=m365relay_build_info")
        assert result["result"][0]["metric"]["job"] == "m365relay"
    finally:
        server.terminate()
        await asyncio.to_thread(server.wait, 30)


async def _wait_for_targets(port: int, jobs: set[str], server: subprocess.Popen[bytes],
                            timeout: float = 60.0) -> dict[str, tuple[str, str]]:
    """Poll Prometheus' targets API until m365relay is up and the other jobs were scraped.
    (The first scrape may time out: it pays for the argon2 check and for first imports.)"""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    health: dict[str, tuple[str, str]] = {}
    while loop.time() < deadline:
        assert server.poll() is None, "prometheus exited; see prometheus.log"
        try:
            data = await asyncio.to_thread(_api, port, "/api/v1/targets")
        except OSError:
            data = {"activeTargets": []}  # not listening yet
        health = {t["labels"]["job"]: (t["health"], t["lastError"])
                  for t in data["activeTargets"] if t["health"] != "unknown"}
        if set(health) >= jobs and health["m365relay"][0] == "up":
            return health
        await asyncio.sleep(0.2)
    raise TimeoutError(f"targets not scraped within {timeout}s: {health}")
