"""Configuration: YAML parsed once into frozen, typed records.

Every problem is reported together, each with its key path
(``accounts[2].mailbox: not an email address``), so an admin fixes a config in one pass.
Only the CLI turns a :class:`ConfigError` into an exit code.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from relay import clouds, identity
from relay.clouds import CloudName

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
EXCHANGE_SCOPE = "https://outlook.office365.com/.default"
# Delegated (user) sign-in: msal adds offline_access itself and refuses it in scope lists.
DELEGATED_SCOPE = "https://outlook.office.com/SMTP.Send"
# Personal Outlook.com/Hotmail SMTP (MICROSOFT365.md §10, [P]: configurable via smtp_host).
CONSUMER_SMTP_HOST = "smtp-mail.outlook.com"
GRAPH_ENDPOINT = "https://graph.microsoft.com"
# Microsoft Graph per `cloud` (MICROSOFT365.md §6 names graph.microsoft.us for GCC High; DoD
# and 21Vianet hosts are UNVERIFIED, from Microsoft's national cloud deployment list).
_GRAPH_CLOUDS = {"global": GRAPH_ENDPOINT, "usgov": "https://graph.microsoft.us",
                 "usgov-dod": "https://dod-graph.microsoft.us",
                 "china": "https://microsoftgraph.chinacloudapi.cn"}
_EMAIL = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+\.[^@\s<>\"]+$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?i?b?)\s*$", re.IGNORECASE)


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists every one by key path."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(f"{source}: {count} problem(s) in the configuration:\n{lines}")


# --- value types ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Secret:
    """A secret value resolved at load time; repr and str never show it."""

    value: str
    source: str  # "inline", "env:NAME" or "file:PATH": safe to show in messages

    def __repr__(self) -> str:
        return f"Secret({self.source})"

    __str__ = __repr__


def _base_dir(info: ValidationInfo) -> Path:
    ctx = info.context or {}
    return Path(ctx.get("base_dir", "."))


def _resolve_path(value: Any, info: ValidationInfo) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise ValueError("expected a file path")
    path = Path(str(value)).expanduser()
    # Relative paths are relative to the config file, so a config works from any cwd.
    return path if path.is_absolute() else _base_dir(info) / path


def _secret(value: Any, info: ValidationInfo) -> Secret:
    if isinstance(value, Secret):
        return value
    if isinstance(value, str):
        if not value:
            raise ValueError("is empty")
        return Secret(value, "inline")
    if isinstance(value, Mapping) and len(value) == 1:
        (kind, ref), = value.items()
        if kind == "env" and isinstance(ref, str):
            found = os.environ.get(ref)
            if not found:
                raise ValueError(f"environment variable {ref} is not set or empty; export it "
                                 "in the service's environment (e.g. systemd EnvironmentFile=)")
            return Secret(found, f"env:{ref}")
        if kind == "file" and isinstance(ref, str):
            path = _resolve_path(ref, info)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read secret file {path}: {exc.strerror}; check the path "
                                 "and that the relay's user may read it") from None
            # Files written by editors and `echo` end with a newline that is not part of a secret.
            text = text.strip() if "BEGIN" not in text else text
            if not text.strip():
                raise ValueError(f"secret file {path} is empty")
            return Secret(text, f"file:{path}")
    raise ValueError("expected a string, {env: VARIABLE} or {file: PATH}")


def _readable(path: Path) -> Path:
    if not os.access(path, os.R_OK):
        raise ValueError(f"cannot read {path}; check the path and its permissions")
    return path


def _duration(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration: seconds, or a number with s, m, h or d (e.g. 5m)")
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def _size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        unit = m.group(2).lower()[:1]
        size = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]
    else:
        raise ValueError("expected a size in bytes, or a number with KB, MB or GB (e.g. 35MB)")
    if size < 0:
        raise ValueError("must not be negative")
    return size


def _networks(value: Any) -> tuple[IPNetwork, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        # pydantic reports ValueError (not TypeError) with the key path.
        raise ValueError("expected a list of networks such as [192.168.1.0/24, 10.0.0.5]")  # noqa: TRY004
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network (CIDR)") from None
    return tuple(out)


def _email(value: Any) -> str:
    if not isinstance(value, str) or not _EMAIL.match(value):
        raise ValueError(f"{value!r} is not an email address")
    return value


SecretValue = Annotated[Secret, BeforeValidator(_secret)]
FilePath = Annotated[Path, BeforeValidator(_resolve_path)]
ReadableFile = Annotated[Path, BeforeValidator(_resolve_path), AfterValidator(_readable)]
Duration = Annotated[float, BeforeValidator(_duration)]
Size = Annotated[int, BeforeValidator(_size)]
Networks = Annotated[tuple[IPNetwork, ...], BeforeValidator(_networks)]
Email = Annotated[str, BeforeValidator(_email)]
Patterns = Annotated[tuple[str, ...], BeforeValidator(identity.check_patterns)]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True,
                              populate_by_name=True)


class _Bindable(_Record):
    """A record with a ``bind: HOST:PORT`` (listeners, the HTTP endpoint)."""

    bind: str

    @property
    def host(self) -> str:
        return _split_bind(self.bind)[0]

    @property
    def port(self) -> int:
        return _split_bind(self.bind)[1]

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, value: str) -> str:
        _split_bind(value)
        return value


# --- sections ------------------------------------------------------------------------------


class Listener(_Bindable):
    name: str
    bind: str = "127.0.0.1:2525"
    tls: Literal["none", "starttls", "implicit"] = "none"
    certificate: ReadableFile | None = None
    private_key: ReadableFile | None = None
    networks: Networks = LOOPBACK
    cleartext_auth_networks: Networks = ()
    require_tls: bool = False
    hostname: str | None = None
    max_message_size: Size = 35 * 1024 * 1024
    max_recipients: int = Field(500, ge=1, le=10000)
    # Legacy senders emit long lines; RFC 5321 allows 1000 but Postfix accepts far more.
    max_line_length: Size = Field(64 * 1024, ge=1000)
    idle_timeout: Duration = 300.0
    # Bare CR/LF are how SMTP smuggling splits messages; normalize is Postfix 3.9's default.
    bare_line_endings: Literal["normalize", "reject"] = "normalize"
    # Postfix: default_process_limit 100, smtpd_client_connection_count_limit 50. A LAN relay
    # sees one or two connections per device.
    max_connections: int = Field(100, ge=1, le=100_000)
    max_connections_per_ip: int = Field(20, ge=1, le=100_000)
    # What Postfix's smtpd_timeout drops to under stress: at a connection limit, sessions idle
    # this long (outside a mail transaction) give their slot to the newcomer.
    stress_idle_timeout: Duration = 10.0
    session_timeout: Duration = 3600.0
    # A slow scan over weak Wi-Fi needs minutes; a slowloris is cut by the total.
    data_idle_timeout: Duration = 300.0
    data_timeout: Duration = 1800.0
    # Postfix smtpd_junk_command_limit and smtpd_hard_error_limit; both reset after a message.
    max_junk_commands: int = Field(100, ge=1)
    max_errors: int = Field(20, ge=1)
    # Per account `delivery` wins; see README "Delivery modes".
    delivery: Literal["spool", "passthrough"] = "spool"

    @model_validator(mode="after")
    def _tls_needs_files(self) -> Listener:
        if self.tls != "none" and (self.certificate is None or self.private_key is None):
            raise ValueError(f"tls: {self.tls} needs both `certificate` and `private_key` "
                             "(PEM files, e.g. from your CA or Let's Encrypt)")
        if self.require_tls and self.tls != "starttls":
            raise ValueError("require_tls only makes sense with tls: starttls")
        return self


def _split_bind(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 0.0.0.0:587 or [::]:25)")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - ":587" means all interfaces, as in Postfix
    return host, int(port)


def _pfx_path(value: Any, info: ValidationInfo) -> Path:
    if isinstance(value, Mapping) and set(value) == {"file"}:
        value = value["file"]
    return _resolve_path(value, info)


PfxFile = Annotated[Path, BeforeValidator(_pfx_path), AfterValidator(_readable)]


class CertificateCredential(_Record):
    private_key: SecretValue | None = None
    certificate: SecretValue | None = None
    # PKCS#12 holding both key and certificate, as Windows and Key Vault export them.
    pfx: PfxFile | None = None
    passphrase: SecretValue | None = None

    @model_validator(mode="after")
    def _one_form(self) -> CertificateCredential:
        pem = self.private_key is not None or self.certificate is not None
        if pem == (self.pfx is not None):
            raise ValueError("set either `pfx` (a .pfx/.p12 file) or both `private_key` and "
                             "`certificate` (PEM)")
        if pem and (self.private_key is None or self.certificate is None):
            raise ValueError("`private_key` and `certificate` go together")
        return self


class ClientAssertion(_Record):
    # Not checked at load: the issuer (kubelet, CI runner) may write it after the relay starts.
    file: FilePath

    @model_validator(mode="before")
    @classmethod
    def _path_from_env(cls, data: Any) -> Any:
        # {env: AZURE_FEDERATED_TOKEN_FILE}: the path Azure Workload Identity's webhook injects.
        if isinstance(data, Mapping) and set(data) == {"env"} and isinstance(data["env"], str):
            path = os.environ.get(data["env"])
            if not path:
                raise ValueError(f"environment variable {data['env']} is not set or empty; with "
                                 "Azure Workload Identity, label the pod "
                                 "azure.workload.identity/use: \"true\"")
            return {"file": path}
        return data


class App(_Record):
    tenant: str
    client_id: str
    client_secret: SecretValue | None = None
    certificate: CertificateCredential | None = None
    client_assertion: ClientAssertion | None = None
    cloud: CloudName = "global"
    hve: bool = False
    authority: str | None = None
    # Defaults for these three come from `cloud` and `hve` (relay/clouds.py).
    smtp_host: str = "smtp.office365.com"
    smtp_port: int = Field(587, ge=1, le=65535)
    ca_file: ReadableFile | None = None
    scope: str = EXCHANGE_SCOPE

    @model_validator(mode="before")
    @classmethod
    def _cloud_defaults(cls, data: Any) -> Any:
        return clouds.fill_defaults(data)
    # Graph sendMail instead of SMTP AUTH (relay/graph.py), for tenants with SMTP AUTH off.
    transport: Literal["smtp", "graph"] = "smtp"
    graph_endpoint: str = GRAPH_ENDPOINT
    # Graph refuses requests over about 4 MB (413); larger mail goes draft + upload session.
    graph_request_limit: Size = Field(4 * 1024 * 1024, ge=64 * 1024)
    # "delegated": a person signs in once (`m365relay login`), relay/delegated.py.
    flow: Literal["client_credentials", "delegated"] = "client_credentials"

    @field_validator("client_id")
    @classmethod
    def _guid(cls, value: str) -> str:
        try:
            uuid.UUID(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a GUID; copy the Application (client) ID from the "
                             "app registration's Overview page in the Entra admin center") from None
        return value

    @field_validator("authority")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("https://"):
            raise ValueError("must be an https:// URL; token requests are never sent in clear")
        return value.rstrip("/") if value else value

    @model_validator(mode="before")
    @classmethod
    def _graph_scope(cls, data: Any) -> Any:
        # The token's audience must match the transport; an explicit `scope` still wins.
        if not isinstance(data, Mapping) or data.get("transport") != "graph":
            return data
        out = dict(data)
        cloud = _GRAPH_CLOUDS.get(str(data.get("cloud", "global")), GRAPH_ENDPOINT)
        out.setdefault("graph_endpoint", cloud)
        endpoint = str(out["graph_endpoint"]).rstrip("/")
        # A national cloud's Graph is its own audience; anything else (a proxy, the sandbox)
        # stands in for the cloud's.
        known = endpoint if endpoint in _GRAPH_CLOUDS.values() else cloud
        out.setdefault("scope", f"{known}/.default")
        return out

    @model_validator(mode="before")
    @classmethod
    def _delegated_defaults(cls, data: Any) -> Any:
        # Defined after the other "before" validators so it runs first and its defaults win.
        if isinstance(data, Mapping) and data.get("flow") == "delegated":
            personal = str(data.get("tenant", "")).casefold() == "consumers"
            return {"scope": DELEGATED_SCOPE,
                    "smtp_host": CONSUMER_SMTP_HOST if personal else "smtp.office365.com",
                    **data}
        return data

    @field_validator("graph_endpoint")
    @classmethod
    def _graph_https(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError("must be an https:// URL such as https://graph.microsoft.com "
                             "(GCC High: https://graph.microsoft.us)")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_credential(self) -> App:
        given = (self.client_secret, self.certificate, self.client_assertion)
        if self.flow == "delegated":
            if self.certificate is not None or self.client_assertion is not None:
                raise ValueError("`flow: delegated` takes no credential (a public client) or "
                                 "`client_secret` (a confidential one)")
            if self.transport != "smtp":
                raise ValueError("`flow: delegated` sends over SMTP only; remove `transport`")
            return self
        if sum(c is not None for c in given) != 1:
            raise ValueError("set exactly one of `client_secret`, `certificate` or "
                             "`client_assertion` (a certificate is what Microsoft recommends; "
                             "`client_assertion` is federated, with no secret)")
        return self

    @property
    def authority_url(self) -> str:
        host = clouds.CLOUDS[self.cloud].authority_host
        return self.authority or f"https://{host}/{self.tenant}"


class Account(_Record):
    name: str
    app: str
    mailbox: Email
    username: str | None = None
    password_hash: str | None = None
    networks: Networks = ()
    from_: Literal["rewrite", "enforce", "allow"] = Field("rewrite", alias="from")
    # Sending identity and recipient policy: relay/identity.py.
    allowed_from: Patterns = ()
    send_as: Literal["authenticate", "sendas"] = "authenticate"
    allowed_recipients: Patterns = ()  # empty: any recipient
    delivery: Literal["spool", "passthrough"] | None = None  # None: the listener's

    @field_validator("app")
    @classmethod
    def _known_app(cls, value: str, info: ValidationInfo) -> str:
        apps = (info.context or {}).get("apps")
        if apps is not None and value not in apps:
            known = ", ".join(sorted(apps)) or "none defined"
            raise ValueError(f"no app named {value!r} under `apps` (known: {known})")
        return value

    @field_validator("password_hash")
    @classmethod
    def _argon2(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("$argon2"):
            raise ValueError("not an argon2 hash; create one with `m365relay hash-password`")
        return value

    @model_validator(mode="after")
    def _identity(self) -> Account:
        if (self.username is None) != (self.password_hash is None):
            raise ValueError("`username` and `password_hash` go together")
        if self.username is None and not self.networks:
            raise ValueError("an account needs `username` + `password_hash`, or `networks` "
                             "(clients matched by address, no AUTH), or both")
        if self.from_ == "allow" and not self.allowed_from:
            raise ValueError("`from: allow` needs `allowed_from` (addresses or `*@domain`)")
        return self


class SpoolSettings(_Record):
    directory: FilePath
    min_free_space: Size = 100 * 1024 * 1024


class PacingSettings(_Record):
    # Exchange Online: 30 messages a minute and 10,000 recipients a rolling day per mailbox.
    # 0 switches pacing (or the warning) off, e.g. for benchmarks against a fake upstream.
    messages_per_minute: float = Field(30.0, ge=0)
    recipients_per_day_warning: int = Field(9000, ge=0)


class DeliverySettings(_Record):
    # Postfix defaults: minimal_backoff_time 300s, maximal_backoff_time 4000s,
    # maximal_queue_lifetime 5d.
    min_backoff: Duration = 300.0
    max_backoff: Duration = 4000.0
    max_age: Duration = 5 * 86400.0
    # Exchange Online allows 3 concurrent connections per mailbox, then 432 4.3.2.
    connections_per_mailbox: int = Field(3, ge=1, le=3)
    idle_timeout: Duration = 30.0
    # Exchange rejects tokens close to expiry; refresh well before.
    token_refresh_margin: Duration = 600.0
    timeout: Duration = 60.0
    pacing: PacingSettings = PacingSettings()


class HttpSettings(_Bindable):
    # Off unless the section is present; loopback by default because the status page lists
    # recipients and errors (never secrets).
    bind: str = "127.0.0.1:9925"
    networks: Networks = LOOPBACK


class AuthLimits(_Record):
    """Password guessing: shared by all listeners, so more listeners give no more guesses."""

    failures_per_session: int = Field(3, ge=1, le=100)
    # 0 turns the per-address or per-user lockout off.
    failures_per_ip: int = Field(5, ge=0)
    failures_per_user: int = Field(10, ge=0)
    window: Duration = 600.0
    block: Duration = 600.0


class TokenStoreSettings(_Record):
    """Where `m365relay login` keeps delegated sign-ins: one encrypted file per account."""

    directory: FilePath
    # A Fernet key (`m365relay login --new-key`), from {env: VAR} or {file: PATH} only.
    key: SecretValue

    @field_validator("key")
    @classmethod
    def _not_inline(cls, value: Secret) -> Secret:
        if value.source == "inline":
            raise ValueError("must be {env: VARIABLE} or {file: PATH}, never inline: the key "
                             "decrypts every stored sign-in")
        return value


class Config(_Record):
    listeners: tuple[Listener, ...] = Field(min_length=1)
    apps: dict[str, App] = Field(min_length=1)
    accounts: tuple[Account, ...] = Field(min_length=1)
    spool: SpoolSettings
    delivery: DeliverySettings = DeliverySettings()
    http: HttpSettings | None = None
    auth_limits: AuthLimits = AuthLimits()
    hostname: str | None = None
    token_store: TokenStoreSettings | None = None

    @model_validator(mode="after")
    def _delegated_store(self) -> Config:
        delegated = sorted(name for name, app in self.apps.items() if app.flow == "delegated")
        if delegated and self.token_store is None:
            raise ValueError(f"apps {', '.join(delegated)} use `flow: delegated`; set "
                             "`token_store` (directory + key) to keep their sign-ins")
        return self

    def account_for_user(self, username: str) -> Account | None:
        return next((a for a in self.accounts if a.username == username), None)


# --- loading -------------------------------------------------------------------------------


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"function-after", "function-before"} or str(part).startswith("function-"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _fields_of(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The valid keys at ``loc``, to suggest the intended one for a typo."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        is_model = isinstance(current, type) and issubclass(current, BaseModel)
        field = current.model_fields.get(part) if is_model else None
        if field is None:
            # Mapping keys (app names) have no field; stay on the value type.
            continue
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or name for name, f in current.model_fields.items()]
    return []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _format(error: Mapping[str, Any]) -> list[str]:
    loc = tuple(error["loc"])
    path = _key_path(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        guess = difflib.get_close_matches(str(loc[-1]), _fields_of(Config, loc), n=1)
        hint = f" (did you mean `{guess[0]}`?)" if guess else ""
        return [f"{path}: unknown key{hint}"]
    if kind == "missing":
        return [f"{path}: required key is missing"]
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind == "model_type":
        return [f"{path}: expected a mapping of keys"]
    return [f"{path}: {message}"]


def _duplicates(data: Mapping[str, Any]) -> list[str]:
    """Checks across list items, run on the raw data so they are reported with the rest."""
    problems = []
    for section, key in (("listeners", "name"), ("accounts", "name"), ("accounts", "username"),
                         ("listeners", "bind")):
        items = data.get(section)
        if not isinstance(items, list):
            continue
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            value = item.get(key) if isinstance(item, Mapping) else None
            if not isinstance(value, str) or value.endswith(":0"):
                continue
            if value in seen:
                problems.append(f"{section}[{i}].{key}: {value!r} is already used by "
                                f"{section}[{seen[value]}]; it must be unique")
            seen.setdefault(value, i)
    return problems


def parse(data: Any, *, source: str = "config", base_dir: Path | None = None) -> Config:
    """Validate already-parsed YAML data; raises ConfigError listing every problem."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, ["(top level): expected a mapping with listeners, apps, "
                                   "accounts and spool"])
    apps = data.get("apps")
    context = {
        "base_dir": str(base_dir or Path.cwd()),
        "apps": set(apps) if isinstance(apps, Mapping) else set(),
    }
    problems = _duplicates(data)
    try:
        config = Config.model_validate(data, context=context)
    except ValidationError as exc:
        errors = exc.errors()
        # A list whose items failed is also reported as "too short"; that is noise.
        failed = {tuple(e["loc"][:1]) for e in errors if len(e["loc"]) > 1}
        problems += [line for err in errors
                     if not (err["type"] == "too_short" and tuple(err["loc"]) in failed)
                     for line in _format(err)]
    if problems:
        raise ConfigError(source, problems)
    return config


def load(path: Path) -> Config:
    """Read and validate a config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), [f"{where}not valid YAML ({problem})"]) from None
    return parse(data, source=str(path), base_dir=path.resolve().parent)
