"""RDP in the browser: the User Portal's browser launch in a real headless chromium
(tests/chromium.py), through the gateway's real TLS port and WebSocket, to freerdp-shadow-cli
with NLA mirroring an X display of its own.

What a user would notice: the colour painted on the host's screen appears in the page's canvas,
a key typed in the page (a scancode) arrives at a window on the host, the session shows in the
broker's sessions as a web one, and closing the tab ends the tunnel (its audit line says
``via=web``)."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import IO

import pytest
import trio
from chromium import Chromium, chromium_missing
from conftest import SHADOW_PASSWORD, SHADOW_USER, require_peers
from farmkit import PASSWORD, USER, add_agent, add_gateway, farm, until
from peerkit import skip_or_fail, skips
from rdp_peers import ShadowServer, Xvfb

from ras.gateway.webclient import PACKAGES, default_files_dir
from ras.portal import LaunchMethod, PortalSettings

pytestmark = [
    pytest.mark.peers,
    pytest.mark.skipif(skips(chromium_missing()), reason=str(chromium_missing())),
]
GREEN = (0x12, 0xAB, 0x34)
# the page's canvas, inside the component's shadow root
CANVAS = "document.querySelector('iron-remote-desktop').shadowRoot.querySelector('canvas')"
SHOTS = os.environ.get("RAS_PORTAL_SCREENSHOTS")  # docs/images: the picture for docs/portal.md


def _pixel_script(x: int, y: int) -> str:
    return (
        f"const c = {CANVAS}; if (!c || c.width < {x + 1}) return null;"
        f"return Array.from(c.getContext('2d').getImageData({x}, {y}, 1, 1).data.slice(0, 3));"
    )


def _near(got: list[int] | None, want: tuple[int, int, int]) -> bool:
    """The same colour, give or take the colour depth the session was sent in."""
    return got is not None and all(abs(a - b) <= 8 for a, b in zip(got, want, strict=True))


async def _canvas_point(browser: Chromium, x: int, y: int) -> tuple[float, float]:
    """Where the host's screen point (x, y) is on the page (the canvas shows it 1:1)."""
    rect = await browser.execute(f"const r = {CANVAS}.getBoundingClientRect(); return [r.x, r.y]")
    return rect[0] + x + 0.5, rect[1] + y + 0.5


def _paint_and_listen(display: str, out: IO[bytes]) -> subprocess.Popen[bytes]:
    """The host's screen green, and an xev window at 500,400 printing the keys it gets."""
    env = {**os.environ, "DISPLAY": display}
    colour = "#{:02x}{:02x}{:02x}".format(*GREEN)
    subprocess.run(["xsetroot", "-solid", colour], env=env, check=True)
    argv = ["xev", "-geometry", "200x150+500+400", "-event", "keyboard"]
    return subprocess.Popen(argv, env=env, stdout=out)


def _require_engine() -> None:
    """The npm packages ./dev installs; outside CI their absence skips, in CI it fails."""
    missing = [n for n, pkg in PACKAGES.items() if not (default_files_dir() / pkg / n).is_file()]
    if missing:
        skip_or_fail(
            f"the web client's npm packages are not installed ({missing[0]}): run ./dev test"
        )


# Every <style> of the page and of its components' shadow roots: [id, applied?]. A <style> the
# Content-Security-Policy blocks stays in the DOM with no style sheet.
_STYLES_SCRIPT = """
const styles = [...document.querySelectorAll('style')];
for (const el of document.querySelectorAll('*')) {
  if (el.shadowRoot) styles.push(...el.shadowRoot.querySelectorAll('style'));
}
return styles.map(s => [s.id, s.sheet !== null]);
"""


async def test_a_desktop_in_the_browser(tmp_path, nursery, caplog):
    require_peers(xrdp=False)
    _require_engine()
    caplog.set_level(logging.INFO, logger="ras.gateway")
    with (
        Xvfb(screen="800x600x24") as xvfb,
        ShadowServer(SHADOW_USER, SHADOW_PASSWORD, xvfb.display) as shadow,
        (tmp_path / "xev.out").open("wb") as keys,
    ):
        xev = _paint_and_listen(xvfb.display, keys)
        try:
            await _browser_session(tmp_path, nursery, caplog, shadow, tmp_path / "xev.out")
        finally:
            xev.kill()
            xev.wait()


