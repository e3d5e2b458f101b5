"""Configuration: the frozen, typed records the YAML is parsed into, one ``spec()`` line per
key (a declarative table: what can be configured, with its check and default). Their value
types are in :mod:`relay.config.values`; reading a file and collecting every problem by key
path (``accounts[2].mailbox: not an email address``) is :mod:`relay.config.loading`, so an
admin fixes a config in one pass. Only the CLI turns a :class:`ConfigError` into an exit code.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from relay.config import clouds, loading
from relay.config.check import (
    Record,
    Run,
    boolean,
    choice,
    integer,
    items,
    mapping,
    nested,
    number,
    optional,
    record,
    spec,
    text,
)
from relay.config.clouds import CloudName

# Re-exported (the alias marks it for mypy): every command catches config_mod.ConfigError.
from relay.config.loading import ConfigError as ConfigError  # noqa: PLC0414
from relay.config.pgdsn import PgDsn, parse_dsn
from relay.config.values import (  # the value types; re-exported for the stages
    _GRAPH_CLOUDS,
    CONSUMER_SMTP_HOST,
    DELEGATED_SCOPE,
    EXCHANGE_SCOPE,
    GRAPH_ENDPOINT,
    LOOPBACK,
    Duration,
    DurationOrOff,
    Email,
    FilePath,
    IPNetwork,
    Networks,
    Patterns,
    PfxFile,
    ReadableFile,
    Secret,
    SecretValue,
    Size,
    _argon2,
    _bind,
    _fernet_key,
    _graph_https,
    _guid,
    _https,
    _known_app,
    _secret,
    _split_bind,
    _tls_version,
    _web_users,
)

# Where every command looks without --config: the path of the README, the systemd unit and
# the container image (ConfigurationDirectory=m365relay).
DEFAULT_PATH = Path("/etc/m365relay/m365relay.yaml")


class _Bindable(Record):
    """A record with a ``bind: HOST:PORT`` (listeners, the HTTP endpoint)."""

    __slots__ = ()
    bind: str

    @property
    def host(self) -> str:
        return _split_bind(self.bind)[0]

    @property
    def port(self) -> int:
        return _split_bind(self.bind)[1]


# --- sections ------------------------------------------------------------------------------
# Each field: its type, then spec(check, default=...). No default: the key is required.


@record
class Listener(_Bindable):
    bind: str = spec(_bind, default="127.0.0.1:2525")
    name: str = spec(text)
    tls: Literal["none", "starttls", "implicit"] = spec(
        choice("none", "starttls", "implicit"), default="none")
    certificate: Path | None = spec(optional(ReadableFile), default=None)
    private_key: Path | None = spec(optional(ReadableFile), default=None)
    networks: tuple[IPNetwork, ...] = spec(Networks, default=LOOPBACK)
    cleartext_auth_networks: tuple[IPNetwork, ...] = spec(Networks, default=())
    require_tls: bool = spec(boolean, default=False)
    # Old printers speak only TLS 1.0/1.1 (relay/servertls.py); "1.0" or "1.1" lets them in.
    min_tls_version: Literal["1.0", "1.1", "1.2", "1.3"] = spec(_tls_version, default="1.2")
    # The name devices connect to, for the self-signed certificate; None: the machine's FQDN.
    hostname: str | None = spec(optional(text), default=None)
    max_message_size: int = spec(Size(), default=35 * 1024 * 1024)
    max_recipients: int = spec(integer(ge=1, le=10000), default=500)
    # Legacy senders emit long lines; RFC 5321 allows 1000 but Postfix accepts far more.
    max_line_length: int = spec(Size(ge=1000), default=64 * 1024)
    idle_timeout: float = spec(Duration, default=300.0)
    # Bare CR/LF are how SMTP smuggling splits messages; normalize is Postfix 3.9's default.
    bare_line_endings: Literal["normalize", "reject"] = spec(
        choice("normalize", "reject"), default="normalize")
    # Postfix: default_process_limit 100, smtpd_client_connection_count_limit 50. A LAN relay
    # sees one or two connections per device.
    max_connections: int = spec(integer(ge=1, le=100_000), default=100)
    max_connections_per_ip: int = spec(integer(ge=1, le=100_000), default=20)
    # What Postfix's smtpd_timeout drops to under stress: at a connection limit, sessions idle
    # this long (outside a mail transaction) give their slot to the newcomer.
    stress_idle_timeout: float = spec(Duration, default=10.0)
    session_timeout: float = spec(Duration, default=3600.0)
    # A slow scan over weak Wi-Fi needs minutes; a slowloris is cut by the total.
    data_idle_timeout: float = spec(Duration, default=300.0)
    data_timeout: float = spec(Duration, default=1800.0)
    # Postfix smtpd_junk_command_limit and smtpd_hard_error_limit; both reset after a message.
    max_junk_commands: int = spec(integer(ge=1), default=100)
    max_errors: int = spec(integer(ge=1), default=20)
    # Per account `delivery` wins; see README "Delivery modes".
    delivery: Literal["spool", "passthrough"] = spec(choice("spool", "passthrough"),
                                                     default="spool")

    def _check(self) -> None:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("`certificate` and `private_key` go together (PEM files, e.g. "
                             "from your CA or Let's Encrypt); set neither and the relay makes "
                             "a self-signed certificate for this listener")
        if self.tls != "none" and self.certificate is not None and self.private_key is not None:
            from relay.config.certfiles import check_pair

            check_pair(self.certificate, self.private_key)
        if self.tls == "none" and self.min_tls_version != "1.2":
            raise ValueError("`min_tls_version` only applies with tls: starttls or implicit")
        if self.require_tls and self.tls != "starttls":
            raise ValueError("require_tls only makes sense with tls: starttls")


@record
class CertificateCredential(Record):
    private_key: Secret | None = spec(optional(SecretValue), default=None)
    certificate: Secret | None = spec(optional(SecretValue), default=None)
    # PKCS#12 holding both key and certificate, as Windows and Key Vault export them.
    pfx: Path | None = spec(optional(PfxFile), default=None)
    passphrase: Secret | None = spec(optional(SecretValue), default=None)

    def _check(self) -> None:
        pem = self.private_key is not None or self.certificate is not None
        if pem == (self.pfx is not None):
            raise ValueError("set either `pfx` (a .pfx/.p12 file) or both `private_key` and "
                             "`certificate` (PEM)")
        if pem and (self.private_key is None or self.certificate is None):
            raise ValueError("`private_key` and `certificate` go together")


@record
class ClientAssertion(Record):
    # Not checked at load: the issuer (kubelet, CI runner) may write it after the relay starts.
    file: Path = spec(FilePath)

    @staticmethod
    def _prepare(data: Any) -> Any:
        # {env: AZURE_FEDERATED_TOKEN_FILE}: the path Azure Workload Identity's webhook injects.
        if isinstance(data, Mapping) and set(data) == {"env"} and isinstance(data["env"], str):
            path = os.environ.get(data["env"])
            if not path:
                raise ValueError(f"environment variable {data['env']} is not set or empty; with "
                                 "Azure Workload Identity, label the pod "
                                 "azure.workload.identity/use: \"true\"")
            return {"file": path}
        return data


@record
class App(Record):
    tenant: str = spec(text)
    client_id: str = spec(_guid)
    client_secret: Secret | None = spec(optional(SecretValue), default=None)
    certificate: CertificateCredential | None = spec(optional(nested(CertificateCredential)),
                                                     default=None)
    client_assertion: ClientAssertion | None = spec(optional(nested(ClientAssertion)), default=None)
    cloud: CloudName = spec(choice("global", "usgov", "usgov-dod", "china"), default="global")
    hve: bool = spec(boolean, default=False)
    authority: str | None = spec(optional(_https), default=None)
    # Defaults for these three come from `cloud` and `hve` (relay/config/clouds.py), see _prepare.
    smtp_host: str = spec(text, default="smtp.office365.com")
    smtp_port: int = spec(integer(ge=1, le=65535), default=587)
    ca_file: Path | None = spec(optional(ReadableFile), default=None)
    scope: str = spec(text, default=EXCHANGE_SCOPE)
    # Graph sendMail instead of SMTP AUTH (relay/upstream/graph.py), for tenants with SMTP AUTH off.
    transport: Literal["smtp", "graph"] = spec(choice("smtp", "graph"), default="smtp")
    graph_endpoint: str = spec(_graph_https, default=GRAPH_ENDPOINT)
    # Graph refuses requests over about 4 MB (413); larger mail goes draft + upload session.
    graph_request_limit: int = spec(Size(ge=64 * 1024), default=4 * 1024 * 1024)
    # "delegated": a person signs in once (`m365relay login`), relay/tokens/delegated.py.
    flow: Literal["client_credentials", "delegated"] = spec(
        choice("client_credentials", "delegated"), default="client_credentials")

    @staticmethod
    def _prepare(data: Any) -> Any:
        """Defaults that depend on other keys; a key the config sets always wins."""
        if not isinstance(data, Mapping):
            return data
        if data.get("flow") == "delegated":
            # First, so that these win over the cloud's defaults below.
            personal = str(data.get("tenant", "")).casefold() == "consumers"
            data = {"scope": DELEGATED_SCOPE,
                    "smtp_host": CONSUMER_SMTP_HOST if personal else "smtp.office365.com",
                    **data}
        if data.get("transport") == "graph":
            # The token's audience must match the transport; an explicit `scope` still wins.
            data = dict(data)
            cloud = _GRAPH_CLOUDS.get(str(data.get("cloud", "global")), GRAPH_ENDPOINT)
            data.setdefault("graph_endpoint", cloud)
            endpoint = str(data["graph_endpoint"]).rstrip("/")
            # A national cloud's Graph is its own audience; anything else (a proxy, the
            # sandbox) stands in for the cloud's.
            known = endpoint if endpoint in _GRAPH_CLOUDS.values() else cloud
            data.setdefault("scope", f"{known}/.default")
        return clouds.fill_defaults(data)

    def _check(self) -> None:
        given = (self.client_secret, self.certificate, self.client_assertion)
        if self.flow == "delegated":
            if self.certificate is not None or self.client_assertion is not None:
                raise ValueError("`flow: delegated` takes no credential (a public client) or "
                                 "`client_secret` (a confidential one)")
            if self.transport != "smtp":
                raise ValueError("`flow: delegated` sends over SMTP only; remove `transport`")
            return
        if sum(c is not None for c in given) != 1:
            raise ValueError("set exactly one of `client_secret`, `certificate` or "
                             "`client_assertion` (a certificate is what Microsoft recommends; "
                             "`client_assertion` is federated, with no secret)")

    @property
    def authority_url(self) -> str:
        host = clouds.CLOUDS[self.cloud].authority_host
        return self.authority or f"https://{host}/{self.tenant}"


@record
class Account(Record):
    name: str = spec(text)
    app: str = spec(_known_app)
    mailbox: str = spec(Email)
    username: str | None = spec(optional(text), default=None)
    password_hash: str | None = spec(optional(_argon2), default=None)
    networks: tuple[IPNetwork, ...] = spec(Networks, default=())
    from_: Literal["rewrite", "enforce", "allow"] = spec(
        choice("rewrite", "enforce", "allow"), default="rewrite", key="from")
    # Sending identity and recipient policy: relay/policy/identity.py.
    allowed_from: tuple[str, ...] = spec(Patterns, default=())
    send_as: Literal["authenticate", "sendas"] = spec(choice("authenticate", "sendas"),
                                                      default="authenticate")
    allowed_recipients: tuple[str, ...] = spec(Patterns, default=())  # empty: any recipient
    # None: the listener's.
    delivery: Literal["spool", "passthrough"] | None = spec(
        optional(choice("spool", "passthrough")), default=None)

    def _check(self) -> None:
        if (self.username is None) != (self.password_hash is None):
            raise ValueError("`username` and `password_hash` go together")
        if self.username is None and not self.networks:
            raise ValueError("an account needs `username` + `password_hash`, or `networks` "
                             "(clients matched by address, no AUTH), or both")
        if self.from_ == "allow" and not self.allowed_from:
            raise ValueError("`from: allow` needs `allowed_from` (addresses or `*@domain`)")


def _node(raw: Any, run: Run) -> str:
    if isinstance(raw, Mapping):
        raw = _secret(raw, run).value  # {env: POD_NAME}, as a Kubernetes Deployment gives it
    if not isinstance(raw, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", raw):
        raise ValueError("a node name is 1-63 letters, digits, '.', '_' or '-' (a host or pod "
                         "name), unique among the relays that share the database")
    return raw


def _dsn(raw: Any, run: Run) -> PgDsn:
    secret = _secret(raw, run)  # a string, {env: NAME} or {file: PATH}: it may hold a password
    return parse_dsn(secret.value)


@record
class SpoolSettings(Record):
    """Where accepted mail waits: a directory on this machine (the default), or a PostgreSQL
    database that several relays share (cluster mode). Exactly one of the two."""

    directory: Path | None = spec(optional(FilePath), default=None)
    min_free_space: int = spec(Size(), default=100 * 1024 * 1024)
    postgres: PgDsn | None = spec(optional(_dsn), default=None)
    # This relay's name in leases, logs and the queue view (default: the host name; in
    # Kubernetes, the pod's name through {env: POD_NAME} or M365RELAY_NODE).
    node: str = spec(_node, default="")
    # How long a node's claim on a message outlives its last sign of life: after a crash,
    # another node delivers the message that long after.
    lease: float = spec(Duration, default=30.0)
    # Create or migrate the database schema at start (off: `m365relay db upgrade` does it,
    # e.g. from a Kubernetes init container, and the relay only checks the version).
    upgrade_schema: bool = spec(boolean, default=True)

    @staticmethod
    def _prepare(data: Any) -> Any:
        if isinstance(data, Mapping) and "node" not in data:
            data = {**data, "node": socket.gethostname().split(".")[0] or "relay"}
        return data

    def _check(self) -> None:
        if (self.directory is None) == (self.postgres is None):
            raise ValueError("set exactly one of `directory` (the file spool on this machine) "
                             "and `postgres` (a database shared by several relays)")
        if not 5 <= self.lease <= 600:
            raise ValueError("`lease` must be between 5s and 10m: shorter expires while a "
                             "node is busy, longer delays takeover after a crash")

    @property
    def clustered(self) -> bool:
        return self.postgres is not None


@record
class PacingSettings(Record):
    # Exchange Online: 30 messages a minute and 10,000 recipients a rolling day per mailbox.
    # 0 switches pacing (or the warning) off, e.g. for benchmarks against a fake upstream.
    messages_per_minute: float = spec(number(ge=0), default=30.0)
    recipients_per_day_warning: int = spec(integer(ge=0), default=9000)


@record
class DeliverySettings(Record):
    # Postfix defaults: minimal_backoff_time 300s, maximal_backoff_time 4000s,
    # maximal_queue_lifetime 5d.
    min_backoff: float = spec(Duration, default=300.0)
    max_backoff: float = spec(Duration, default=4000.0)
    max_age: float = spec(Duration, default=5 * 86400.0)
    # Exchange Online allows 3 concurrent connections per mailbox, then 432 4.3.2.
    connections_per_mailbox: int = spec(integer(ge=1, le=3), default=3)
    idle_timeout: float = spec(Duration, default=30.0)
    # Exchange rejects tokens close to expiry; refresh well before.
    token_refresh_margin: float = spec(Duration, default=600.0)
    timeout: float = spec(Duration, default=60.0)
    pacing: PacingSettings = spec(nested(PacingSettings), default=PacingSettings())


@record
class HttpTls(Record):
    """TLS for the HTTP endpoint, as an exporter's ``tls_server_config``. The files are read
    again when they change (renewals need no restart)."""

    certificate: Path = spec(ReadableFile)
    private_key: Path = spec(ReadableFile)

    def _check(self) -> None:
        import ssl

        from relay.config.certfiles import no_passphrase

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                self.certificate, self.private_key, password=no_passphrase)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"cannot use certificate {self.certificate} with private_key "
                             f"{self.private_key}: {exc}; both must be PEM and belong "
                             "together (the certificate file may hold the chain)") from None


@record
class HttpSettings(_Bindable):
    # Off unless the section is present; loopback by default because the status page lists
    # recipients and errors (never secrets).
    bind: str = spec(_bind, default="127.0.0.1:9925")
    # Who may open the status page and its JSON API (and, by default, /metrics).
    networks: tuple[IPNetwork, ...] = spec(Networks, default=LOOPBACK)
    # Who may scrape /metrics; None: `networks`. /healthz and /readyz answer both lists.
    metrics_networks: tuple[IPNetwork, ...] | None = spec(optional(Networks), default=None)
    tls: HttpTls | None = spec(optional(nested(HttpTls)), default=None)
    # user -> argon2 hash: HTTP Basic for everything but /healthz and /readyz (probes).
    basic_auth_users: dict[str, str] | None = spec(optional(_web_users), default=None)

    @property
    def scrape_networks(self) -> tuple[IPNetwork, ...]:
        return self.networks if self.metrics_networks is None else self.metrics_networks


@record
class AuthLimits(Record):
    """Password guessing: shared by all listeners, so more listeners give no more guesses."""

    failures_per_session: int = spec(integer(ge=1, le=100), default=3)
    # 0 turns the per-address or per-user lockout off.
    failures_per_ip: int = spec(integer(ge=0), default=5)
    failures_per_user: int = spec(integer(ge=0), default=10)
    window: float = spec(Duration, default=600.0)
    block: float = spec(Duration, default=600.0)
    # How long a password that passed its argon2 check is recognised without another (Dovecot's
    # auth_cache_ttl); 0 checks every login.
    cache_ttl: float = spec(DurationOrOff, default=3600.0)


@record
class TokenStoreSettings(Record):
    """Where `m365relay login` keeps delegated sign-ins: one encrypted file per account, or in
    cluster mode (spool.postgres) rows of the queue's database, encrypted with the same key."""

    directory: Path | None = spec(optional(FilePath), default=None)
    # A Fernet key (`m365relay login --new-key`), from {env: VAR} or {file: PATH} only.
    key: Secret = spec(_fernet_key)


