"""The fakes process: the sandbox's Entra ID and Exchange Online, driven over stdin/stdout.

It runs apart from the load generator and the system under test so their CPU time can be told
apart (and pinned; see ``procstat.plan_layout``). The harness sends one JSON object per line on
stdin and reads one JSON reply per line on stdout:

* ``hello`` (sent unasked at start): ports, CA file, app credentials;
* ``reset``: forget recorded messages, token requests, connections and faults;
* ``faults {"drop": p, "data_432": p, "seed": n}``: per DATA attempt, hang up after the final
  dot with probability ``drop`` (nothing is recorded, like a connection lost before Exchange
  committed), else answer ``432 4.3.2`` with probability ``data_432`` of all attempts;
* ``wait {"n": N, "timeout": s}``: reply once N messages are stored, or at the timeout;
* ``stats`` / ``report``: counters, and with ``report`` one summary per stored message
  (header block, body digest, CLOCK_MONOTONIC arrival time, which is system-wide on Linux,
  so the harness can compare it with its own clock).

Run as ``python -m bench.fakes --dir DIR``; it exits when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import random
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from relay.sandbox import DEMO_APP, SCOPE, FakeExchange, ReceivedMessage, Sandbox
from relay.sandbox.rules import MICROSOFT

# What Exchange Online says when a mailbox has too many submissions in flight.
REPLY_432 = ("432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded "
             "[Hostname=SANDBOX.outlook.example]")


class BenchExchange(FakeExchange):
    """FakeExchange plus arrival times and probabilistic faults; no mail files on disk."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: list[float] = []
        self.fault_counts: Counter[str] = Counter()
        self.drop = 0.0
        self.data_432 = 0.0
        self._rng = random.Random(0)

    def set_faults(self, drop: float, data_432: float, seed: int) -> None:
        self.drop, self.data_432 = drop, data_432
        self._rng = random.Random(seed)

    def reset(self) -> None:
        super().reset()
        self.arrivals.clear()
        self.fault_counts.clear()
        self.drop = self.data_432 = 0.0

    # _take and _record are FakeExchange internals; pass their arguments through untouched so
    # a change of signature in the sandbox does not break the benchmark.
    def _take(self, stage: str, *args: Any, **kwargs: Any) -> str | None:
        injected = super()._take(stage, *args, **kwargs)
        if injected is not None:
            return injected
        if stage == "drop_after_data" and self.drop and self._rng.random() < self.drop:
            self.fault_counts["drop_after_data"] += 1
            return "drop"
        # handle_DATA asks "data" only for attempts that were not dropped; scale so that
        # data_432 is the share of all attempts.
        if stage == "data" and self.data_432 and \
                self._rng.random() < self.data_432 / (1 - self.drop):
            self.fault_counts["432"] += 1
            return REPLY_432
        return None

    async def _record(self, *args: Any, **kwargs: Any) -> ReceivedMessage:
        message = await super()._record(*args, **kwargs)
        self.arrivals.append(time.monotonic())
        return message


def summarize(message: ReceivedMessage, arrival: float) -> dict[str, Any]:
    data = message.data
    end = data.find(b"\r\n\r\n")
    head, body = (data, b"") if end < 0 else (data[:end + 2], data[end + 4:])
    return {
        "mailbox": message.auth_user,
        "mail_from": message.mail_from,
        "rcpt": list(message.rcpt_tos),
        "connection": message.connection_id,
        "head": head.decode("latin-1"),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "size": len(data),
        "arrival": arrival,
    }


class Fakes:
    def __init__(self, directory: Path) -> None:
        self.box = Sandbox(directory)
        # Recording to memory only: the store under test is the fake's list, and writing
        # .eml files would spend the fakes' core on disk I/O the relay does not cause.
        # Exchange's 30 messages a minute per mailbox off, as the relay's pacing is in the
        # bench config: what is measured is the relay's own cost (issue 6). The 3 connections
        # per mailbox stay: the relay must keep to them.
        self.exchange = BenchExchange(self.box.entra, mail_dir=None,
                                      limits=replace(MICROSOFT, messages=0))
        self.box.exchange = self.exchange

    def hello(self) -> dict[str, Any]:
        box = self.box
        return {
            "entra_port": box.entra_port, "smtp_port": box.smtp_port,
            "smtp_host": box.smtp_host, "ca_file": str(box.ca_file),
            "authority": box.authority(DEMO_APP.tenant), "tenant": DEMO_APP.tenant,
            "client_id": DEMO_APP.client_id, "secret_file": str(box.secret_file),
            "token_url": f"{box.authority(DEMO_APP.tenant)}/oauth2/v2.0/token",
            "scope": SCOPE,
        }

    def stats(self) -> dict[str, Any]:
        ex = self.exchange
        return {
            "token_requests": self.box.entra.token_request_count,
            "connections": ex.connections,
            "open_connections": ex.open_connections,
            "peak_open_connections": ex.peak_open_connections,
            "auth_failures": ex.auth_failures,
            "auth_failure_reasons": ex.auth_failure_reasons[:5],
            "messages": len(ex.messages),
            "last_arrival": ex.arrivals[-1] if ex.arrivals else None,
            "faults": dict(ex.fault_counts),
        }

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("cmd")
        if command == "reset":
            self.box.reset()
            return {"ok": True}
        if command == "faults":
            self.exchange.set_faults(float(request.get("drop", 0)),
                                     float(request.get("data_432", 0)),
                                     int(request.get("seed", 0)))
            return {"ok": True}
        if command == "wait":
            with contextlib.suppress(TimeoutError):
                await self.exchange.wait_for_messages(int(request["n"]),
                                                      timeout=float(request["timeout"]))
            return self.stats()
        if command == "stats":
            return self.stats()
        if command == "report":
            out = self.stats()
            out["received"] = [summarize(m, t) for m, t in
                               zip(self.exchange.messages, self.exchange.arrivals, strict=True)]
            return out
        return {"error": f"unknown command {command!r}"}


async def serve(directory: Path) -> None:
    fakes = Fakes(directory)
    await fakes.box.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj).encode() + b"\n")
        out.flush()

    reply(fakes.hello())
    try:
        while line := await reader.readline():
            reply(await fakes.handle(json.loads(line)))
    finally:
        await fakes.box.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    asyncio.run(serve(args.dir))


if __name__ == "__main__":
    main()
