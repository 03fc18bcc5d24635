"""The User Portal in a real headless chromium (tests/chromium.py), on the gateway's real TLS
port of the in-process farm: what a user sees and does. Logging in (right, wrong, locked out,
a TOTP prompt), the list, logging out; the launch methods' settings change what the page
offers; the native method downloads an .rdp file that real xfreerdp opens to a real NLA login
(0 with the right password, 147 with a wrong one) through the gateway's RDP port; a form
without its CSRF token is refused; a page of another site cannot frame the portal unless
embedding is allowed, nor read its answers unless its origin is on the CORS list."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import trio
from chromium import Chromium, chromium_missing
from conftest import SHADOW_PASSWORD, SHADOW_USER
from farmkit import PASSWORD, USER, Farm, add_gateway, farm, until
from peerkit import skips

from ras.broker.passwords import hash_password
from ras.broker.store import UserRecord
from ras.broker.totp import totp
from ras.client.rdpfile import parse_rdp_file
from ras.gateway.server import Gateway
from ras.portal import LaunchMethod, PortalSettings

pytestmark = [
    pytest.mark.peers,
    pytest.mark.skipif(skips(chromium_missing()), reason=str(chromium_missing())),
]
WRONG = "not the password"
# RAS_PORTAL_SCREENSHOTS=docs/images keeps the pages' pictures for docs/portal.md
SHOTS = os.environ.get("RAS_PORTAL_SCREENSHOTS")


async def _portal_farm(f: Farm, nursery: trio.Nursery) -> tuple[Gateway, str]:
    gw = await add_gateway(f, nursery, "gateway", rdp_lb_enabled=True, rdp_port=0)
    assert gw.portal is not None
    await until(gw.registered.is_set)
    _, port = f.gateway_addrs["gateway"]["tls"]
    return gw, f"https://localhost:{port}"


async def _settings(f: Farm, gw: Gateway, **changes: object) -> None:
    """Store the farm default as an administrator would, and wait until the gateway has it."""
    wanted = PortalSettings(**changes)  # type: ignore[arg-type]
    await trio.to_thread.run_sync(f.store.put_object, wanted)
    await f.broker.links.push_portal()
    await until(lambda: gw.portal is not None and gw.portal.settings == wanted)


async def _log_in(browser: Chromium, base: str, user: str, password: str) -> None:
    await browser.get(f"{base}/login")
    await browser.type("#username", user)
    await browser.type("#password", password)
    await browser.click("#login-form button[type=submit]", navigates=True)


async def _shot(browser: Chromium, tmp: Path, name: str) -> None:
    path = await browser.screenshot(tmp / name)
    if SHOTS:
        shutil.copy(path, Path(SHOTS) / name)


async def test_log_in_wrong_right_locked_out_and_log_out(tmp_path, nursery):
    async with (
        farm(tmp_path, gateways=(), max_failures_per_user=3, lockout_s=600.0) as f,
        Chromium(tmp_path) as browser,
    ):
        f.store.put_user(UserRecord("bob", hash_password(PASSWORD, log2_n=10), ("users",)))
        _, base = await _portal_farm(f, nursery)
        await browser.get(base)
        assert (await browser.url()).endswith("/login")
        await _shot(browser, tmp_path, "portal-login.png")
        await _log_in(browser, base, USER, WRONG)
        assert "Wrong user name or password." in await browser.text("[role=alert]")
        assert await browser.attribute("#username", "value") == USER  # kept for the retry
        await _log_in(browser, base, USER, PASSWORD)
        assert (await browser.url()).endswith("/resources")
        assert await browser.text(".resource[data-id=desktop] .name") == "Desktop"
        assert await browser.text(".resource[data-id=desktop] .kind-label") == "Desktop"
        await _shot(browser, tmp_path, "portal-resources.png")
        # a phone's width: one column, nothing wider than the screen
        await browser.window(390, 800)
        await browser.get(f"{base}/resources")
        fits = "return document.documentElement.scrollWidth <= window.innerWidth"
        assert await browser.execute(fits)
        await browser.window(1280, 800)
        await browser.click("#logout-form button", navigates=True)
        assert (await browser.url()).endswith("/login?out=1")
        assert "logged out" in await browser.text("[role=alert]")
        await browser.get(f"{base}/resources")  # the cookie is gone: back to the login
        assert (await browser.url()).endswith("/login")
        # three wrong passwords lock bob out; then even the right one is refused
        for _ in range(3):
            await _log_in(browser, base, "bob", WRONG)
        await _log_in(browser, base, "bob", PASSWORD)
        assert "too many failed logins" in await browser.text("[role=alert]")
        assert (await browser.url()).endswith("/login")


async def test_totp_prompt(tmp_path, nursery):
    secret = b"0123456789abcdef0123"
    async with farm(tmp_path, gateways=()) as f, Chromium(tmp_path) as browser:
        f.store.put_user(UserRecord(USER, hash_password(PASSWORD), ("users",), True, secret))
        _, base = await _portal_farm(f, nursery)
        await _log_in(browser, base, USER, PASSWORD)
        assert "Verification code" in await browser.text("label[for=answer]")
        assert await browser.attribute("#answer", "autocomplete") == "one-time-code"
        await _shot(browser, tmp_path, "portal-totp.png")
        await browser.type("#answer", totp(secret, time.time()))
        await browser.click("#challenge-form button", navigates=True)
        assert (await browser.url()).endswith("/resources")
        assert await browser.exists(".resource[data-id=desktop]")


async def test_a_form_without_its_csrf_token_is_refused(tmp_path, nursery):
    async with farm(tmp_path, gateways=()) as f, Chromium(tmp_path) as browser:
        gw, base = await _portal_farm(f, nursery)
        await browser.get(f"{base}/login")
        await browser.execute("document.querySelector('input[name=csrf]').remove()")
        await browser.type("#username", USER)
        await browser.type("#password", PASSWORD)
        await browser.click("#login-form button[type=submit]", navigates=True)
        assert await browser.text("h1") == "Refused"
        assert gw.portal is not None
        assert len(gw.portal.sessions) == 0
        # logged in, a launch form stripped of its token is refused as well
        await _log_in(browser, base, USER, PASSWORD)
        await browser.execute(
            "for (const i of document.querySelectorAll('.resource input[name=csrf]')) i.remove()"
        )
        await browser.click(".resource[data-id=desktop] button", navigates=True)
        assert await browser.text("h1") == "Refused"


def _methods_script() -> str:
    """The desktop's launch buttons in the order shown: [method, primary?] each."""
    return (
        "return [...document.querySelectorAll('.resource[data-id=desktop] button')]"
        ".map(b => [b, Number(b.closest('form').style.order || 0)])"
        ".sort((a, b) => a[1] - b[1]).map(([b]) => b)"
        ".map(b => [b.dataset.method, b.classList.contains('primary')])"
    )


