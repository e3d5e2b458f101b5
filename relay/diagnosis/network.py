"""Network and TLS exceptions (connect, STARTTLS, certificate checks, timeouts), explained by
walking the exception's cause chain against a table of rules."""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from relay.config import progname
from relay.diagnosis.advice import (
    _ADMIN,
    _PLACEHOLDERS,
    _R,
    Context,
    Explanation,
    _Advice,
    _clean,
    _fields,
    _render,
)
from relay.diagnosis.smtp import explain_smtp

__all__ = ["explain_connection_error"]

_NEVER_OFF = "m365relay never switches certificate verification off."

_CERT_HOSTNAME = _Advice(
    _ADMIN,
    "The TLS certificate of {peer_host} is not valid for that name ({detail}).",
    "Use the real host name in {host_key}, not an IP address or alias{host_hint}. If a "
    "proxy inspects TLS, exempt {peer_host} or add the proxy's CA (PEM) to the file "
    "named by `apps.{app}.ca_file`. " + _NEVER_OFF,
)
_CERT_EXPIRED = _Advice(
    _ADMIN,
    "The TLS certificate of {peer_host} is expired or not yet valid ({detail}).",
    "Check this host's clock (`timedatectl status`). If the clock is right, a TLS-inspecting "
    "proxy is probably presenting an old certificate: exempt {peer_host} from inspection. "
    + _NEVER_OFF,
)
_CERT_UNTRUSTED = _Advice(
    _ADMIN,
    "The TLS certificate of {peer_host} is not trusted ({detail}).",
    "Usually a firewall or proxy inspects TLS and shows its own certificate. Exempt "
    "{peer_host} from TLS inspection, or put the inspecting CA's certificate (PEM) into the "
    "file named by `apps.{app}.ca_file`. If there is no such proxy, update the system CA "
    "certificates. " + _NEVER_OFF,
)
_TLS_VERSION = _Advice(
    _ADMIN,
    "TLS with {peer_host} failed on the protocol version ({detail}); Microsoft 365 needs TLS "
    "1.2 or newer.",
    "Check the system OpenSSL policy (MinProtocol in /etc/ssl/openssl.cnf or the "
    "distribution's crypto policy) and any proxy on the way; both must allow TLS 1.2 or 1.3.",
)
_TLS_WRONG_MODE = _Advice(
    _ADMIN,
    "{peer_host} did not answer with TLS where m365relay expected it ({detail}).",
    "Check {port_key}: {tls_mode_hint}. Also check that no proxy answers in its place.",
)
_TLS_FAILED = _Advice(
    _R,
    "The TLS handshake with {peer_host} failed {when} ({detail}). m365relay will retry.",
    "If it repeats, look for a firewall or proxy that interferes with TLS to {peer_host}.",
)
_AUTHORITY_UNKNOWN = _Advice(
    _ADMIN,
    "Entra ID does not know the tenant of app {app} ({detail}).",
    "Set `apps.{app}.tenant` ({tenant}) to the Directory (tenant) ID (a GUID, Entra admin "
    "center > Overview) or a verified domain such as contoso.onmicrosoft.com. If "
    "`apps.{app}.authority` is set, it must be https://login.microsoftonline.com/<tenant> or "
    "your cloud's equivalent.",
)
_CREDENTIAL_UNUSABLE = _Advice(
    _ADMIN,
    "m365relay could not use the credential configured for app {app} ({detail}).",
    "Check `apps.{app}.certificate`: `private_key` must be the PEM private key (with "
    "`passphrase` if it is encrypted) and `certificate` the matching PEM certificate, not a "
    "second copy of the key. Or use `apps.{app}.client_secret`.",
)
_DNS_FAILED = _Advice(
    _R,
    "Could not look up {peer_host} in DNS ({detail}). m365relay will retry.",
    "Check the host name in {host_key}{host_hint} and that DNS works on this host: "
    "`getent hosts {peer_host}`.",
)
_REFUSED = _Advice(
    _R,
    "{peer_host} refused the connection on {port}. m365relay will retry.",
    "{local_hint}Check {endpoint_keys}{endpoint_hint}, and that no firewall blocks outgoing "
    "connections to {peer_host} on {port}.",
)
_TIMED_OUT = _Advice(
    _R,
    "{peer_host} did not answer in time {when}. m365relay will retry.",
    "If it repeats, check that outgoing connections to {peer_host} on {port} are allowed"
    "{blocked_hint}.",
)
_UNREACHABLE = _Advice(
    _R,
    "The network path to {peer_host} is unreachable ({detail}). m365relay will retry.",
    "Check this host's network connection, routing and proxy settings.",
)
_DROPPED = _Advice(
    _R,
    "The connection to {peer_host} failed or was closed {when} ({detail}). m365relay will retry.",
    "",
)
_NETWORK_OTHER = _Advice(
    _R,
    "Could not talk to {peer_host} {when} ({detail}). m365relay will retry.",
    "If it repeats, report it with this log line.",
)


