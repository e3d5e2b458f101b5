"""Lifecycle: start, serve, drain with a deadline, stop.

* start: open the spool (clean ``tmp/``, move damaged entries to ``corrupt/``), schedule what is
  queued, then bind the listeners; a port that cannot be bound fails the start.
* serve: until SIGTERM or SIGINT; SIGHUP reloads accounts, apps and delivery settings from the
  config file, keeping the running config when the new one is invalid.
* drain: stop accepting, send idle clients ``421``, give clients mid-DATA and in-flight
  deliveries until the deadline, then cancel. Whatever was not delivered stays in the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING

from relay import logsafe
from relay.config import records as config_mod
from relay.config.records import Config, Listener
from relay.delivery.changes import follow
from relay.delivery.passthrough import Passthrough
from relay.delivery.scheduler import Delivery
from relay.http.view import ListenerSnapshot
from relay.ingress.limits import AuthGuard
from relay.ingress.listener import RelayHandler, start_listener
from relay.ingress.tls import ServerTLS, legacy_warning
from relay.message import QueueEntry
from relay.service.notify import Notifier
from relay.spool.base import Store
from relay.spool.filestore import FileStore
from relay.spool.open import open_store
from relay.spool.store import Spool
from relay.tokens.provider import TokenProvider
from relay.tokens.signins import SignInsUnavailable
from relay.upstream.smtp import reset_tls_contexts

if TYPE_CHECKING:
    from relay.http.server import WebServer

log = logging.getLogger("m365relay.service")


class StartupError(Exception):
    """The relay could not start (port in use, spool not writable); the message says why."""


class Relay:
    def __init__(self, config: Config, *, config_path: Path | None = None,
                 store: Store | None = None) -> None:
        """``store``: the queue, if not the file store of ``spool.directory`` (another
        implementation of :class:`~relay.spool.base.Store`)."""
        logsafe.install()  # also when embedded: the host application owns logging
        logsafe.register_config_secrets(config)
        self.config = config
        self.config_path = config_path
        self.hostname = config.hostname or socket.gethostname()
        if store is None:
            store = open_store(config.spool)
        self.store: Store = store  # what every stage uses
        self.tokens = TokenProvider(config.apps, margin=config.delivery.token_refresh_margin)
        self.tokens.use_delegated(config, config_path)
        self.delivery = Delivery(config, self.store, self.tokens, hostname=self.hostname)
        self._follower: asyncio.Task[None] | None = None  # applies the store's change notices
        self.handlers: list[RelayHandler] = []
        self.auth_guard = AuthGuard()  # failed logins count across all listeners
        self.servers: list[asyncio.Server] = []
        self.tls: dict[str, ServerTLS] = {}  # per listener with TLS; certificates reload
        self.addresses: dict[str, tuple[str, int]] = {}
        self.web: WebServer | None = None  # the `http` endpoint, when configured
        self.http_address: tuple[str, int] | None = None
        self._stop = asyncio.Event()
        self.notifier = Notifier()

    @property
    def spool(self) -> Spool:
        """The file store's blocking API, for tests and the benchmark; the relay's own code
        goes through :attr:`store`."""
        if not isinstance(self.store, FileStore):
            raise TypeError("this relay's store is not the file store")
        return self.store.spool

    def listener_snapshots(self) -> list[ListenerSnapshot]:
        """The listeners as /metrics, /readyz and the status page see them now."""
        return [ListenerSnapshot(name=h.listener.name, serving=s.is_serving(),
                                 closing=h.closing, sessions=len(h.sessions),
                                 auth_failures=h.auth_failures,
                                 ack_buckets=tuple(h.ack_latency.cumulative()),
                                 ack_sum=h.ack_latency.sum)
                for h, s in zip(self.handlers, self.servers, strict=False)]

    async def _share_signins(self) -> None:
        """Cluster mode: delegated sign-ins in the queue's database, one copy for all nodes."""
        rows = getattr(self.store, "signins", None)
        dsn = self.config.spool.postgres
        if rows is None or dsn is None or self.config.token_store is None:
            return
        shared = self.tokens.share_signins(rows, self.config.token_store.key.value,
                                           dsn.shown, self.config_path)
        if shared is not None:
            try:
                await shared.refresh_known()
            except SignInsUnavailable as exc:  # the store just opened; the status page waits
                log.warning("%s", exc)

    async def start(self) -> None:
        try:
            # Also starts listening for changes, before the scan, so a `m365relay queue`
            # notice sent meanwhile is not missed.
            entries = await self.store.open()
        except OSError as exc:
            raise StartupError(f"cannot open the spool {self.config.spool.directory}: "
                               f"{exc.strerror or exc}; check `spool.directory` and that the "
                               "relay's user owns it") from None
        await self._share_signins()
        for entry in entries:
            self.delivery.submit(entry)
        if entries:
            log.info("spool: %d message(s) queued from before the start", len(entries))
        self._follower = asyncio.create_task(follow(self.delivery), name="queue changes")
        passthrough = Passthrough(self.delivery, self.store)
        for listener in self.config.listeners:
            handler = RelayHandler(listener, self.config, self.store,
                                   functools.partial(self._accepted, listener.name),
                                   self.hostname, guard=self.auth_guard, passthrough=passthrough)
            context = await self._server_tls(listener)
            try:
                server = await start_listener(listener, handler, context)
            except OSError as exc:
                await self.stop(timeout=0)
                raise StartupError(f"listeners[{listener.name}]: cannot listen on "
                                   f"{listener.bind}: {exc.strerror or exc} (port in use, or "
                                   "ports below 1024 need CAP_NET_BIND_SERVICE)") from None
            self.handlers.append(handler)
            self.servers.append(server)
            host, port = server.sockets[0].getsockname()[:2]
            self.addresses[listener.name] = (host, port)
            log.info("listener %s ready on %s:%d (tls: %s)", listener.name, host, port,
                     listener.tls)
        if self.config.http is not None:
            from relay.http.server import WebServer  # prometheus_client: ~5 MB, only with `http:`

            self.web = WebServer(self, self.config.http)
            try:
                self.http_address = await self.web.start()
            except OSError as exc:
                await self.stop(timeout=0)
                raise StartupError(f"http: cannot listen on {self.config.http.bind}: "
                                   f"{exc.strerror or exc}; change http.bind") from None

    async def _server_tls(self, listener: Listener) -> ssl.SSLContext | None:
        if listener.tls == "none":
            return None
        tls = ServerTLS(listener, self.config.spool.directory)
        try:
            served = await asyncio.to_thread(tls.load)
        except (OSError, ValueError) as exc:
            await self.stop(timeout=0)
            raise StartupError(f"listeners[{listener.name}]: cannot use the TLS certificate: "
                               f"{exc}; check `listeners[{listener.name}].certificate` and "
                               "`private_key` (PEM, the key matching the certificate)") from None
        self.tls[listener.name] = tls
        log.info("listener %s: serving %s, SHA-256 fingerprint %s", listener.name,
                 served.source, served.fingerprint)
        warning = legacy_warning(listener)
        if warning is not None:
            log.warning("%s", warning)
        return tls.context

    def _accepted(self, listener: str, entry: QueueEntry) -> None:
        self.delivery.events.accepted(listener, entry)
        self.delivery.submit(entry)

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self, *, shutdown_timeout: float = 30.0) -> None:
        """Run until a stop signal, then drain. Installs SIGTERM/SIGINT/SIGHUP handlers."""
        loop = asyncio.get_running_loop()
        handled = []
        for sig, callback in ((signal.SIGTERM, self.request_stop),
                              (signal.SIGINT, self.request_stop),
                              (signal.SIGHUP, self.reload)):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, callback)
                handled.append(sig)
        # READY only now: a `systemctl reload` before the SIGHUP handler exists would kill us.
        self.notifier.ready(self._status())
        watchdog = asyncio.create_task(self.notifier.watchdog_loop())
        try:
            await self._stop.wait()
            log.info("stopping: draining for up to %.0fs", shutdown_timeout)
            self.notifier.stopping(f"draining for up to {shutdown_timeout:.0f}s")
            await self.stop(timeout=shutdown_timeout)
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            self.notifier.close()
            for sig in handled:
                loop.remove_signal_handler(sig)

    def _status(self) -> str:
        listening = ", ".join(f"{name} on {host}:{port}"
                              for name, (host, port) in self.addresses.items())
        return f"relaying: {listening}"

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            self._reload()
        finally:
            self.notifier.ready(self._status())

    def _reload(self) -> None:
        if self.config_path is None:
            log.warning("SIGHUP: no config file to reload")
            return
        try:
            new = config_mod.load(self.config_path)
        except config_mod.ConfigError as exc:
            log.error("SIGHUP: new config refused, still running the old one.\n%s", exc)
            return
        if _restart_only(new.listeners) != _restart_only(self.config.listeners):
            log.warning("SIGHUP: listener changes need a restart; applying the rest")
        if new.spool != self.config.spool:
            log.warning("SIGHUP: spool changes need a restart; applying the rest")
        if new.http != self.config.http:
            log.warning("SIGHUP: http changes need a restart; applying the rest")
        logsafe.register_config_secrets(new)
        self.auth_guard.reload()  # accounts and hashes may have changed: verify afresh
        self.config = new
        # Files the config names are read again too (config.load read the secrets): CA
        # files, PFX, certificates; token clients and TLS contexts built from them start anew.
        changed = self.tokens.update(new.apps, margin=new.delivery.token_refresh_margin)
        reset_tls_contexts()
        self.tokens.use_delegated(new, self.config_path)
        self.delivery.config = new
        self.delivery.reloaded(changed)
        if changed:
            log.info("SIGHUP: apps %s changed (settings or files): new token clients and "
                     "connections", ", ".join(sorted(changed)))
        for handler in self.handlers:
            listener = next((lis for lis in new.listeners if lis.name == handler.listener.name),
                            handler.listener)
            handler.config = new
            handler.listener = listener
            tls = self.tls.get(listener.name)
            if tls is not None and listener.tls != "none":
                # Certificate files are read again (a Let's Encrypt renewal keeps the paths);
                # new connections get the new one, open sessions keep theirs.
                tls.reload(listener)
        log.info("SIGHUP: config reloaded (%d apps, %d accounts)", len(new.apps),
                 len(new.accounts))

    async def stop(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for server in self.servers:
            server.close()
        for handler in self.handlers:
            handler.closing = True
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        await self._drain_sessions(deadline)
        await self.delivery.drain(max(deadline - time.monotonic(), 0.0))
        await self.store.close()
        self.tokens.close()
        if self.web is not None:  # last, so /readyz says "shutting down" while draining
            await self.web.close()
        log.info("stopped")

    async def _drain_sessions(self, deadline: float) -> None:
        while True:
            busy = 0
            for handler in self.handlers:
                handler.changed.clear()
                for session in list(handler.sessions):
                    if session.in_transaction:
                        busy += 1
                    else:
                        session.close_for_shutdown()
            remaining = deadline - time.monotonic()
            if not busy or remaining <= 0:
                break
            waits = [asyncio.create_task(h.changed.wait()) for h in self.handlers]
            await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for task in waits:
                task.cancel()
        for handler in self.handlers:
            for session in list(handler.sessions):
                if session.in_transaction:
                    log.warning("shutdown: closing %s mid-transaction (it was not "
                                "acknowledged; the client will retry)", session.client)
                session.close_for_shutdown()


def _restart_only(listeners: tuple[Listener, ...]) -> list[Listener]:
    """The listeners without what a reload applies to them itself (the certificate files and
    the self-signed certificate's name, relay/ingress/tls.py); records compare field by field."""
    return [dataclasses.replace(lis, certificate=None, private_key=None, hostname=None)
            for lis in listeners]


async def run(config: Config, *, config_path: Path | None = None,
              shutdown_timeout: float = 30.0) -> None:
    relay = Relay(config, config_path=config_path)
    await relay.start()
    # The process is the relay's alone: what start-up loaded stays for good, so move it out of
    # the collector's way (a full collection walks it all: ~20 ms with the event loop stalled).
    # Not in Relay: an application embedding it owns its own heap.
    gc.freeze()
    await relay.serve(shutdown_timeout=shutdown_timeout)
