"""``m365relay healthcheck``: does every listener answer with an SMTP greeting?

For Docker's HEALTHCHECK and for monitoring. It exits 0 or 1 only, as Docker wants (2 is
reserved there). A ``554`` greeting counts as alive: the relay answered, it only refuses the
checker's address by ``listeners[].networks``.
"""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass
from typing import Any

from relay.config.records import Config

# Where a wildcard bind is reached from inside the same host or container.
_LOCAL = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


@dataclass(frozen=True)
class Target:
    name: str
    host: str
    port: int
    implicit_tls: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.name} ({host}:{self.port})"


def targets(config: Config) -> list[Target]:
    return [Target(f"listeners[{lis.name}]", _LOCAL.get(lis.host, lis.host), lis.port,
                   lis.tls == "implicit") for lis in config.listeners]


def parse_address(value: str) -> Target:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:2525)")
    host = host.strip("[]")
    return Target("--address", _LOCAL.get(host, host), int(port))


def probe(target: Target, timeout: float) -> tuple[bool, str]:
    """(alive, one line saying what was seen)."""
    try:
        client = _connect(target, timeout)
    except smtplib.SMTPConnectError as exc:  # connected, but the greeting was not 220
        code, text = exc.smtp_code, exc.smtp_error
    except ConnectionRefusedError:
        return False, "nothing listens there: is the relay running, and is this the bind address?"
    except TimeoutError:
        return False, f"no greeting within {timeout:g}s: the relay is hung or overloaded"
    except (OSError, smtplib.SMTPException) as exc:
        return False, f"cannot connect: {exc}"
    else:
        code, text = 220, client.greeting
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()  # the greeting was what we came for
    reply = f"{code} {text.decode(errors='replace') if isinstance(text, bytes) else text}"
    if code == 220:
        return True, reply
    if code == 554:
        return True, (f"alive, but refuses this checker ({reply}); add 127.0.0.1/8 to the "
                      "listener's `networks` for a 220")
    return False, f"answered {reply}, not 220 (shutting down, or overloaded)"


class _Greeted(smtplib.SMTP):
    # smtplib's constructor drops the greeting text that connect() returns; keep it to show.
    greeting = b""

    def connect(self, host: str = "localhost", port: int = 0,
                source_address: Any = None) -> tuple[int, bytes]:
        code, self.greeting = super().connect(host, port, source_address)
        return code, self.greeting


class _GreetedSSL(smtplib.SMTP_SSL, _Greeted):
    pass


def _connect(target: Target, timeout: float) -> _Greeted:
    if target.implicit_tls:
        # Liveness, not identity: the listener's certificate is for the devices to check.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return _GreetedSSL(target.host, target.port, timeout=timeout, context=context)
    return _Greeted(target.host, target.port, timeout=timeout)


def check(found: list[Target], timeout: float) -> tuple[bool, list[str]]:
    lines = []
    healthy = True
    for target in found:
        alive, said = probe(target, timeout)
        healthy &= alive
        lines.append(f"{target}: {'ok' if alive else 'FAILED'}: {said}")
    return healthy, lines