@dataclass(frozen=True)
class _ConnRule:
    """Matches the first exception in the cause chain that fits ANY of the given fields.

    types: isinstance check.
    errnos: OSError.errno values.
    text: search (case-insensitive) in the exception's message; wrappers such as
        requests' ConnectionError keep only the message of what they wrap.
    within: if given, only exceptions of these types are considered at all.
    stages: the stages the rule applies to.
    """

    advice: _Advice
    types: tuple[type[BaseException], ...] = ()
    errnos: frozenset[int] = frozenset()
    text: str | None = None
    within: tuple[type[BaseException], ...] = (BaseException,)
    stages: frozenset[str] | None = None

    def culprit(self, chain: list[BaseException], stage: str) -> BaseException | None:
        """The exception that matched (its message gets quoted), or None."""
        if self.stages is not None and stage not in self.stages:
            return None
        for exc in chain:
            if not isinstance(exc, self.within):
                continue
            if self.types and isinstance(exc, self.types):
                return exc
            if isinstance(exc, OSError) and exc.errno in self.errnos:
                return exc
            if self.text is not None and re.search(self.text, _safe_str(exc), re.IGNORECASE):
                return exc
        return None


_CERT = r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"
_TOKEN_STAGE = frozenset({"token"})

CONNECTION_RULES: tuple[_ConnRule, ...] = (
    _ConnRule(_CERT_HOSTNAME, text=rf"({_CERT}).*((hostname|IP address) mismatch|doesn't match)"),
    _ConnRule(_CERT_EXPIRED, text=rf"({_CERT}).*(expired|not yet valid)"),
    _ConnRule(_CERT_UNTRUSTED, types=(ssl.SSLCertVerificationError,), text=_CERT),
    # Protocol version refused by either side, or no TLS version left to offer.
    _ConnRule(
        _TLS_VERSION,
        text=r"UNSUPPORTED_PROTOCOL|PROTOCOL_VERSION|NO_PROTOCOLS_AVAILABLE|NO_CIPHERS_AVAILABLE",
    ),
    # Plain text where TLS was expected: wrong port or TLS mode, or a proxy.
    _ConnRule(_TLS_WRONG_MODE, text=r"WRONG_VERSION_NUMBER|HTTP_REQUEST|record layer failure"),
    _ConnRule(_TLS_FAILED, types=(ssl.SSLError,)),
    # msal raises ValueError when tenant discovery answers 4xx (unknown tenant),
    # and cryptography raises ValueError/TypeError for unusable keys.
    _ConnRule(
        _AUTHORITY_UNKNOWN,
        text=r"Unable to get authority configuration|OIDC Discovery failed",
        within=(ValueError,),
        stages=_TOKEN_STAGE,
    ),
    _ConnRule(
        _CREDENTIAL_UNUSABLE,
        text=r"key|certificate|thumbprint|PFX|password|passphrase|client_credential",
        within=(ValueError, TypeError),
        stages=_TOKEN_STAGE,
    ),
    _ConnRule(
        _DNS_FAILED,
        types=(socket.gaierror,),
        text=r"Name or service not known|Temporary failure in name resolution|"
        r"nodename nor servname|getaddrinfo failed|NameResolutionError",
    ),
    _ConnRule(_REFUSED, types=(ConnectionRefusedError,), errnos=frozenset({errno.ECONNREFUSED})),
    _ConnRule(_TIMED_OUT, types=(TimeoutError,), errnos=frozenset({errno.ETIMEDOUT})),
    _ConnRule(_UNREACHABLE, errnos=frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH})),
    _ConnRule(_DROPPED, types=(ConnectionError, EOFError)),
    _ConnRule(_NETWORK_OTHER, types=(BaseException,)),
)


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc) or type(exc).__name__
    except Exception:  # a broken __str__ must not hide the real failure
        return type(exc).__name__


