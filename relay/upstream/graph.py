"""Delivery through Microsoft Graph (``apps.<name>.transport: graph``) for tenants where SMTP
AUTH is switched off.

:class:`GraphConnection` has the interface of :class:`relay.upstream.smtp.UpstreamConnection`, so
delivery picks one or the other and nothing else changes. The calls themselves are in
:mod:`relay.upstream.graph_api`; this module turns their failures into the same
:class:`~relay.diagnosis.errors.DeliveryError` classes SMTP replies become.

Graph takes recipients from the message headers, not from an SMTP envelope: envelope recipients
that are not in To/Cc/Bcc (a device's Bcc) are added as a Bcc header before sending.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from relay.config.records import App
from relay.diagnosis.errors import AuthRejected, BounceError, DeferError, DeliveryError
from relay.diagnosis.explain import Context, Explanation, Verdict, explain_connection_error
from relay.diagnosis.graph import DRAFT_REQUEST, explain_graph
from relay.message import Body, Message, content_parts
from relay.tokens.provider import TokenProvider
from relay.upstream.counts import Opened
from relay.upstream.graph_api import GraphClient, GraphHTTPError, with_envelope_recipients
from relay.upstream.smtp import LaneError

if TYPE_CHECKING:
    import requests  # at run time only once a session exists: not needed to start listening

log = logging.getLogger("m365relay.graph")

# Failures that every message of this mailbox would hit the same way: pause the lane.
_PATH_STATUSES = frozenset({401, 403, 404, 429})
_Action = Callable[[GraphClient], str | None]


class GraphConnection:
    """Sends through Graph as one mailbox; keeps one HTTPS session (connection reuse)."""

    def __init__(self, *, app_name: str, app: App, mailbox: str, tokens: TokenProvider,
                 timeout: float = 60.0, local_hostname: str | None = None,
                 opened: Opened | None = None) -> None:
        del local_hostname  # SMTP's EHLO name; HTTP has no equivalent
        self.opened = opened if opened is not None else Opened()  # the relay's, for /metrics
        self.app_name = app_name
        self.app = app
        self.mailbox = mailbox
        self._tokens = tokens
        self._timeout = timeout
        self._session: requests.Session | None = None
        self.last_used = time.monotonic()

    @property
    def relay(self) -> str:
        return urlsplit(self.app.graph_endpoint).netloc

    @property
    def connected(self) -> bool:
        return self._session is not None

    def _ctx(self, sender: str = "") -> Context:
        return Context(mailbox=self.mailbox, sender=sender, app=self.app_name,
                       client_id=self.app.client_id, tenant=self.app.tenant,
                       smtp_host=self.relay, graph=True)

    def abort(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()

    async def close(self) -> None:
        self.abort()

    def _http(self) -> requests.Session:
        if self._session is None:
            # tokens' session: verification always on, `ca_file` honoured, REQUESTS_CA_BUNDLE
            # cannot override it, default timeout.
            self._session = self._tokens.http_session(self.app_name)
            self.opened.total += 1
        return self._session

    async def login(self) -> None:
        """Get a token and make one authenticated request (``m365relay doctor``). A 403 on
        that read means the token was accepted (reading needs Mail.Read, not Mail.Send)."""
        await self._call(lambda client: client.check(), "", accept_denied=True)

    async def send(self, mail_from: str, rcpts: list[str], body: Body
                   ) -> tuple[dict[str, DeliveryError], str]:
        """Send one message; Graph accepts or refuses it as a whole, so the refused dict is
        always empty and a failure raises."""
        # Graph takes the message base64-encoded in one request: it is whole in memory anyway.
        if isinstance(body, Message):
            whole = body.data if body.data is not None else await asyncio.to_thread(
                body.read_all)
        else:
            parts = content_parts(body)
            whole = parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) \
                else b"".join(parts)
        data, extra = with_envelope_recipients(whole, rcpts)
        if extra:
            log.warning("Graph delivers to every To/Cc address, including %d that were not "
                        "envelope recipients of this message (%s)", len(extra),
                        ", ".join(extra[:5]))
        reply = await self._call(lambda client: client.send(data), mail_from)
        return {}, reply

    async def _call(self, action: _Action, sender: str, *, accept_denied: bool = False) -> str:
        ctx = self._ctx(sender)
        for attempt in (1, 2):
            token = await self._tokens.token(self.app_name)
            client = GraphClient(self._http(), self.app.graph_endpoint, self.mailbox, token,
                                 self.app.graph_request_limit)
            try:
                return await asyncio.to_thread(action, client) or ""
            except GraphHTTPError as exc:
                if accept_denied and exc.status == 403:
                    return ""
                explanation = explain_graph(exc.status, exc.code, exc.message, ctx,
                                            request=exc.request)
                # A rejected token may be stale or revoked: one fresh token is worth a try.
                if attempt == 1 and explanation.verdict is Verdict.RETRY_NEW_TOKEN:
                    self._tokens.invalidate(self.app_name, token)
                    continue
                raise self._error(exc, explanation) from None
            except Exception as exc:
                if not isinstance(exc, _request_exception()):
                    raise
                self.abort()
                explanation = explain_connection_error(exc, stage="connect", ctx=ctx)
                raise LaneError(f"cannot reach Microsoft Graph at {self.relay}: "
                                f"{type(exc).__name__}: {exc}", explanation=explanation) from None
            finally:
                self.last_used = time.monotonic()
        raise AssertionError("unreachable")  # pragma: no cover

    def _error(self, exc: GraphHTTPError, explanation: Explanation) -> DeliveryError:
        text = f"Microsoft Graph: {exc}"
        reply = f"{exc.status} {exc.code}: {exc.message}"
        if explanation.verdict is Verdict.BOUNCE:
            return BounceError(text, code=exc.status, graph_code=exc.code, reply=reply,
                               explanation=explanation)
        if explanation.verdict is Verdict.RETRY_NEW_TOKEN:
            return AuthRejected(text, code=exc.status, graph_code=exc.code, reply=reply,
                                explanation=explanation)
        # A draft refused for want of Mail.ReadWrite concerns large messages only: small ones
        # still go through sendMail, so only this message waits, not the mailbox's lane.
        draft_denied = exc.status == 403 and re.search(DRAFT_REQUEST, exc.request)
        kind = LaneError if exc.status in _PATH_STATUSES and not draft_denied else DeferError
        return kind(text, code=exc.status, graph_code=exc.code, reply=reply,
                    explanation=explanation, retry_after=exc.retry_after)



def _request_exception() -> type[Exception]:
    import requests  # already loaded: _http() built a requests session

    return requests.RequestException