async def _key(browser: Chromium, kind: str) -> None:
    await trio.to_thread.run_sync(
        lambda: browser.cdp(
            "Input.dispatchKeyEvent", type=kind, code="KeyQ", key="q",
            windowsVirtualKeyCode=81, nativeVirtualKeyCode=81,
        )
    )  # fmt: skip


async def _browser_session(tmp_path, nursery, caplog, shadow, xev_out: Path):
    hosts = [("host1", shadow.host, shadow.port)]
    async with farm(tmp_path, gateways=()) as f, Chromium(tmp_path) as browser:
        await add_agent(f, nursery, "host1", *hosts[0][1:], report_rdp_certificate=True)
        gw = await add_gateway(f, nursery, "gateway")
        await until(gw.registered.is_set)
        _, port = f.gateway_addrs["gateway"]["tls"]
        base = f"https://localhost:{port}"
        wanted = PortalSettings(
            launch_method=LaunchMethod.BROWSER, allow_user_select=False, open_in_new_tab=False
        )
        await trio.to_thread.run_sync(f.store.put_object, wanted)
        await f.broker.links.push_portal()
        await until(lambda: gw.portal is not None and gw.portal.settings == wanted)
        # the agent read the host's certificate: the web launch token will pin it
        await until(lambda: bool(f.broker.hosts.hosts["host1"].rdp_cert_sha256))

        await browser.get(f"{base}/login")
        await browser.type("#username", USER)
        await browser.type("#password", PASSWORD)
        await browser.click("#login-form button[type=submit]", navigates=True)
        launch = ".resource[data-id=desktop] button[data-method=browser]"
        await browser.click(launch, navigates=True)
        await browser.wait_for("#webclient[data-state=ready]", timeout_s=60)
        await browser.execute("document.getElementById('rdp-user').value = ''")
        await browser.type("#rdp-user", SHADOW_USER)
        await browser.type("#rdp-password", SHADOW_PASSWORD)
        await browser.click("#rdp-connect")
        await browser.wait_for("#webclient[data-state=connected]", timeout_s=60)
        # the RDP engine's own styles (the canvas fills its frame) are not blocked by the CSP
        styles = await browser.execute(_STYLES_SCRIPT)
        assert styles, "the RDP engine injected no <style>"
        assert all(applied for _, applied in styles), styles
        assert len(gw.tunnels) == 1
        (tunnel,) = gw.tunnels
        assert (tunnel.info.via, tunnel.info.user) == ("web", USER)
        assert tunnel.info.target == (shadow.host, shadow.port)
        kinds = {s.kind for s in f.broker.sessions.list() if s.user == USER}
        assert kinds == {"web"}

        # the host's green screen is painted in the page's canvas (frames come when they come)
        with trio.fail_after(60):
            while not _near(await browser.execute(_pixel_script(50, 50)), GREEN):  # noqa: ASYNC110
                await trio.sleep(0.2)
        if SHOTS:
            await browser.screenshot(Path(SHOTS) / "portal-webclient.png")

        # a click over the xev window (the pointer gives it the focus), then a key: scancode
        x, y = await _canvas_point(browser, 600, 470)
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await trio.to_thread.run_sync(
                lambda k=kind: browser.cdp(
                    "Input.dispatchMouseEvent", type=k, x=x, y=y, button="left", clickCount=1
                )
            )
        with trio.fail_after(60):
            while b"keysym 0x71, q" not in await trio.Path(xev_out).read_bytes():
                await _key(browser, "keyDown")
                await _key(browser, "keyUp")
                await trio.sleep(0.5)

        # closing the tab ends the tunnel, and its audit line says so
        await browser.close_tab()
        with trio.fail_after(60):
            await until(lambda: len(gw.tunnels) == 0)
        audits = [r.getMessage() for r in caplog.records if "tunnel closed" in r.getMessage()]
        assert any("via=web" in a and f"user={USER}" in a for a in audits), audits
