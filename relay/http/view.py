"""What the HTTP endpoint reads from the running relay: a protocol the service's ``Relay``
satisfies, so that http/ depends on the stages it shows and not on the service that owns it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import asyncio

    from relay.config.records import Config
    from relay.delivery.scheduler import Delivery
    from relay.ingress.listener import RelayHandler
    from relay.spool.store import Spool
    from relay.tokens.provider import TokenProvider


class RelayView(Protocol):
    """Read-only: the endpoint never changes the relay's state."""

    @property
    def config(self) -> Config: ...
    @property
    def hostname(self) -> str: ...
    @property
    def spool(self) -> Spool: ...
    @property
    def tokens(self) -> TokenProvider: ...
    @property
    def delivery(self) -> Delivery: ...
    @property
    def handlers(self) -> list[RelayHandler]: ...
    @property
    def servers(self) -> list[asyncio.Server]: ...
