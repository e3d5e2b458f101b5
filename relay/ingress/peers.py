"""Who is on the other end of a session: the peer's address (an IPv4 client on a dual-stack
socket unwrapped to IPv4), whether it is in a configured network, and client-supplied text
made safe for a log line."""

from __future__ import annotations

import ipaddress
from typing import Any

from relay.config.values import IPNetwork


def safe(text: str, limit: int = 200) -> str:
    """Client-supplied text for a log line: printable, bounded."""
    return text.encode("unicode_escape", errors="backslashreplace").decode("ascii")[:limit]


def peer_ip(peer: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(peer[0])
    except (TypeError, ValueError, IndexError):
        return None
    # An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d; match it as IPv4.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def in_networks(address: Any, networks: tuple[IPNetwork, ...]) -> bool:
    return address is not None and any(address in net for net in networks)
