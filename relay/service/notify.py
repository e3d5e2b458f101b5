"""systemd's notify protocol (sd_notify), spoken directly: READY, RELOADING, STOPPING, WATCHDOG.

Each message is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket named in
``$NOTIFY_SOCKET`` (a leading ``@`` means Linux's abstract namespace). With ``Type=notify``
systemd counts the service as started only on ``READY=1``, so ``systemctl start`` returns once
the listeners accept connections, and ``WatchdogSec=`` restarts a relay whose event loop hangs
(``$WATCHDOG_USEC``; we ping at half of it from the loop itself). Outside systemd every call is
a no-op, so the same code runs in a terminal, a container or a test.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("m365relay.notify")


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends sd_notify messages when systemd asked for them (``$NOTIFY_SOCKET``)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = _address(raw)
        if raw and self.address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or @abstract name; not notifying systemd",
                        raw)
        self.watchdog_interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send one message; False when not under systemd or the send failed."""
        if self.address is None:
            return False
        data = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # A full queue on systemd's side must not stall the event loop for long.
                self._sock.settimeout(1.0)
            self._sock.sendto(data, self.address)
        except OSError as exc:
            if not self._failed:
                # Said once: a watchdog ping every few seconds must not flood the log.
                log.warning("cannot notify systemd on %s: %s; systemd may consider the service "
                            "hung (check the unit's NotifyAccess=)", self.address.lstrip("\0"),
                            exc.strerror or exc)
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> bool:
        # systemd >= 253 matches RELOADING=1 to the reload request by this timestamp.
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={now}", "STATUS=reloading the config")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    async def watchdog_loop(self) -> None:
        """Ping at half the interval for as long as the event loop runs; cancel to stop."""
        if self.watchdog_interval is None or not self.enabled:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(self.watchdog_interval / 2)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between required pings, or None when systemd's watchdog is off for us."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    # WATCHDOG_PID says which process the watchdog is for; a child that inherited the
    # environment must not keep a hung parent alive.
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000