async def test_launch_methods_and_the_native_rdp_file_in_xfreerdp(
    tmp_path, nursery, shadow, display
):
    hosts = [("host1", shadow.host, shadow.port)]
    async with farm(tmp_path, gateways=(), rdp_hosts=hosts) as f, Chromium(tmp_path) as browser:
        gw, base = await _portal_farm(f, nursery)
        _, rdp_port = f.gateway_addrs["gateway"]["rdp"]
        # native only: the page offers the .rdp file and nothing else
        await _settings(f, gw, launch_method=LaunchMethod.NATIVE, allow_user_select=False,
                        alternate_host="127.0.0.1", alternate_rdp_port=rdp_port)  # fmt: skip
        await _log_in(browser, base, USER, PASSWORD)
        assert await browser.execute(_methods_script()) == [["native", True]]
        assert not await browser.exists("#launch-chooser")
        await browser.click(".resource[data-id=desktop] button[data-method=native]")
        rdp_file = await browser.wait_download(".rdp")
        settings = parse_rdp_file(rdp_file.read_text())
        assert settings["full address"] == f"127.0.0.1:{rdp_port}"
        right = await _xfreerdp_file(rdp_file, SHADOW_PASSWORD, display, tmp_path)
        wrong = await _xfreerdp_file(rdp_file, WRONG, display, tmp_path)
        assert (right, wrong) == (0, 147)
        # native with the browser as fallback: both, native first
        await _settings(f, gw, launch_method=LaunchMethod.NATIVE_FALLBACK,
                        allow_user_select=False)  # fmt: skip
        await browser.get(f"{base}/resources")
        assert await browser.execute(_methods_script()) == [["native", True], ["browser", False]]
        # browser only
        await _settings(f, gw, launch_method=LaunchMethod.BROWSER, allow_user_select=False)
        await browser.get(f"{base}/resources")
        assert await browser.execute(_methods_script()) == [["browser", True]]
        # users select: a chooser, and the chosen method's button first (kept in the browser)
        await _settings(f, gw, launch_method=LaunchMethod.NATIVE, allow_user_select=True)
        await browser.get(f"{base}/resources")
        assert await browser.exists("#launch-chooser")
        assert await browser.execute(_methods_script()) == [["native", True], ["browser", False]]
        await browser.click("#launch-browser")
        assert await browser.execute(_methods_script()) == [["browser", True], ["native", False]]
        await browser.get(f"{base}/resources")
        assert await browser.execute(_methods_script()) == [["browser", True], ["native", False]]


