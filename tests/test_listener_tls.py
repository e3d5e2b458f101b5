"""Listener TLS as old printers meet it: TLS 1.0/1.1 only when a listener allows it, tried
with the real `openssl s_client` (a pre-2018 printer's TLS stack), STARTTLS and implicit."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import ssl
import warnings
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import MAILBOX, RelayFactory, TLSFiles

from relay.config import records as config_mod
from relay.sandbox import Sandbox

_FLAGS = {"1.0": "-tls1", "1.1": "-tls1_1"}


def _openssl() -> str:
    found = shutil.which("openssl")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl is missing; scripts/setup installs it")
        pytest.skip("openssl (s_client) is not installed; run scripts/setup")
    return found


async def s_client(port: int, version: str, *, starttls: bool, script: bytes = b"",
                   cipher: str = "DEFAULT") -> tuple[str | None, str]:
    """Connect as a device that speaks only TLS ``version``; returns (protocol negotiated or
    None, everything s_client printed). ``script`` is sent over TLS, then s_client waits for
    the server to close."""
    args = [_openssl(), "s_client", "-connect", f"127.0.0.1:{port}", _FLAGS[version],
            # The client's own OpenSSL 3 would refuse TLS 1.0/1.1 at Debian's security level 2;
            # a printer's stack has no such rule, so the refusal tested is the server's.
            "-cipher", f"{cipher}:@SECLEVEL=0", "-ign_eof", "-nocommands", "-noservername"]
    if starttls:
        args += ["-starttls", "smtp"]
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(script), 60)
    text = out.decode(errors="replace")
    cipher = re.search(r"Cipher is (\S+)", text)
    protocol = re.search(r"Protocol\s*:\s*(\S+)", text)
    if cipher is None or cipher.group(1) == "(NONE)" or protocol is None:
        return None, text
    return protocol.group(1), text


def _listener(data: dict[str, Any], tls_files: TLSFiles, tls: str, **extra: Any) -> None:
    data["listeners"][0].update(tls=tls, certificate=str(tls_files.cert),
                                private_key=str(tls_files.key), **extra)


_MAIL = (b"EHLO old-printer\r\nMAIL FROM:<" + MAILBOX.encode() + b">\r\n"
         b"RCPT TO:<someone@example.org>\r\nDATA\r\n")
_BODY = b"Subject: scan over TLS 1.0\r\n\r\nscan\r\n.\r\nQUIT\r\n"


@pytest.mark.parametrize(("tls", "version"), [("starttls", "1.0"), ("starttls", "1.1"),
                                              ("implicit", "1.0")])
async def test_old_tls_refused_by_default_and_delivered_when_allowed(
        relays: RelayFactory, sandbox: Sandbox, tls_files: TLSFiles, *, tls: str,
        version: str, caplog: pytest.LogCaptureFixture) -> None:
    data = relays.config()
    _listener(data, tls_files, tls)
    relay = await relays.start(data)
    protocol, out = await s_client(relay.addresses["local"][1], version,
                                   starttls=tls == "starttls")
    assert protocol is None, out  # the default minimum is TLS 1.2
    await relays.stop(relay)

    data = relays.config()
    _listener(data, tls_files, tls, min_tls_version=version)
    with caplog.at_level(logging.WARNING, logger="m365relay"):
        relay = await relays.start(data)
    warning = f"listeners[local].min_tls_version is {version}"
    assert any(warning in r.getMessage() for r in caplog.records)
    protocol, out = await s_client(relay.addresses["local"][1], version,
                                   starttls=tls == "starttls", script=_MAIL + _BODY)
    assert protocol == f"TLSv{version}".replace("TLSv1.0", "TLSv1"), out
    assert "250 2.0.0 Ok: queued as" in out, out
    (got,) = await sandbox.exchange.wait_for_messages(1)
    assert b"with ESMTPS" in got.data  # the Received: line says it came over TLS


async def test_default_listener_still_speaks_tls_1_2(relays: RelayFactory,
                                                     tls_files: TLSFiles) -> None:
    data = relays.config()
    _listener(data, tls_files, "implicit", min_tls_version="1.0")
    relay = await relays.start(data)
    context = tls_files.client_context()
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", relay.addresses["local"][1], ssl=context, server_hostname="localhost")
    try:
        # A modern client still gets modern TLS from a listener that also lets 1.0 in.
        assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    finally:
        writer.close()


async def test_upstream_stays_tls_1_2_whatever_the_listeners_allow(
        relays: RelayFactory, tls_files: TLSFiles, tmp_path: Path) -> None:
    from relay.upstream.smtp import tls_context

    data = relays.config()
    _listener(data, tls_files, "starttls", min_tls_version="1.0")
    relay = await relays.start(data)
    ca = trustme.CA()
    (tmp_path / "old-ca.pem").write_bytes(ca.cert_pem.bytes())
    app = config_mod.parse({**data, "apps": {"contoso": {
        **data["apps"]["contoso"], "ca_file": str(tmp_path / "old-ca.pem")}}},
        base_dir=tmp_path).apps["contoso"]
    assert relay.config.listeners[0].min_tls_version == "1.0"

    async def handshake(newest: ssl.TLSVersion) -> str:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost").configure_cert(server_ctx)
        server_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        server_ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            server_ctx.maximum_version = newest
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0,
                                            ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            _reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=tls_context(app), server_hostname="localhost")
            version = str(writer.get_extra_info("ssl_object").version())
            writer.close()
            return version
        finally:
            server.close()

    assert await handshake(ssl.TLSVersion.TLSv1_2) == "TLSv1.2"  # the check can pass
    assert tls_context(app).minimum_version == ssl.TLSVersion.TLSv1_2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = ssl.TLSVersion.TLSv1_1
    # An "Exchange" stuck at TLS 1.1: the protocol_version alert, or the server's hang-up
    # when it arrives first.
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await handshake(old)


def test_python_ssl_here_can_do_tls_1_0_at_security_level_0() -> None:
    """The premise of `min_tls_version: "1.0"`: this machine's OpenSSL still has TLS 1.0."""
    assert ssl.HAS_TLSv1 and ssl.HAS_TLSv1_1
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.warns(DeprecationWarning):
        context.minimum_version = ssl.TLSVersion.TLSv1
    assert context.minimum_version == ssl.TLSVersion.TLSv1


