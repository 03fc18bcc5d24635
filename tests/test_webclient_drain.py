"""Web tunnels on real sockets: a drain and the idle timeout end them as any other tunnel.

A real in-process farm on loopback (farmkit): a broker, a gateway, an agent, and a stand-in RDP
host that answers the X.224 request with a confirm, does TLS with a farm certificate and
echoes. The browser is played in Python: it logs in to the User Portal over HTTPS and launches
the desktop in the browser (the page carries the web launch token), then opens the web
client's WebSocket on the gateway's TLS port and sends its RDCleanPath request. The tunnel's
sockets are real, so ending it from outside goes through ``Tunnel.shut`` (``shutdown`` on the
socket under WebSocket, TLS and the sniffer's prefix) and the idle timeout through the kernel's
``TCP_INFO`` of those sockets, as in production. (The endpoint's answers, refusals and limits
are tested over memory streams in tests/test_webclient.py; a real browser in
tests/test_webclient_browser.py.)
"""

from __future__ import annotations

import html
import logging
import re
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from farmkit import LOOPBACK, PASSWORD, USER, Farm, add_agent, add_gateway, farm
from webclientkit import CONFIRM, Browser, RdpHost, cleanpath_request

from ras.gateway.server import Gateway
from ras.pki import server_context


def _messages(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.INFO and r.getMessage().startswith(start)
    ]


async def _until_logged(caplog: pytest.LogCaptureFixture, start: str, count: int = 1) -> None:
    with trio.fail_after(30):  # a hang guard only
        while len(_messages(caplog, start)) < count:  # noqa: ASYNC110 (polling the log)
            await trio.sleep(0.02)