@record
class Config(Record):
    listeners: tuple[Listener, ...] = spec(items(nested(Listener), min_length=1))
    apps: dict[str, App] = spec(mapping(nested(App), min_length=1))
    accounts: tuple[Account, ...] = spec(items(nested(Account), min_length=1))
    spool: SpoolSettings = spec(nested(SpoolSettings))
    delivery: DeliverySettings = spec(nested(DeliverySettings), default=DeliverySettings())
    http: HttpSettings | None = spec(optional(nested(HttpSettings)), default=None)
    auth_limits: AuthLimits = spec(nested(AuthLimits), default=AuthLimits())
    hostname: str | None = spec(optional(text), default=None)
    token_store: TokenStoreSettings | None = spec(optional(nested(TokenStoreSettings)),
                                                  default=None)

    def _check(self) -> None:
        if self.spool.clustered:
            bare = [f"listeners[{i}]" for i, li in enumerate(self.listeners)
                    if li.tls != "none" and li.certificate is None]
            if bare:
                raise ValueError(f"{', '.join(bare)}: cluster mode (spool.postgres) needs "
                                 "`certificate` and `private_key` on TLS listeners: every node "
                                 "behind the load balancer presents the same certificate, and "
                                 "there is no local spool directory to keep a self-signed one")
        delegated = sorted(name for name, app in self.apps.items() if app.flow == "delegated")
        if delegated and self.token_store is None:
            raise ValueError(f"apps {', '.join(delegated)} use `flow: delegated`; set "
                             "`token_store` (directory + key) to keep their sign-ins")
        store = self.token_store
        if store is not None and store.directory is None and not self.spool.clustered:
            raise ValueError("token_store.directory: required with spool.directory (each "
                             "sign-in is a file there); in cluster mode (spool.postgres) the "
                             "sign-ins live in the database and only `key` is needed")

    def account_for_user(self, username: str) -> Account | None:
        return next((a for a in self.accounts if a.username == username), None)


# --- loading (relay/config/loading.py reads and checks; these name the Config it builds) -------


def parse(data: Any, *, source: str = "config", base_dir: Path | None = None) -> Config:
    """Validate already-parsed YAML data; raises ConfigError listing every problem."""
    return loading.parse_as(Config, data, source=source, base_dir=base_dir)


def load(path: Path) -> Config:
    """Read and validate a config file."""
    return loading.load_as(Config, path)
