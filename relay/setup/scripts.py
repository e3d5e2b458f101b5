"""Rendering setup-m365.ps1 and setup-m365-az.sh from the config's app and its mailboxes.

The templates beside this module hold the steps and their sources; here only values are filled
in, each one checked first, so nothing from a config can break out of a quoted string.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

from relay.setup.certs import CertificateFiles
from relay.setup.configfile import PLACEHOLDER_CLIENT_ID
from relay.setup.targets import CLOUDS, EXCHANGE_ONLINE_APP_ID, MICROSOFT_GRAPH_APP_ID, grants

_HERE = Path(__file__).resolve().parent
# What may appear inside a quoted value at all: addresses, domains, GUIDs, names, paths.
_SAFE = re.compile(r"^[A-Za-z0-9 _.@:/+=-]*$")
PS1_NAME = "setup-m365.ps1"
AZ_NAME = "setup-m365-az.sh"


@dataclass(frozen=True)
class ScriptInputs:
    app_name: str
    tenant: str
    client_id: str | None  # None or the placeholder: the script finds the app by name
    cloud: str
    hve: bool
    transport: str
    grant: str  # FullAccess | RBAC
    mailboxes: tuple[str, ...]
    certificate: CertificateFiles
    config_path: Path


def _safe(value: str, what: str) -> str:
    if not _SAFE.match(value) or "'" in value:
        raise ValueError(f"{what} {value!r} has characters the setup scripts cannot quote safely")
    return value


def _ps_list(values: tuple[str, ...] | list[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _values(inputs: ScriptInputs) -> dict[str, str]:
    # The script decides at run time (-Grant), so it carries both variants.
    need = grants(transport=inputs.transport, hve=inputs.hve, rbac=False)
    rbac_need = grants(transport=inputs.transport, hve=inputs.hve, rbac=True)
    cloud = CLOUDS[inputs.cloud]
    client_id = "" if inputs.client_id in (None, PLACEHOLDER_CLIENT_ID) else inputs.client_id
    ps_ids = {EXCHANGE_ONLINE_APP_ID: "$ExchangeOnlineAppId",
              MICROSOFT_GRAPH_APP_ID: "$MicrosoftGraphAppId"}
    permissions = ", ".join(
        f"@{{ Resource = {ps_ids[p.resource_app_id]}; Value = '{p.value}'; "
        f"Name = '{p.resource_name}' }}" for p in need.entra)
    ids = {EXCHANGE_ONLINE_APP_ID: "${EXO_APP_ID}", MICROSOFT_GRAPH_APP_ID: "${GRAPH_APP_ID}"}
    pem = inputs.certificate.cert.read_text(encoding="ascii")
    return {
        "APP_NAME": _safe(inputs.app_name, "app name"),
        "TENANT": _safe(inputs.tenant, "tenant"),
        "CLIENT_ID": _safe(client_id or "", "client id"),
        "GRANT": inputs.grant,
        "TRANSPORT": inputs.transport,
        "HVE": "true" if inputs.hve else "false",
        "MAILBOXES": _ps_list([_safe(m, "mailbox") for m in inputs.mailboxes]),
        "GRAPH_ENV": cloud.graph_environment,
        "EXCHANGE_ENV": cloud.exchange_environment,
        "AZ_CLOUD": cloud.az_cloud,
        "CERT_DER": inputs.certificate.der_base64,
        "CERT_SHA1": inputs.certificate.sha1_thumbprint,
        "CERT_SHA1_B64": base64.b64encode(bytes.fromhex(inputs.certificate.sha1_thumbprint))
        .decode("ascii"),
        "CERT_PEM": pem if pem.endswith("\n") else pem + "\n",
        "EXO_APP_ID": EXCHANGE_ONLINE_APP_ID,
        "GRAPH_APP_ID": MICROSOFT_GRAPH_APP_ID,
        "PERMISSIONS": permissions,
        "AZ_PERMISSIONS": " ".join(f"{ids[p.resource_app_id]}={p.value}" for p in need.entra),
        "RBAC_ROLES": _ps_list(list(rbac_need.rbac_roles)),
        "NEED_EXO_SP": "true" if need.exchange_service_principal else "false",
        "NEED_FULL_ACCESS": "true" if need.mailbox_full_access else "false",
        "NEED_SMTP_AUTH": "true" if need.smtp_auth else "false",
        "CONFIG": _safe(str(inputs.config_path), "config path"),
        "DATE": dt.datetime.now(dt.UTC).date().isoformat(),
    }


def _fill(template: str, values: dict[str, str]) -> str:
    return re.sub(r"@@([A-Z0-9_]+)@@", lambda m: values[m.group(1)], template)


def render(inputs: ScriptInputs) -> dict[str, str]:
    """{file name: text} of both scripts."""
    values = _values(inputs)
    return {
        name: _fill((_HERE / f"{name}.tmpl").read_text(encoding="utf-8"), values)
        for name in (PS1_NAME, AZ_NAME)
    }


def write(directory: Path, inputs: ScriptInputs) -> list[Path]:
    written = []
    for name, text in render(inputs).items():
        path = directory / name
        # No secret in either (the certificate is public); executable for the az one.
        path.write_text(text, encoding="utf-8", newline="\r\n" if name.endswith(".ps1") else "\n")
        path.chmod(0o755 if name.endswith(".sh") else 0o644)
        written.append(path)
    return written
