"""The benchmark harness works: a quick m365relay run verifies, and the checker catches damage.

Only the smallest scenario, only m365relay (no emailproxy virtualenv needed); the real runs are
`bench/run`, never part of the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pgserver import available as pg_problem

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is not an installed package; the relay is
    sys.path.insert(0, str(ROOT))

from bench.messages import RCPT, make, verify  # noqa: E402


def _as_received(data: bytes, mailbox: str, connection: int = 1) -> dict[str, Any]:
    end = data.find(b"\r\n\r\n")
    return {"mailbox": mailbox, "mail_from": mailbox, "rcpt": [RCPT], "connection": connection,
            "head": data[:end + 2].decode("latin-1"),
            "body_sha256": hashlib.sha256(data[end + 4:]).hexdigest(), "size": len(data),
            "arrival": 0.0}


def test_quick_auth_run_logs_in_every_time_and_checks_once(tmp_path: Path) -> None:
    # issue 14: a printer logging in for every message, from one address.
    out = tmp_path / "auth.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenario", "printer-auth",
         "--rounds", "1", "--no-install", "--no-pin", "--json", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [run] = json.loads(out.read_text())["runs"]  # relay only: the other targets need no AUTH
    assert run["target"] == "m365relay" and run["ok"], run
    assert run["auth_logins"] == run["messages"] == run["client_connections"] > 1
    assert run["auth_checks"] == 1  # the credential cache recognised every later login
    assert run["client_login_refused"] == 0


def test_quick_relay_run_delivers_and_verifies(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenario", "printer",
         "--target", "m365relay", "--rounds", "1", "--no-install", "--no-pin",
         "--json", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    [run] = data["runs"]
    assert run["target"] == "m365relay" and run["ok"], run
    assert run["verified"]["delivered"] == run["messages"] > 0
    assert run["verified"]["added_headers"].get("received") == run["messages"]
    assert run["token_requests"] == 1
    assert run["msgs_per_s"] > 0 and run["sut_peak_rss"] > 0 and run["cold_start_s"] > 0
    assert "printer" in proc.stdout  # the terminal table


@pytest.mark.slow
def test_quick_cluster_runs_deliver_verify_and_count_round_trips(tmp_path: Path) -> None:
    # One relay on PostgreSQL and two on one database, beside the file store: the queue-empty
    # check on the shared table, and pg_stat_statements' counts per message.
    problem = pg_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    out = tmp_path / "pg.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenario", "burst",
         "--target", "m365relay", "--target", "m365relay-pg", "--target", "m365relay-pg2",
         "--rounds", "1", "--no-install", "--no-pin", "--json", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = {r["target"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"m365relay", "m365relay-pg", "m365relay-pg2"}
    for target in ("m365relay-pg", "m365relay-pg2"):
        run = runs[target]
        assert run["ok"] and run["spool_backlog"] == 0, run
        assert run["verified"]["delivered"] == run["messages"] > 0
        assert run["relays"] == (2 if target == "m365relay-pg2" else 1)
        # Counted for real: the accept, claim and (batched) delivery record of every message.
        full = {s["query"]: s["calls"] for s in run["db_statements"]}
        accept = next(n for q, n in full.items() if q.startswith("WITH m AS ( INSERT"))
        assert accept == run["messages"]
        deletes = full["DELETE FROM messages WHERE id = ANY($1::text[])"]
        assert 0 < deletes <= run["messages"]
        assert run["db_round_trips_per_msg"] >= 2 and run["db_xacts_per_msg"] >= 2
    assert "m365relay-pg/m365relay = " in proc.stdout  # the ratio for the issue
    assert "statements per message" in proc.stdout


def test_checker_accepts_added_headers_and_flags_every_kind_of_damage() -> None:
    rng = random.Random(7)
    box = "bench-mailbox-0@contoso.example"
    sent = {m.id: m for m in (make("t", i, box, 2048, rng) for i in range(5))}
    good = [_as_received(b"Received: from device by relay\r\n" + m.data, box)
            for m in sent.values()]
    assert verify(sent, set(sent), good).ok

    m0, m1, m2, m3, _m4 = sent.values()
    flipped = m1.data.replace(b"..two dots", b".two dots")        # lost dot-stuffing
    rewritten = m2.data.replace(b"Subject: ", b"Subject: [ext] ")  # header changed
    damaged = [
        good[0], good[0],                      # m0 twice
        _as_received(flipped, box),
        _as_received(rewritten, box),
        _as_received(m3.data, "other@contoso.example"),  # wrong mailbox
        # m4 never arrives
    ]
    verdict = verify(sent, set(sent), damaged)
    assert not verdict.ok
    assert (verdict.duplicates, verdict.corrupted, verdict.lost) == (1, 3, 1)
    assert verify(sent, {m0.id}, good[:2]).unexpected == 1  # arrived without a 250
