"""The relay as a real process (`python -m relay serve`), for lifecycle and crash tests."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

READY = "ready on "


class RelayProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.port = 0
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, config_file: Path, *, shutdown_timeout: float = 10) -> RelayProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "serve", "--config", str(config_file),
            "--shutdown-timeout", str(shutdown_timeout), stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        relay = cls(proc)
        try:
            await relay.wait_ready()
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        return relay

    async def wait_ready(self, timeout: float = 30) -> None:
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stderr.readline()
                if not raw:
                    raise RuntimeError("relay exited during start:\n" + "\n".join(self.lines))
                line = raw.decode(errors="replace").rstrip()
                self.lines.append(line)
                if READY in line:
                    self.port = int(line.split(READY)[1].split()[0].rsplit(":", 1)[1])
                    break
        # Keep reading so the pipe never fills and blocks the relay.
        self._reader = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        assert self.proc.stderr is not None
        while raw := await self.proc.stderr.readline():
            self.lines.append(raw.decode(errors="replace").rstrip())

    async def wait(self, timeout: float = 30) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            if self._reader is not None:
                await self._reader
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.wait()
