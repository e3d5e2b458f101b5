"""A raw SMTP client for tests that must send bytes no library would (bare LF, pipelining)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from types import TracebackType

_LAST_LINE = re.compile(rb"^\d{3}(?: |$)")


class RawSMTP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, address: tuple[str, int], *, source: str | None = None,
                      limit: int = 1 << 20) -> RawSMTP:
        reader, writer = await asyncio.open_connection(
            *address, local_addr=(source, 0) if source else None, limit=limit)
        return cls(reader, writer)

    async def __aenter__(self) -> RawSMTP:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def reply(self, timeout: float = 10.0) -> str:
        """One whole reply (all lines of a multi-line one); '' if the server hung up."""
        lines = []
        async with asyncio.timeout(timeout):
            while True:
                line = await self.reader.readline()
                if not line:
                    return b"".join(lines).decode("utf-8", "replace")
                lines.append(line)
                if _LAST_LINE.match(line):
                    return b"".join(lines).decode("utf-8", "replace")

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: str | bytes, timeout: float = 10.0) -> str:
        await self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply(timeout)

    async def closed(self, timeout: float = 10.0) -> bool:
        """True once the server has closed the connection (reads up to EOF)."""
        async with asyncio.timeout(timeout):
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionError:
                pass
        return True

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        await self.writer.start_tls(context, server_hostname=server_hostname)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()

    async def transaction(self, sender: str = "device@printers.example",
                          rcpt: str = "someone@example.org") -> None:
        """EHLO, MAIL, RCPT and DATA, each answered as expected; ready for content."""
        assert (await self.command("EHLO device.test")).startswith("250")
        assert (await self.command(f"MAIL FROM:<{sender}>")).startswith("250")
        assert (await self.command(f"RCPT TO:<{rcpt}>")).startswith("250")
        assert (await self.command("DATA")).startswith("354")