def _cause_chain(exc: BaseException) -> list[BaseException]:
    """exc and everything it wraps: __cause__, __context__, .reason, args, groups."""
    chain: list[BaseException] = []
    todo = [exc]
    while todo and len(chain) < 16:
        current = todo.pop(0)
        if any(current is seen for seen in chain):
            continue
        chain.append(current)
        try:
            linked = [
                current.__cause__,
                current.__context__,
                getattr(current, "reason", None),  # urllib3 MaxRetryError
                *current.args,
                *getattr(current, "exceptions", ()),  # ExceptionGroup
            ]
        except Exception:  # odd attributes on third-party exceptions
            linked = [current.__cause__, current.__context__]
        todo.extend(e for e in linked if isinstance(e, BaseException))
    return chain


def _endpoint_fields(ctx: Context, stage: str) -> dict[str, str]:
    """Which endpoint failed, on which port, and the config keys (with Microsoft's values)
    that name it: the token endpoint, Graph (both HTTPS) or the SMTP host."""
    app = _clean(ctx.app, 200) or _PLACEHOLDERS["app"]
    if stage == "token":
        host, port = _host_port(ctx.authority_host or "login.microsoftonline.com", 443)
        key = f"`apps.{app}.authority`"
        fields = {"port": f"port {port} (HTTPS)", "host_key": key, "port_key": key,
                  "endpoint_keys": key,
                  "host_hint": " (leave it unset for Microsoft's own login.microsoftonline.com)",
                  "blocked_hint": " (HTTPS, through the proxy if this network needs one)",
                  "tls_mode_hint": "it must be an https:// URL whose port speaks TLS"}
    elif ctx.graph:
        host, port = _host_port(ctx.smtp_host or "graph.microsoft.com", 443)
        key = f"`apps.{app}.graph_endpoint`"
        fields = {"port": f"port {port} (HTTPS)", "host_key": key, "port_key": key,
                  "endpoint_keys": key,
                  "host_hint": " (leave it unset for Microsoft's own graph.microsoft.com)",
                  "blocked_hint": " (HTTPS, through the proxy if this network needs one)",
                  "tls_mode_hint": "it must be an https:// URL whose port speaks TLS"}
    else:
        host, port = _host_port(ctx.smtp_host, ctx.smtp_port)
        fields = {"port": f"port {port}" if port else "the SMTP port",
                  "host_key": f"`apps.{app}.smtp_host`", "port_key": f"`apps.{app}.smtp_port`",
                  "endpoint_keys": f"`apps.{app}.smtp_host` and `apps.{app}.smtp_port`",
                  "host_hint": " (smtp.office365.com for Exchange Online)",
                  "blocked_hint": "; many networks block outgoing SMTP ports",
                  "endpoint_hint": " (smtp.office365.com and 587 for Exchange Online)",
                  "tls_mode_hint": "smtp.office365.com uses STARTTLS on port 587, not TLS "
                                   "from the first byte"}
    fields.setdefault("endpoint_hint", fields["host_hint"])
    fields["peer_host"] = _clean(host, 200) or _PLACEHOLDERS["smtp_host"]
    fields["local_hint"] = ""
    if _is_loopback(host):
        # Nothing of Microsoft's runs on this machine: the usual cause is the sandbox (or a
        # tunnel) not started yet.
        fields["local_hint"] = (f"Nothing listens on {fields['peer_host']} {fields['port']} on "
                                "this machine. If that is the sandbox, start it first "
                                f"(`{progname.command()} sandbox`, see the README's quick "
                                "start). ")
    return fields


def _host_port(netloc: str, default: int) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` (a URL's netloc) as host and port; anything that does
    not parse is the host as given."""
    try:
        parts = urlsplit(f"//{netloc}")
        return parts.hostname or netloc, parts.port or default
    except ValueError:  # "[" or a port out of range: quote it, never fail an explanation
        return netloc, default


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
            ".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def explain_connection_error(exc: BaseException, *, stage: str, ctx: Context) -> Explanation:
    """Explain a network, TLS or client-side failure talking to Exchange Online or Entra ID.

    `stage` is an SMTP stage, or "token" for the Entra ID token endpoint.
    An exception that carries an SMTP reply (aiosmtplib's SMTPResponseException)
    is explained as that reply.
    """
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None)
    if isinstance(code, int) and 400 <= code <= 599 and isinstance(message, str):
        return explain_smtp(code, message, stage=stage, ctx=ctx)

    chain = _cause_chain(exc)
    fields = {**_fields(ctx, stage), **_endpoint_fields(ctx, stage)}
    for rule in CONNECTION_RULES:
        culprit = rule.culprit(chain, stage)
        if culprit is not None:
            fields["detail"] = _clean(_safe_str(culprit), 160)
            return _render(rule.advice, fields)
    fields["detail"] = _clean(_safe_str(exc), 160)  # unreachable: the last rule matches all
    return _render(_NETWORK_OTHER, fields)
