"""What `m365relay serve` imports before it listens: only what a relay with client-secret apps
needs (issue 6: idle RSS and cold start). Each module below costs megabytes or tens of
milliseconds and is imported where it is used: certificates, delegated sign-in, the `http`
endpoint, device passwords, the other commands, and the first token request."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

# Loaded later, or never, by a relay whose apps use client secrets and whose devices are
# matched by address.
LAZY = ("cryptography", "msal", "requests", "prometheus_client", "argon2", "pydantic",
        "relay.tokens.delegated", "relay.tokens.store", "relay.login", "relay.doctor.chain",
        "relay.queue.cli", "relay.http.server", "relay.http.metrics")


def modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport json, sys\n"
                          "print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, timeout=60)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_serve_starts_without_the_heavy_imports() -> None:
    loaded = modules_after("import relay.cli, relay.service.lifecycle, relay.config.env\n"
                           "relay.cli.build_parser('serve')")
    assert "relay.service.lifecycle" in loaded and "yaml" in loaded  # the check itself works
    found = sorted(name for name in loaded for lazy in LAZY
                   if name == lazy or name.startswith(lazy + "."))
    assert not found, f"imported before the listeners are up: {found}"


def test_the_full_command_list_still_has_every_command() -> None:
    loaded = modules_after("import relay.cli\n"
                           "choices = relay.cli.build_parser()._subparsers._group_actions[0]"
                           ".choices\nassert {'doctor', 'queue', 'login', 'serve'} <= set(choices)")
    assert "relay.login" in loaded


def test_the_cached_timestamp_reads_as_logging_would_write_it() -> None:
    from relay.service.logs import _TextFormatter

    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    ours, stdlib = _TextFormatter(fmt), logging.Formatter(fmt)
    # Within one second, across a second boundary, back again, and far apart.
    for created in (1_763_900_000.001, 1_763_900_000.999, 1_763_900_001.5, 1_763_900_000.25,
                    1_800_000_123.75):
        record = logging.makeLogRecord({"name": "m365relay.test", "levelno": logging.INFO,
                                        "levelname": "INFO", "msg": "hello", "created": created,
                                        "msecs": (created - int(created)) * 1000})
        assert ours.format(record) == stdlib.format(record)
