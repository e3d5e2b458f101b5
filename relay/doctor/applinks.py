"""The links of one app, walked once and shared by its accounts: the credential, the token
endpoint (DNS, TCP, TLS as msal sees them), the token, its claims, TCP to Exchange Online and
STARTTLS. The per-mailbox links (XOAUTH2, the test message) are :mod:`relay.doctor.chain`."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiosmtplib
import requests
import requests.utils

from relay.config.records import App, Config
from relay.diagnosis.errors import TokenError
from relay.diagnosis.explain import (
    Context,
    Explanation,
    Verdict,
    explain_connection_error,
    explain_smtp,
    explain_token_error,
)
from relay.doctor.claims import check_claims
from relay.doctor.credential import CertificateFacts, check_credential
from relay.doctor.report import Check, Status
from relay.tokens.provider import TokenProvider
from relay.upstream.smtp import tls_context

_AADSTS = re.compile(r"AADSTS\d+")


def failed(link: str, explanation: Explanation, *, detail: str = "", code: str = "") -> Check:
    return Check(link, Status.FAIL, detail=detail, summary=explanation.summary,
                 fix=explanation.fix, code=code)


@dataclass
class AppResult:
    """The app's checks so far, and what the token told (for the mailbox links)."""

    checks: list[Check] = field(default_factory=list)
    object_id: str = ""
    role_missing: bool = False
    claims: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return all(c.status is not Status.FAIL for c in self.checks)


