"""A small Chrome DevTools Protocol client: headless Chromium (Debian's), driven over its
websocket, for the status page tests. No browser download, no driver binary in between."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools import need
from websockets.asyncio.client import ClientConnection, connect

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--no-default-browser-check", "--disable-dev-shm-usage", "--no-proxy-server",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")


class CDPError(Exception):
    pass


@dataclass
class Page:
    """One tab, on a flattened session of the browser's websocket."""

    browser: Browser
    session: str
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # Answers to events the browser waits on (Fetch.requestPaused, Fetch.authRequired).
    handlers: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = field(
        default_factory=dict)

    async def log_in(self, username: str, password: str) -> None:
        """Answer HTTP Basic challenges with these credentials, as a person would the dialog."""
        async def resume(params: dict[str, Any]) -> None:
            await self.send("Fetch.continueRequest", requestId=params["requestId"])

        async def answer(params: dict[str, Any]) -> None:
            await self.send("Fetch.continueWithAuth", requestId=params["requestId"],
                            authChallengeResponse={"response": "ProvideCredentials",
                                                   "username": username, "password": password})

        self.handlers.update({"Fetch.requestPaused": resume, "Fetch.authRequired": answer})
        await self.send("Fetch.enable", handleAuthRequests=True, patterns=[{"urlPattern": "*"}])

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        return await self.browser.send(method, params, session=self.session)

    async def evaluate(self, expression: str) -> Any:
        """The expression's value (awaited if a promise), as JSON."""
        reply = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                                awaitPromise=True)
        if "exceptionDetails" in reply:
            raise CDPError(f"{expression!r} threw: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        """Poll a page expression until it is truthy (the page has no event for us)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (value := await self.evaluate(expression)):
            if loop.time() > deadline:
                raise TimeoutError(f"{expression!r} not true within {timeout}s")
            await asyncio.sleep(0.05)
        return value

    async def wait_event(self, method: str, timeout: float = 15.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for name, params in self.events:
                    if name == method:
                        return params
                await self.browser.changed.wait()
                self.browser.changed.clear()

    def console_problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions and browser log errors."""
        out = []
        for name, params in self.events:
            if name == "Runtime.consoleAPICalled" and params["type"] in {"error", "warning",
                                                                          "assert"}:
                out.append(f"console.{params['type']}: {params['args']}")
            elif name == "Runtime.exceptionThrown":
                out.append(f"exception: {params['exceptionDetails']}")
            elif name == "Log.entryAdded" and params["entry"]["level"] in {"error", "warning"}:
                out.append(f"log {params['entry']['level']}: {params['entry']['text']}")
        return out


class Browser:
    def __init__(self, process: subprocess.Popen[bytes], ws: ClientConnection) -> None:
        self.process = process
        self.ws = ws
        self.changed = asyncio.Event()
        self._next = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            if "id" in message:
                future = self._pending.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message)
            elif (page := self._pages.get(message.get("sessionId", ""))) is not None:
                params = message.get("params", {})
                page.events.append((message["method"], params))
                self.changed.set()
                if (handler := page.handlers.get(message["method"])) is not None:
                    # Not awaited here: the handler's own reply arrives through this loop.
                    task = asyncio.create_task(handler(params))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    async def send(self, method: str, params: dict[str, Any] | None = None, *,
                   session: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next] = future
        await self.ws.send(json.dumps(message))
        reply = await asyncio.wait_for(future, timeout)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return dict(reply.get("result", {}))

    async def new_page(self, *, timezone: str | None = None, width: int = 1280,
                       height: int = 900) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget",
                                   {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"])
        self._pages[page.session] = page
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        await page.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=1, mobile=False)
        if timezone is not None:
            await page.send("Emulation.setTimezoneOverride", timezoneId=timezone)
        return page


@contextlib.asynccontextmanager
async def chromium(profile: Path, *flags: str, timeout: float = 60.0
                   ) -> AsyncIterator[Browser]:
    """A fresh headless Chromium with its own profile; killed at the end whatever happens."""
    binary = need("chromium", "chromium")
    profile.mkdir(parents=True, exist_ok=True)
    log = profile.parent / f"{profile.name}-chromium.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen([binary, *FLAGS, *flags, f"--user-data-dir={profile}",
                                    "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        url = await _devtools_url(process, profile, log, timeout)
        async with connect(url, max_size=None, open_timeout=timeout) as ws:
            browser = Browser(process, ws)
            try:
                yield browser
            finally:
                browser._reader.cancel()
    finally:
        process.kill()
        await asyncio.to_thread(process.wait, 30)


async def _devtools_url(process: subprocess.Popen[bytes], profile: Path, log: Path,
                        timeout: float) -> str:
    """Chromium writes its port and browser path to DevToolsActivePort in the profile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    active = profile / "DevToolsActivePort"
    while True:
        with contextlib.suppress(OSError, ValueError):
            port, path = active.read_text().split()[:2]
            return f"ws://127.0.0.1:{int(port)}{path}"
        if process.poll() is not None or loop.time() > deadline:
            raise RuntimeError("chromium gave no DevTools address: "
                               + log.read_text(errors="replace")[-2000:])
        await asyncio.sleep(0.05)


def trust_certificate_flag(certificate_pem: bytes) -> str:
    """Chromium's way to trust one server key without a CA store: its SPKI's SHA-256."""
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(certificate_pem).public_key()
    spki = key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    return f"--ignore-certificate-errors-spki-list={digest}"