def _config(listener: dict[str, Any]) -> dict[str, Any]:
    return {"listeners": [{"name": "lan", **listener}],
            "apps": {"a": {"tenant": "t", "client_id": "11111111-2222-3333-4444-555555555555",
                           "client_secret": "s"}},
            "accounts": [{"name": "n", "networks": ["127.0.0.1"], "app": "a",
                          "mailbox": "a@b.cd"}],
            "spool": {"directory": "/tmp/x"}}


@pytest.mark.parametrize(("given", "expected"), [
    (1.0, "1.0"), ("1.1", "1.1"), (1.2, "1.2"), ("1.3", "1.3")])
def test_min_tls_version_accepts_quoted_and_unquoted(tls_files: TLSFiles, given: Any,
                                                     expected: str) -> None:
    config = config_mod.parse(_config({"tls": "starttls", "certificate": str(tls_files.cert),
                                       "private_key": str(tls_files.key),
                                       "min_tls_version": given}))
    assert config.listeners[0].min_tls_version == expected


def test_min_tls_version_problems_have_key_paths(tls_files: TLSFiles) -> None:
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.parse({**_config({"tls": "starttls", "certificate": str(tls_files.cert),
                                     "private_key": str(tls_files.key),
                                     "min_tls_version": "0.9"}),
                          "listeners": [
                              {"name": "lan", "tls": "starttls", "min_tls_version": "0.9",
                               "certificate": str(tls_files.cert),
                               "private_key": str(tls_files.key)},
                              {"name": "clear", "bind": "127.0.0.1:0",
                               "min_tls_version": "1.0"}]})
    problems = info.value.problems
    assert any(p.startswith("listeners[0].min_tls_version: '0.9' is not a TLS version")
               for p in problems), problems
    assert any(p.startswith("listeners[1]:") and "only applies with tls: starttls" in p
               for p in problems), problems


async def test_rsa_only_printer_gets_the_self_signed_certificate_over_tls_1_0(
        relays: RelayFactory, sandbox: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    """Firmware with neither ECDHE nor ECDSA: TLS 1.0, RSA key exchange (AES128-SHA), and no
    certificate configured. The self-signed certificate is RSA so that this still works, and
    the log says which device needs the old TLS."""
    data = relays.config()
    data["listeners"][0].update(tls="starttls", min_tls_version="1.0")
    relay = await relays.start(data)
    with caplog.at_level(logging.INFO, logger="m365relay"):
        protocol, out = await s_client(relay.addresses["local"][1], "1.0", starttls=True,
                                       script=_MAIL + _BODY, cipher="AES128-SHA")
    assert protocol == "TLSv1", out
    assert "Cipher is AES128-SHA" in out and "250 2.0.0 Ok: queued as" in out, out
    await sandbox.exchange.wait_for_messages(1)
    assert any("TLS connection established: TLSv1 with cipher AES128-SHA (older than TLS 1.2: "
               "allowed by listeners[local].min_tls_version)" in r.getMessage()
               for r in caplog.records), caplog.text


def test_check_config_warns_about_a_legacy_tls_listener(tmp_path: Path,
                                                       tls_files: TLSFiles) -> None:
    import subprocess
    import sys

    import yaml

    data = _config({"tls": "starttls", "certificate": str(tls_files.cert),
                    "private_key": str(tls_files.key), "min_tls_version": "1.1"})
    data["spool"]["directory"] = str(tmp_path / "spool")
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(data))
    done = subprocess.run([sys.executable, "-m", "relay", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "warning: listeners[lan].min_tls_version is 1.1" in done.stderr