class AppLinks:
    """Walks one app's links with the relay's own TokenProvider."""

    def __init__(self, config: Config, tokens: TokenProvider, *, timeout: float) -> None:
        self.config = config
        self.tokens = tokens
        self.timeout = timeout

    async def walk(self, name: str) -> AppResult:
        """Each link in turn, stopping at the first that fails."""
        app = self.config.apps[name]
        result = AppResult()
        credential, facts = check_credential(name, app)
        result.checks.append(credential)
        if credential.status is Status.FAIL:
            return result
        discovery = await self._token_endpoint(name, app, result)
        if discovery is None:
            return result
        token = await self._token(name, app, discovery, facts, result)
        if token is None:
            return result
        largest = max((lst.max_message_size for lst in self.config.listeners), default=0)
        claims = check_claims(name, app, token, largest_message=largest)
        result.checks.append(claims.check)
        result.claims, result.object_id = claims.claims, claims.object_id
        result.role_missing = claims.role_missing
        if claims.check.status is Status.FAIL or app.transport == "graph":
            return result  # Graph: no SMTP links; graphlink checks the mailbox
        if await self._tcp(name, app, result):
            await self._starttls(name, app, result)
        return result

    def _ctx(self, name: str) -> Context:
        return self.tokens.context(name)

    async def _token_endpoint(self, name: str, app: App, result: AppResult
                              ) -> requests.Response | None:
        """GET the tenant's OpenID configuration, as msal does first: this proves DNS, TCP
        and TLS with the very trust settings msal uses, through any configured proxy."""
        url = f"{app.authority_url}/v2.0/.well-known/openid-configuration"
        host = urlsplit(url).netloc
        session = self.tokens.http_session(name)
        try:
            response = await asyncio.to_thread(session.get, url)
        except (requests.RequestException, OSError, ValueError) as exc:
            result.checks.append(failed("token_endpoint", explain_connection_error(
                exc, stage="token", ctx=self._ctx(name)), detail=f"https://{host}"))
            return None
        finally:
            session.close()
        proxy = requests.utils.get_environ_proxies(url).get("https")
        via = f" via proxy {urlsplit(proxy).netloc}" if proxy else ""
        result.checks.append(Check("token_endpoint", Status.OK,
                                   detail=f"https://{host}{via}: DNS, TCP and TLS ok"))
        return response

    async def _token(self, name: str, app: App, discovery: requests.Response,
                     facts: CertificateFacts | None, result: AppResult) -> str | None:
        ctx = self._ctx(name)
        refusal = _entra_error(discovery)
        if refusal is not None:
            # msal reports a refused discovery only as "Unable to get authority
            # configuration"; Entra's own answer names the cause (AADSTS90002).
            error, description = refusal
            explanation = explain_token_error(error, description, status=discovery.status_code,
                                              ctx=ctx)
            result.checks.append(failed("token", explanation, code=_aadsts(description),
                                         detail=f"{app.authority_url}: HTTP "
                                                f"{discovery.status_code}"))
            return None
        try:
            token = await self.tokens.token(name)
        except TokenError as exc:
            explanation = exc.explanation or Explanation(Verdict.DEFER_ADMIN, str(exc), "")
            code = _aadsts(str(exc))
            fix = explanation.fix
            credential = result.checks[0]
            if code == "AADSTS700027" and facts is not None:
                fix = (f"m365relay signs with the certificate from {facts.source}, SHA-1 "
                       f"thumbprint {facts.sha1}. {_uploaded_list(app)} must list that "
                       f"thumbprint; if it does not, upload that certificate there.\n\n{fix}")
            elif code == "AADSTS7000215" and credential.status is Status.WARN:
                fix = f"{credential.summary}\n\n{fix}"
            result.checks.append(Check("token", Status.FAIL, detail=f"from {app.authority_url}",
                                       summary=explanation.summary, fix=fix, code=code))
            return None
        kind = ("certificate" if app.certificate is not None else "federated assertion"
                if app.client_assertion is not None else "client secret")
        result.checks.append(Check("token", Status.OK,
                                   detail=f"from {app.authority_url} with the {kind}"))
        return token

    async def _tcp(self, name: str, app: App, result: AppResult) -> bool:
        where = f"{app.smtp_host}:{app.smtp_port}"
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(app.smtp_host, app.smtp_port)
        except (OSError, TimeoutError) as exc:
            result.checks.append(failed("upstream", explain_connection_error(
                exc, stage="connect", ctx=self._ctx(name)), detail=where))
            return False
        peer = writer.get_extra_info("peername")
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        address = f" ({peer[0]})" if peer else ""
        result.checks.append(Check("upstream", Status.OK, detail=f"{where}{address}: TCP ok"))
        return True

    async def _starttls(self, name: str, app: App, result: AppResult) -> None:
        """Banner, EHLO, STARTTLS and EHLO again, one by one, so a failure names its step.
        The relay's own connection (next link) then does the same in one go."""
        ctx = self._ctx(name)
        smtp = aiosmtplib.SMTP(hostname=app.smtp_host, port=app.smtp_port, start_tls=False,
                               timeout=self.timeout, local_hostname=self.config.hostname)
        stage = "connect"
        try:
            await smtp.connect()
            stage = "ehlo"
            await smtp.ehlo()
            if not smtp.supports_extension("starttls"):
                result.checks.append(_no_starttls(name, app))
                return
            stage = "starttls"
            await smtp.starttls(tls_context=tls_context(app))
            stage = "ehlo"
            await smtp.ehlo()
            tls: ssl.SSLObject | None = smtp.get_transport_info("ssl_object")
            # Read now: QUIT forgets what the server offered.
            xoauth2 = "offered" if "xoauth2" in smtp.server_auth_methods else "NOT offered"
        except aiosmtplib.SMTPResponseException as exc:
            result.checks.append(failed("starttls", explain_smtp(
                exc.code, exc.message, stage=stage, ctx=ctx), code=str(exc.code)))
            return
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            result.checks.append(failed("starttls", explain_connection_error(
                exc, stage=stage, ctx=ctx)))
            return
        finally:
            if smtp.is_connected:
                try:
                    await smtp.quit(timeout=5)
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    smtp.close()
        version = tls.version() if tls else None
        if version not in ("TLSv1.2", "TLSv1.3"):
            result.checks.append(Check(
                "starttls", Status.FAIL, detail=f"negotiated {version}",
                summary=f"TLS with {app.smtp_host} ended up as {version}; Exchange Online "
                        "needs TLS 1.2 or newer.",
                fix="Check the system OpenSSL policy (MinProtocol in /etc/ssl/openssl.cnf) and "
                    "any TLS-inspecting proxy on the way."))
            return
        result.checks.append(Check("starttls", Status.OK,
                                   detail=f"{version}, certificate verified for {app.smtp_host}, "
                                          f"AUTH XOAUTH2 {xoauth2}"))


def _entra_error(response: requests.Response) -> tuple[str, str] | None:
    if not 400 <= response.status_code < 500:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or "error" not in body:
        return None
    return str(body["error"]), str(body.get("error_description", ""))


def _aadsts(text: str) -> str:
    found = _AADSTS.search(text)
    return found.group(0) if found else ""


def _uploaded_list(app: App) -> str:
    return (f"Entra admin center > App registrations > {app.client_id} > Certificates & "
            "secrets > Certificates")


def _no_starttls(name: str, app: App) -> Check:
    return Check("starttls", Status.FAIL, detail=f"{app.smtp_host}:{app.smtp_port}",
                 summary=f"{app.smtp_host}:{app.smtp_port} does not offer STARTTLS, and "
                         "m365relay never sends a token without TLS.",
                 fix=f"Set `apps.{name}.smtp_host` to smtp.office365.com and "
                     f"`apps.{name}.smtp_port` to 587 (Exchange Online's STARTTLS submission "
                     "port). Also check that no firewall or proxy strips STARTTLS.")
