"""What the transports count for /metrics and the benchmark, one object per relay (no class
globals: two relays in one process, as in the tests, keep their own figures)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Opened"]


@dataclass
class Opened:
    """Connections to Exchange Online opened (attempts): SMTP connects and Graph sessions."""

    total: int = 0