@asynccontextmanager
async def _farm(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[tuple[Farm, RdpHost]]:
    """A farm with no gateway yet and one RDP host (certified by the farm CA, which the
    gateway verifies the host under, the agent reporting no pin)."""
    async with farm(tmp_path, gateways=()) as f:
        cert, key = f.pki.ensure("rdp1", LOOPBACK)
        host = RdpHost(server_context(cert, key))
        listeners = await nursery.start(partial(trio.serve_tcp, host.serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        await add_agent(f, nursery, "host1", "127.0.0.1", port)
        yield f, host


class Portal:
    """A browser's HTTPS requests to a gateway's User Portal, one connection each, cookies
    kept."""

    def __init__(self, f: Farm, gateway: str) -> None:
        self.addr = f.gateway_addrs[gateway]["tls"]
        self.context = ssl.create_default_context(
            cafile=str(f.pki.directory / f"{gateway}-public.pem")
        )
        self.cookies: dict[str, str] = {}
        self.page = ""

    async def tls(self) -> trio.SSLStream[trio.SocketStream]:
        tcp = await trio.open_tcp_stream(*self.addr)
        return trio.SSLStream(tcp, self.context, server_hostname="localhost", https_compatible=True)

    async def request(self, method: str, path: str, form: dict[str, str] | None = None) -> int:
        body = urllib.parse.urlencode(form or {}).encode()
        head = f"{method} {path} HTTP/1.1\r\nhost: localhost\r\n"
        if self.cookies:
            head += "cookie: " + "; ".join(f"{k}={v}" for k, v in self.cookies.items()) + "\r\n"
        if form is not None:
            head += "content-type: application/x-www-form-urlencoded\r\n"
            head += f"content-length: {len(body)}\r\n"
        reply = bytearray()
        with trio.fail_after(30):  # a hang guard only
            async with await self.tls() as stream:
                await stream.send_all(head.encode() + b"\r\n" + body)
                while data := await stream.receive_some():
                    reply += data
        top, _, page = bytes(reply).partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        for line in lines[1:]:
            key, _, value = line.partition(":")
            if key.lower() == "set-cookie":
                name, _, rest = value.strip().partition("=")
                self.cookies[name] = rest.split(";", 1)[0]
        self.page = page.decode("utf-8", "replace")
        return int(lines[0].split()[1])

    def field(self, name: str) -> str:
        found = re.search(rf'name="{name}" value="([^"]*)"', self.page)
        assert found, f"no {name} in the page"
        return html.unescape(found.group(1))

    async def web_token(self, resource: str = "desktop") -> str:
        """Log in (once) and launch ``resource`` in the browser: the page's web launch token."""
        if "ras_portal" not in self.cookies:
            assert await self.request("GET", "/login") == 200
            login = {"csrf": self.field("csrf"), "username": USER, "password": PASSWORD}
            assert await self.request("POST", "/login", login) == 303
        assert await self.request("GET", "/resources") == 200
        assert 'data-method="browser"' in self.page
        launch = {"csrf": self.field("csrf"), "resource": resource, "method": "browser"}
        assert await self.request("POST", "/launch", launch) == 200
        found = re.search(r'data-token="([^"]+)"', self.page)
        assert found, "no token in the web client's page"
        return html.unescape(found.group(1))


async def _open_tunnel(portal: Portal) -> Browser:
    """A web tunnel: the launch token, the WebSocket, the RDCleanPath request and answer."""
    token = await portal.web_token()
    with trio.fail_after(30):  # a hang guard only
        browser = Browser(await portal.tls())
        await browser.open()
        await browser.send(cleanpath_request(token))
        answer = await browser.answer()
    assert answer.error is None
    assert answer.x224 == CONFIRM
    return browser


async def _ended(browser: Browser) -> bool:
    """Wait until the gateway ends the browser's WebSocket (its Close or the TCP end)."""
    with trio.fail_after(30):  # a hang guard only
        while await browser.receive():
            pass
    return True


async def _echo(browser: Browser, data: bytes) -> bytes:
    with trio.fail_after(30):  # a hang guard only
        return await browser.echo(data)


@pytest.mark.parametrize("ends", ["browser closes", "drain timeout"])
async def test_a_web_tunnel_runs_through_the_drain(tmp_path, nursery, caplog, ends):
    """stop(): the gateway leaves the broker and stops accepting, while an open web tunnel
    carries on until its tab closes or ``drain_timeout_s`` passes; then serve returns."""
    caplog.set_level(logging.INFO)
    async with _farm(tmp_path, nursery) as (f, host):
        drain_s = 60 if ends == "browser closes" else 1
        with trio.fail_after(60):  # a hang guard only
            async with trio.open_nursery() as serving:  # ends when the gateway's serve returns
                gw: Gateway = await add_gateway(f, serving, "gw", drain_timeout_s=drain_s)
                browser = await _open_tunnel(Portal(f, "gw"))
                assert await _echo(browser, b"before the drain") == b"before the drain"
                gw.stop()
                while f.broker.gateways["gw"].online:  # noqa: ASYNC110 (the broker's state)
                    await trio.sleep(0.02)
                with pytest.raises(OSError, match="connect"):
                    await trio.open_tcp_stream(*f.gateway_addrs["gw"]["tls"])
                assert await _echo(browser, b"during the drain") == b"during the drain"
                if ends == "browser closes":
                    await browser.close()
                assert await _ended(browser)
                await browser.stream.aclose()
    assert host.received == b"before the drain" + b"during the drain"
    assert _messages(caplog, "draining name=gw tunnels=1 ")
    assert _messages(caplog, "stopped name=gw")
    (audit,) = _messages(caplog, "tunnel closed ")
    assert f"user={USER} resource=desktop client=127.0.0.1:" in audit
    assert " gateway=gw path=gw via=web tls=True " in audit
    assert " bytes_up=32 bytes_down=32 " in audit
    if ends == "drain timeout":
        assert audit.endswith("ended_by=drain timeout")
    else:
        assert "ended_by" not in audit


async def test_an_idle_web_tunnel_is_closed_and_a_busy_one_is_not(tmp_path, nursery, caplog):
    caplog.set_level(logging.INFO)
    async with _farm(tmp_path, nursery) as (f, _host):
        gw = await add_gateway(f, nursery, "gw", tunnel_idle_timeout_s=2)
        portal = Portal(f, "gw")
        silent = await _open_tunnel(portal)
        busy = await _open_tunnel(portal)
        assert len(gw.tunnels) == 2

        async def keep_sending(done: trio.Event) -> None:
            while not done.is_set():
                assert await _echo(busy, b"typing") == b"typing"
                await trio.sleep(0.1)  # the user's pace, not a synchronisation

        done = trio.Event()
        async with trio.open_nursery() as typing:
            typing.start_soon(keep_sending, done)
            assert await _ended(silent)  # silence: the gateway ends that tunnel ...
            done.set()
        # ... in the same sweep that found the busy one recently active: it carries on
        assert await _echo(busy, b"still there") == b"still there"
        assert len(gw.tunnels) == 1
        await busy.close()
        assert await _ended(busy)
        await silent.stream.aclose()
        await busy.stream.aclose()
        await _until_logged(caplog, "tunnel closed ", 2)
    (idle,) = _messages(caplog, "tunnel idle ")
    assert " via=web " in idle
    idled, closed = _messages(caplog, "tunnel closed ")
    assert " via=web " in idled
    assert idled.endswith("ended_by=idle timeout")
    assert " via=web " in closed
    assert "ended_by" not in closed
