"""A real headless chromium for the tests, driven through WebDriver (Debian's chromium and
chromium-driver), usable from trio tests.

    async with Chromium(tmp_path) as browser:
        await browser.get("https://localhost:8443/login")
        await browser.type("#username", "alice")
        await browser.click("button[type=submit]")
        assert "Log out" in await browser.text("body")

Each WebDriver call is an HTTP request to chromedriver made in a worker thread, so the trio
loop keeps serving the daemons under test meanwhile. chromium runs as root with the flags the
project uses everywhere (headless, no sandbox, no GPU, no background networking, component
updates, sync or first-run), a fresh profile in the test's directory, certificate errors
accepted (the farm's self-signed public certificate), and downloads into ``downloads``.
Everything it started is stopped on exit, even when the test failed.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any

import trio
from rdp_peers import free_port, wait_port

__all__ = ["Chromium", "WebDriverError", "chromium_missing"]

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1280,800",
)
_ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    for tool in ("chromium", "chromedriver"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install-peers installs it)"
    return None


class WebDriverError(RuntimeError):
    """chromedriver answered an error: ``error`` is the W3C error code (``no such element``)."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(f"{error}: {message.splitlines()[0] if message else ''}")
        self.error = error


class Chromium:
    """One chromium session; ``downloads``: where downloaded files land."""

    def __init__(self, tmp: Path, *, timeout_s: float = 30.0) -> None:
        self.tmp = tmp
        self.downloads = tmp / "downloads"
        self.timeout_s = timeout_s
        self._driver: subprocess.Popen[bytes] | None = None
        self._port = 0
        self._session = ""

    async def __aenter__(self) -> Chromium:
        await trio.to_thread.run_sync(self._start)
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._stop)

    # -- the process ----------------------------------------------------------------------------

    def _start(self) -> None:
        missing = chromium_missing()
        if missing:
            raise RuntimeError(missing)
        profile = self.tmp / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        self.downloads.mkdir(parents=True, exist_ok=True)
        self._port = free_port()
        log = (self.tmp / "chromedriver.log").open("wb")
        self._driver = subprocess.Popen(
            ["chromedriver", f"--port={self._port}", "--log-level=WARNING"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": str(self.tmp)},
            start_new_session=True,
        )
        log.close()
        try:
            wait_port("127.0.0.1", self._port, 30.0, proc=self._driver,
                      log=self.tmp / "chromedriver.log", what="chromedriver")  # fmt: skip
            options = {
                "binary": shutil.which("chromium"),
                "args": [*FLAGS, f"--user-data-dir={profile}"],
                "prefs": {
                    "download.default_directory": str(self.downloads),
                    "download.prompt_for_download": False,
                    "safebrowsing.enabled": False,
                },
            }
            caps = {"browserName": "chrome", "acceptInsecureCerts": True,
                    "goog:chromeOptions": options}  # fmt: skip
            got = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})
            self._session = got["sessionId"]
            self.cdp("Browser.setDownloadBehavior",
                     behavior="allow", downloadPath=str(self.downloads))  # fmt: skip
        except BaseException:
            self._stop()
            raise

    def _stop(self) -> None:
        if self._session:
            with contextlib.suppress(OSError, WebDriverError, TimeoutError):
                self._call("DELETE", f"/session/{self._session}")
            self._session = ""
        if self._driver is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._driver.pid, 15)  # chromedriver and the chromium it started
            try:
                self._driver.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._driver.pid, 9)
                self._driver.wait()
            self._driver = None

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=self.timeout_s + 30)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"content-type": "application/json"} if data is not None else {}
            conn.request(method, path, data, headers)
            answer = conn.getresponse()
            payload = json.loads(answer.read() or b"{}")
        finally:
            conn.close()
        value = payload.get("value")
        if answer.status >= 400 or (isinstance(value, dict) and "error" in value):
            assert isinstance(value, dict)
            raise WebDriverError(str(value.get("error")), str(value.get("message", "")))
        return value

    def cdp(self, command: str, **params: Any) -> Any:
        """A DevTools protocol command (through chromedriver)."""
        body = {"cmd": command, "params": params}
        return self._call("POST", f"/session/{self._session}/goog/cdp/execute", body)

    async def _s(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return await trio.to_thread.run_sync(
            self._call, method, f"/session/{self._session}{path}", body
        )

    # -- pages ----------------------------------------------------------------------------------

    async def get(self, url: str) -> None:
        await self._s("POST", "/url", {"url": url})

    async def url(self) -> str:
        return str(await self._s("GET", "/url"))

    async def source(self) -> str:
        return str(await self._s("GET", "/source"))

    async def execute(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body; ``arguments`` holds ``args``) in the page."""
        return await self._s("POST", "/execute/sync", {"script": script, "args": list(args)})

    async def execute_async(self, script: str, *args: Any) -> Any:
        """Run ``script``; it ends by calling ``arguments[arguments.length - 1](result)``."""
        return await self._s("POST", "/execute/async", {"script": script, "args": list(args)})

    async def screenshot(self, path: Path) -> Path:
        """The visible page as a PNG file."""
        data = await self._s("GET", "/screenshot")
        await trio.Path(path).write_bytes(base64.b64decode(data))
        return path

    async def close_tab(self) -> None:
        """Close the current tab as a user would; a new one is opened first and used from
        then on (the browser stays up)."""
        got = await self._s("POST", "/window/new", {"type": "tab"})
        await self._s("DELETE", "/window")
        await self._s("POST", "/window", {"handle": got["handle"]})

    async def window(self, width: int, height: int) -> None:
        await self._s("POST", "/window/rect", {"width": width, "height": height})

    # -- elements -------------------------------------------------------------------------------

    async def find(self, css: str) -> str:
        """The first element ``css`` selects (``WebDriverError`` "no such element" if none)."""
        got = await self._s("POST", "/element", {"using": "css selector", "value": css})
        return str(got[_ELEMENT])

    async def find_all(self, css: str) -> list[str]:
        got = await self._s("POST", "/elements", {"using": "css selector", "value": css})
        return [str(e[_ELEMENT]) for e in got]

    async def exists(self, css: str) -> bool:
        return bool(await self.find_all(css))

    async def click(self, css: str, *, navigates: bool = False) -> None:
        """Click the element; ``navigates``: wait until the page it leads to has loaded."""
        element = await self.find(css)
        if navigates:
            await self.execute("window.__rasLeaving = true")
        await self._s("POST", f"/element/{element}/click", {})
        if navigates:
            await self.wait_loaded()

    async def wait_loaded(self, *, timeout_s: float = 30.0) -> None:
        """Until the page marked before a click is gone and the new one has loaded."""
        script = "return !window.__rasLeaving && document.readyState === 'complete'"
        with trio.fail_after(timeout_s):
            while True:
                with contextlib.suppress(WebDriverError):  # between two documents
                    if await self.execute(script):
                        return
                await trio.sleep(0.05)

    async def type(self, css: str, text: str) -> None:
        await self._s("POST", f"/element/{await self.find(css)}/value", {"text": text})

    async def text(self, css: str) -> str:
        return str(await self._s("GET", f"/element/{await self.find(css)}/text"))

    async def attribute(self, css: str, name: str) -> str | None:
        got = await self._s("GET", f"/element/{await self.find(css)}/attribute/{name}")
        return None if got is None else str(got)

    async def frame(self, css: str | None) -> None:
        """Work inside the frame ``css`` selects (None: the top page again)."""
        ref = None if css is None else {_ELEMENT: await self.find(css)}
        await self._s("POST", "/frame", {"id": ref})

    async def wait_for(self, css: str, *, timeout_s: float = 30.0) -> str:
        """The element ``css`` selects, once the page has it (a hang guard, not a timing)."""
        with trio.fail_after(timeout_s):
            while True:
                found = await self.find_all(css)
                if found:
                    return found[0]
                await trio.sleep(0.1)

    async def wait_download(self, suffix: str, *, timeout_s: float = 30.0) -> Path:
        """The first complete file ending in ``suffix`` in the downloads folder."""
        with trio.fail_after(timeout_s):
            while True:
                done = sorted(p for p in self.downloads.iterdir() if p.name.endswith(suffix))
                if done:
                    return done[0]
                await trio.sleep(0.1)
