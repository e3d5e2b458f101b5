"""Who may see the HTTP endpoint: TLS, HTTP Basic with argon2 hashes, and start-up warnings.

Modelled on the Prometheus exporter toolkit's web config (``tls_server_config``,
``basic_auth_users``), so Prometheus scrapes the relay as it scrapes any exporter, with
``tls_config.ca_file`` and ``basic_auth``. Passwords are argon2 (the hashes devices' accounts
use, `m365relay hash-password`), not bcrypt as in the exporter toolkit.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import ssl
from pathlib import Path

from relay.config.files import Stamp, stat_stamps
from relay.config.records import AuthLimits, HttpSettings, HttpTls
from relay.config.values import IPNetwork
from relay.ingress.limits import AuthGuard
from relay.ingress.tls import serve_current, server_context
from relay.policy import passwords

log = logging.getLogger("m365relay.http")



class ReloadingTls:
    """A server context whose certificate is read again when its files change.

    The listening socket keeps one context; its SNI callback, called for every handshake,
    hands the connection the current one, so a renewed certificate (certbot, cert-manager)
    is used from the next connection on without a restart."""

    def __init__(self, settings: HttpTls) -> None:
        self.settings = settings
        self._stamp = self._files_stamp()
        self.context = self._current = self._load()
        serve_current(self.context, self.current)

    def _load(self) -> ssl.SSLContext:
        return server_context("1.2", self.settings.certificate, self.settings.private_key)

    def _files_stamp(self) -> tuple[Stamp | None, ...]:
        return stat_stamps((self.settings.certificate, self.settings.private_key))

    def current(self) -> ssl.SSLContext:
        stamp = self._files_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._current = self._load()
                log.info("http: TLS certificate %s loaded again", self.settings.certificate)
            except (OSError, ValueError) as exc:  # (ssl.SSLError is an OSError)
                # Mid-renewal the key and certificate may not match for a moment: keep serving
                # the old pair, and try again at the next change.
                log.error("http: cannot load the renewed http.tls certificate %s: %s; still "
                          "using the previous one", self.settings.certificate, exc)
        return self._current


class TooManyFailures(Exception):
    """This address or user name failed too often (auth_limits); refused without a check."""


class BasicAuth:
    """HTTP Basic against ``http.basic_auth_users``; checks run in a thread, two at a time.

    Failed passwords count per address and per user name with the listeners' rules
    (``auth_limits``, relay/ingress/limits.py), in a guard of the endpoint's own, so a
    guessed web password is no cheaper than a guessed device password."""

    def __init__(self, users: dict[str, str], limits: AuthLimits) -> None:
        self.users = users
        self.limits = limits
        # The devices' guard, an instance of the endpoint's own: the same failure limits, check
        # slots and credential cache (a scrape every 15 s must not cost an argon2 check).
        self.guard = AuthGuard()

    async def check(self, header: str | None, ip: str) -> str | None:
        """The user name if ``header`` (the Authorization value) is valid, else None; raises
        TooManyFailures while ``ip`` or the user name is blocked."""
        if not header or header[:6].lower() != "basic ":
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        if not sep:
            return None
        stored = self.users.get(user)
        secret = password.encode()
        cache_key = (None if stored is None else
                     self.guard.cache.key(user.encode(), secret, stored))
        # An unknown user is checked against a dummy hash: as slow as a wrong password.
        verdict = await self.guard.check(self.limits, ip, user, cache_key,
                                         lambda: passwords.verify(stored, secret))
        if verdict.refusal is not None:
            log.warning("http: login for %r from %s refused without a check: %s", user, ip,
                        verdict.refusal.why)
            raise TooManyFailures(verdict.refusal.reply.removeprefix("454 4.7.0 "))
        for what in verdict.blocked:
            log.warning("http: %s %s blocked for %ds after %s failed logins "
                        "(auth_limits)", what, ip if what == "address" else repr(user),
                        self.limits.block, "failures_per_ip" if what == "address"
                        else "failures_per_user")
        return user if verdict.ok and stored is not None else None


def _loopback_only(networks: tuple[IPNetwork, ...]) -> bool:
    # Loopback is a /8 and a /128: a network inside it has only loopback addresses.
    return all(net.network_address.is_loopback and net.broadcast_address.is_loopback
               for net in networks)


def _loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def exposure_warnings(settings: HttpSettings) -> list[str]:
    """What start-up should warn about: the page open beyond loopback without a password,
    or passwords sent in clear."""
    if _loopback_host(settings.host):
        return []
    warnings = []
    if not _loopback_only(settings.networks) and not settings.basic_auth_users:
        warnings.append(
            f"http: the status page and /api/status (senders, recipients, Entra error texts) "
            f"are open without a password to every host in http.networks "
            f"({', '.join(map(str, settings.networks))}); set http.basic_auth_users (hashes "
            "from `m365relay hash-password`) and http.tls, or narrow http.networks")
    exposed = settings.networks + settings.scrape_networks
    if settings.basic_auth_users and settings.tls is None and not _loopback_only(exposed):
        warnings.append("http: basic_auth_users without http.tls: passwords cross the network "
                        "in clear; set http.tls.certificate and http.tls.private_key")
    return warnings


def certificate_path(settings: HttpSettings) -> Path | None:
    return settings.tls.certificate if settings.tls is not None else None
