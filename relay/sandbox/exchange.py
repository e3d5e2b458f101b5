"""FakeExchange: smtp.office365.com's submission dialogue, on aiosmtpd, in the running loop.

It speaks the parts of Exchange Online a relay depends on: STARTTLS before AUTH, AUTH
XOAUTH2 checked against FakeEntra's signed tokens, SendAs enforcement at the end of DATA,
and Exchange's reply texts. It records every accepted message and can be told to fail any
stage, so tests assert on what the relay really sent. The dialogue is
:mod:`relay.sandbox.exchangewire`; what it records and is told, :mod:`relay.sandbox.exchangestate`.
"""

from __future__ import annotations

import asyncio
import ssl

from relay.sandbox.exchangestate import ExchangeState
from relay.sandbox.exchangestate import ReceivedMessage as ReceivedMessage  # noqa: PLC0414
from relay.sandbox.exchangewire import ExchangeSession


class FakeExchange(ExchangeState):
    """The state (recordings, injections, limits) served on a TLS-capable SMTP socket."""

    async def start(self, host: str, port: int, tls: ssl.SSLContext) -> int:
        if self.mail_dir is not None:
            # Received mail is private: readable by the sandbox's user only.
            self.mail_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.mail_dir.chmod(0o700)
            # Continue numbering so a restarted sandbox never overwrites earlier mail.
            self._seq = max((int(p.stem) for p in self.mail_dir.glob("*.eml")
                             if p.stem.isdigit()), default=0)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ExchangeSession(self, tls, loop), host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = [t for t in (s.hang_up() for s in list(self._sessions)) if t is not None]
        await server.wait_closed()
        # Let the aborted sessions' tasks finish so no task outlives the loop.
        await asyncio.gather(*tasks, return_exceptions=True)
