"""The web client's endpoint (``ras.gateway.webclient``) over memory streams under the autojump
clock: a real gateway and a real broker on a memory network, a browser played with wsproto,
a stand-in RDP host that answers the X.224 request and does TLS with its own certificate, and
decoys that must never be dialled.

What a browser would notice: the RDCleanPath answer (the host's confirm and certificate, or an
error with its HTTP status or TLS alert) and whether its bytes reach the host; what an
operator would notice: the gateway's open tunnels and who was dialled."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import ssl
import time

import pytest
import trio
from farmkit import PASSWORD, USER
from memkit import MemoryFarm, memory_farm, reply_to
from webclientkit import CONFIRM, WS_HEADERS, X224, Browser, RdpHost, cleanpath_request
from wsproto.events import TextMessage

from ras.gateway.front import Conn, Port
from ras.gateway.server import Gateway
from ras.gateway.webclient import WEBSOCKET_PATH
from ras.pki import server_context
from ras.portal.server import Upgrade
from ras.protocol import (
    AgentRegister,
    Authenticate,
    AuthOk,
    HostKind,
    Launch,
    LaunchOk,
    LoadReport,
    Mode,
    Registered,
    Role,
)

pytestmark = pytest.mark.usefixtures("inline_threads")
BROWSER = "192.0.2.7"
HOST = ("rdp1.test", 3389)
DECOY = ("decoy.test", 3389)


@contextlib.asynccontextmanager
async def _farm(tmp_path, nursery, *, pin: str | None = None, **options: object):  # type: ignore[no-untyped-def]
    async with memory_farm(tmp_path, nursery, **options) as mf:
        cert, key = mf.pki.ensure_self_signed("rdp1", ("rdp1.test",))
        host = RdpHost(server_context(cert, key))
        der = ssl.PEM_cert_to_DER_cert(cert.read_text())
        mf.net.listen(HOST, host.serve)
        decoy = RdpHost(server_context(cert, key))
        mf.net.listen(DECOY, decoy.serve)
        agent = await mf.dial_broker("host1", Role.AGENT, port=20003)
        reported = hashlib.sha256(der).hexdigest() if pin is None else pin
        reply = await agent.request(
            AgentRegister("host1", HostKind.RDSH, *HOST, 10, rdp_cert_sha256=reported)
        )
        assert isinstance(reply, Registered)
        await agent.send(LoadReport(1.0, 10.0, 0, 0))
        gw = mf.gateway()
        yield mf, gw, host, decoy, der


async def _token(mf: MemoryFarm, *, client: str = BROWSER, mode: Mode = Mode.WEB) -> str:
    """What the portal does for a browser at ``client``: log in, launch in mode web."""
    async with mf.session("gateway", client) as chan:
        assert isinstance(await reply_to(chan, Authenticate(USER, PASSWORD)), AuthOk)
        launched = await reply_to(chan, Launch("desktop", mode))
    assert isinstance(launched, LaunchOk)
    return launched.ticket


async def _connect(
    gw: Gateway, nursery: trio.Nursery, request: bytes, *, client: str = BROWSER
) -> Browser:
    """A browser at ``client`` opens the WebSocket and sends ``request``."""
    mine, theirs = trio.testing.memory_stream_pair()
    now = trio.current_time()
    conn = Conn(Port.TLS, (client, 50000), (client, 50000), now + 60, now + 10, set(), tls=True)

    async def serve() -> None:  # as the gateway's listener does: the stream closed after
        assert gw.web is not None
        try:
            await gw.web.serve(theirs, Upgrade(WEBSOCKET_PATH, WS_HEADERS, b""), conn)
        finally:
            await theirs.aclose()

    nursery.start_soon(serve)
    browser = Browser(mine)
    await browser.start()
    await browser.send(request)
    return browser


async def test_a_token_opens_its_host_and_the_bytes_flow(tmp_path, nursery, autojump_clock):
    async with _farm(tmp_path, nursery) as (mf, gw, host, decoy, der):
        token = await _token(mf)
        # the destination the browser names is ignored: only the token's host is dialled
        browser = await _connect(gw, nursery, cleanpath_request(token, "decoy.test:3389"))
        answer = await browser.answer()
        assert answer.error is None
        assert (answer.x224, answer.cert_chain, answer.server_addr) == (CONFIRM, (der,), HOST[0])
        assert host.requests == [X224]  # forwarded unchanged
        # the browser's TLS client speaks through the gateway's TLS to the host: here, bytes
        await browser.send(b"rdp bytes")
        assert await browser.receive() == b"rdp bytes"
        (tunnel,) = gw.tunnels
        assert (tunnel.info.via, tunnel.info.user, tunnel.info.target) == ("web", USER, HOST)
        assert decoy.connections == 0
        await browser.close()  # the tab closed: the tunnel ends
        with trio.fail_after(30):
            while len(gw.tunnels):  # noqa: ASYNC110
                await trio.sleep(0.1)
        (session,) = mf.broker.sessions.list()
        assert session.kind == "web"


def _edited(token: str) -> str:
    """The token with its claims naming the decoy (the signature left as it was)."""
    prefix, body, mac = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["host"] = DECOY[0]
    raw = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{prefix}.{raw}.{mac}"


async def test_a_text_message_in_the_tunnel_ends_it_not_the_gateway(
    tmp_path, nursery, autojump_clock, caplog
):
    """A browser breaking the WebSocket's rules inside the tunnel (a text message: binary only)
    gets a Close; its tunnel ends with its audit line, and the gateway carries on."""
    caplog.set_level(logging.INFO, logger="ras.gateway")
    async with _farm(tmp_path, nursery) as (mf, gw, host, _, _):
        browser = await _connect(gw, nursery, cleanpath_request(await _token(mf)))
        assert (await browser.answer()).error is None
        await browser.send(b"rdp bytes")
        assert await browser.receive() == b"rdp bytes"
        await browser.stream.send_all(browser.ws.send(TextMessage(data="not RDP")))
        with trio.fail_after(30):
            assert await browser.receive() == b""
            while len(gw.tunnels):  # noqa: ASYNC110
                await trio.sleep(0.1)
        assert browser.closed
        (audit,) = [m for m in caplog.messages if m.startswith("tunnel closed ")]
        assert " via=web " in audit
        assert " bytes_up=9 bytes_down=9 " in audit
        # the gateway still serves the next browser
        again = await _connect(gw, nursery, cleanpath_request(await _token(mf)))
        assert (await again.answer()).error is None
        assert host.connections == 2


@pytest.mark.parametrize("case", ["replayed", "edited", "expired", "other address", "native"])
async def test_a_bad_token_reaches_nothing(tmp_path, nursery, autojump_clock, case):
    async with _farm(tmp_path, nursery, ticket_ttl_s=30.0) as (mf, gw, host, decoy, _):
        token = await _token(mf, mode=Mode.GATEWAY if case == "native" else Mode.WEB)
        client = BROWSER
        if case == "replayed":
            first = await _connect(gw, nursery, cleanpath_request(token))
            assert (await first.answer()).error is None
            await first.close()
        elif case == "edited":
            token = _edited(token)
        elif case == "expired":  # genuine, signed by the broker, but its time is over
            claims = mf.broker.launches.web_tickets.verify(token, now=time.time())
            token, _ = mf.broker.launches.web_tickets.issue(
                user=claims.user, resource=claims.resource, host=claims.host, port=claims.port,
                gateway=claims.gateway, client=claims.client, now=time.time() - 60, ttl_s=30,
            )  # fmt: skip
        elif case == "other address":
            client = "198.51.100.9"
        before = host.connections
        browser = await _connect(gw, nursery, cleanpath_request(token), client=client)
        answer = await browser.answer()
        assert answer.error is not None
        assert answer.error.http_status == 403
        assert await browser.receive() == b""  # and the WebSocket is closed
        assert (host.connections - before, decoy.connections) == (0, 0)
        assert DECOY not in mf.net.dialled


async def test_a_host_with_another_certificate_is_refused(tmp_path, nursery, autojump_clock):
    async with _farm(tmp_path, nursery, pin="0" * 64) as (mf, gw, host, _, _):
        browser = await _connect(gw, nursery, cleanpath_request(await _token(mf)))
        answer = await browser.answer()
        assert answer.error is not None
        assert answer.error.tls_alert == 42  # bad certificate
        assert len(gw.tunnels) == 0
        assert host.received == b""  # nothing of the browser's reached it


async def test_not_a_request_is_a_badcleanpath_request(tmp_path, nursery, autojump_clock):
    async with _farm(tmp_path, nursery) as (_mf, gw, host, _, _):
        browser = await _connect(gw, nursery, b"\x30\x03\x02\x01\x00")  # not version 3390
        answer = await browser.answer()
        assert answer.error is not None
        assert answer.error.http_status == 400
        assert host.connections == 0


async def test_a_silent_browser_loses_the_connection_at_the_deadline(
    tmp_path, nursery, autojump_clock
):
    async with _farm(tmp_path, nursery) as (_, gw, host, _, _):
        browser = await _connect(gw, nursery, b"\x30")  # the start of a request, then nothing
        with trio.fail_after(120):
            assert await browser.receive() == b""
        assert host.connections == 0


async def test_a_user_has_at_most_max_web_tunnels_per_user(tmp_path, nursery, autojump_clock):
    async with _farm(tmp_path, nursery) as (mf, _, host, _, _):
        gw = mf.gateway("gateway", max_web_tunnels_per_user=1)  # the same name: replaces it
        first = await _connect(gw, nursery, cleanpath_request(await _token(mf)))
        assert (await first.answer()).error is None
        second = await _connect(gw, nursery, cleanpath_request(await _token(mf)))
        answer = await second.answer()
        assert answer.error is not None
        assert answer.error.http_status == 429
        assert (len(gw.tunnels), host.connections) == (1, 1)


async def test_the_engine_s_injected_style_is_allowed_by_its_hash(tmp_path, nursery):
    """The page's CSP names the hash of each <style> the RDP engine's compiled components
    inject (read from the installed file), and nothing when the file is not there."""
    engine = tmp_path / "engine" / "iron-remote-desktop"
    engine.mkdir(parents=True)
    css = ".screen.svelte-abc1 {position:relative;}canvas.svelte-abc1 {width:100%;}"
    (engine / "iron-remote-desktop.js").write_text(
        f'const x = {{\n  hash: "svelte-abc1",\n  code: {json.dumps(css)}\n}};\n'
        'const y = { hash: "svelte-zz9", code: "a { b: \\x41 }" };\n'  # not JSON: left out
    )
    digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
    async with memory_farm(tmp_path, nursery) as mf:
        gw = mf.gateway(web_client_dir=tmp_path / "engine")
        assert gw.web is not None
        assert gw.web.styles() == (f"'sha256-{digest}'",)
        bare = mf.gateway("bare", web_client_dir=tmp_path / "nothing")
        assert bare.web is not None
        assert bare.web.styles() == ()
