"""A PostgreSQL connection string, as libpq users write it: a URI
(``postgresql://user@db.example.com/m365relay?sslmode=verify-full&sslrootcert=/etc/ca.pem``) or
keyword/value pairs (``host=db.example.com dbname=m365relay sslmode=require``). Checked at load,
so a typo fails at startup by key path; turned into the URI form the driver takes; shown only
with its password removed.

What libpq leaves unset (host, user, password, sslmode) the driver takes from the ``PG*``
environment variables and ``~/.pgpass``, as psql would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

__all__ = ["SSLMODES", "PgDsn", "parse_dsn"]

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

# Keywords that mean something to libpq and to the driver; anything else is most likely a typo
# (``sslmod=``) that libpq itself would refuse too.
_KEYWORDS = {
    "host", "hostaddr", "port", "dbname", "user", "password", "passfile", "sslmode",
    "sslrootcert", "sslcert", "sslkey", "sslpassword", "sslcrl", "connect_timeout",
    "application_name", "target_session_attrs", "options", "ssl_min_protocol_version",
    "ssl_max_protocol_version", "krbsrvname", "gsslib", "service",
}
_PAIR = re.compile(r"\s*([A-Za-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'|\S*)")


@dataclass(frozen=True)
class PgDsn:
    # What the driver connects with: the password is in it, so the repr (a Config's, in a
    # traceback or a debug log) leaves it out.
    uri: str = field(repr=False)
    params: dict[str, str]  # every keyword, the URI's parts included (password removed)

    @property
    def shown(self) -> str:
        """Where the queue lives, for logs and the status page: never the password."""
        host = self.params.get("host", "localhost (PGHOST, or the Unix socket)")
        port = self.params.get("port", "5432")
        db = self.params.get("dbname", "(the user's name)")
        where = f"{host}:{port}" if not host.startswith("/") else f"{host} (socket)"
        return f"postgresql {where}/{db}"

    @property
    def sslmode(self) -> str:
        return self.params.get("sslmode", "prefer")


def parse_dsn(text: str) -> PgDsn:
    """Raises ValueError saying what is wrong and how libpq spells it."""
    text = text.strip()
    if not text:
        raise ValueError("is empty; give a URI such as postgresql://m365relay@db/m365relay")
    params = _from_uri(text) if "://" in text else _from_keywords(text)
    unknown = sorted(set(params) - _KEYWORDS)
    if unknown:
        raise ValueError(f"unknown connection keyword(s) {', '.join(unknown)}; libpq knows "
                         "host, port, dbname, user, password, sslmode, sslrootcert, sslcert, "
                         "sslkey, connect_timeout, application_name, target_session_attrs")
    mode = params.get("sslmode")
    if mode is not None and mode not in SSLMODES:
        raise ValueError(f"sslmode={mode} is not one of {', '.join(SSLMODES)}; use verify-full "
                         "with sslrootcert= for a database across a network")
    if "port" in params and not params["port"].isdigit():
        raise ValueError(f"port={params['port']} is not a number")
    shown = {k: v for k, v in params.items() if k != "password"}
    return PgDsn(_to_uri(params), shown)


def _from_uri(text: str) -> dict[str, str]:
    parts = urlsplit(text)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if "@" not in parts.netloc and ("@" in parts.path + parts.fragment
                                    or any("@" in key for key, _ in query)):
        # A '/', '?' or '#' in the password ended the user info early: what urlsplit calls
        # the port, path or query is a piece of the password, which no message may quote.
        raise ValueError("the user or password holds '/', '?' or '#': percent-encode them in a "
                         "URI (%2F, %3F, %23; '@' is %40), or use keyword=value pairs")
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"scheme {parts.scheme}:// is not postgresql://")
    params: dict[str, str] = {}
    if parts.hostname:
        params["host"] = parts.hostname
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in the URI: {exc}") from None
    if port is not None:
        params["port"] = str(port)
    if parts.username:
        params["user"] = unquote(parts.username)
    if parts.password:
        params["password"] = unquote(parts.password)
    if parts.path.strip("/"):
        params["dbname"] = unquote(parts.path.lstrip("/"))
    for key, value in query:
        params[key] = value
    return params


def _from_keywords(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    pos = 0
    last = ""
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _PAIR.match(text, pos)
        if match is None:
            if last == "password":  # what cannot be read is most likely the rest of it
                raise ValueError("cannot read what follows password=: quote a value with "
                                 "spaces or quotes in it (password='...', \\' for a quote)")
            word = text[pos:].split(maxsplit=1)[0]
            raise ValueError(f"cannot read {word!r}: write keyword=value pairs "
                             "(host=db dbname=m365relay) or a postgresql:// URI")
        value = match.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[match.group(1)] = value
        last = match.group(1)
        pos = match.end()
    return params


def _to_uri(params: dict[str, str]) -> str:
    rest = dict(params)
    host = rest.pop("host", "")
    netloc = ""
    if "user" in rest:
        netloc = quote(rest.pop("user"), safe="")
        if "password" in rest:
            netloc += ":" + quote(rest.pop("password"), safe="")
        netloc += "@"
    if host and not host.startswith("/"):
        netloc += f"[{host}]" if ":" in host else host
        if "port" in rest:
            netloc += ":" + rest.pop("port")
    elif host:
        rest["host"] = host  # a socket directory travels as a query parameter, as in libpq
    path = "/" + quote(rest.pop("dbname"), safe="") if "dbname" in rest else ""
    query = urlencode(rest)
    return f"postgresql://{netloc}{path}" + (f"?{query}" if query else "")