async def _xfreerdp_file(rdp_file: Path, password: str, display: str, home: Path) -> int:
    """xfreerdp on the downloaded file alone, as a user opens it (``+auth-only``: NLA)."""
    argv = ["xfreerdp", str(rdp_file), f"/u:{SHADOW_USER}", f"/p:{password}", "/cert:ignore",
            "+auth-only"]  # fmt: skip
    env = {**os.environ, "DISPLAY": display, "HOME": str(home)}
    with trio.fail_after(90):  # a hang guard only
        proc = await trio.run_process(argv, env=env, check=False, capture_stdout=True,
                                      capture_stderr=True)  # fmt: skip
    return proc.returncode


class _OtherSite:
    """A page of another origin (plain HTTP on 127.0.0.1) that frames or calls the portal."""

    def __init__(self) -> None:
        self.page = b""
        self.kind = b"text/html"
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async def answer(stream: trio.SocketStream) -> None:
            async with stream:
                await stream.receive_some(65536)
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\nconnection: close\r\n"
                    b"access-control-allow-origin: *\r\n"  # as public IP services answer
                    b"content-length: %d\r\n\r\n%s" % (self.kind, len(self.page), self.page)
                )

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(answer, listeners)


async def test_framing_and_cors_from_another_site(tmp_path, nursery):
    other = _OtherSite()
    await nursery.start(other.serve)
    origin = f"http://127.0.0.1:{other.port}"
    async with farm(tmp_path, gateways=()) as f, Chromium(tmp_path) as browser:
        gw, base = await _portal_farm(f, nursery)
        other.page = f'<iframe id="portal" src="{base}/login"></iframe>'.encode()

        async def framed() -> bool:
            await browser.get(f"{origin}/")  # returns once the page and its frame loaded
            await browser.frame("#portal")
            try:
                return await browser.exists("#login-form")
            finally:
                await browser.frame(None)

        assert not await framed()  # embedding is off by default
        await _settings(f, gw, allow_embedding=True)
        assert await framed()

        fetch = (
            "const done = arguments[1];"
            "fetch(arguments[0] + '/login', {mode: 'cors', credentials: 'include'})"
            ".then(r => r.text()).then(t => done(t.includes('login-form') ? 'read' : 'other'))"
            ".catch(e => done('blocked'))"
        )
        await browser.get(f"{origin}/")
        assert await browser.execute_async(fetch, base) == "blocked"
        await _settings(f, gw, cors_origins=(origin,))
        assert await browser.execute_async(fetch, base) == "read"


async def test_the_client_ip_detection_service_is_asked_by_the_browser(tmp_path, nursery, caplog):
    caplog.set_level("INFO", logger="ras.portal")
    service = _OtherSite()
    service.page, service.kind = b"203.0.113.9\n", b"text/plain"
    await nursery.start(service.serve)
    async with farm(tmp_path, gateways=()) as f, Chromium(tmp_path) as browser:
        gw, base = await _portal_farm(f, nursery)
        url = f"http://127.0.0.1:{service.port}/ip"
        await _settings(f, gw, client_ip_detection_url=url)
        await browser.get(f"{base}/login")
        with trio.fail_after(30):  # the page's script fills the field in when it answered
            while not await browser.attribute("#reported-ip", "value"):  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert await browser.attribute("#reported-ip", "value") == "203.0.113.9"
        await browser.type("#username", USER)
        await browser.type("#password", PASSWORD)
        await browser.click("#login-form button[type=submit]", navigates=True)
        assert (await browser.url()).endswith("/resources")
    lines = [r.getMessage() for r in caplog.records]
    assert "portal login client=127.0.0.1 reported_ip=203.0.113.9" in lines
