"""The web client's endpoint: RDP for a browser, RDCleanPath over a WebSocket on the TLS port.

Theory of operation. The User Portal's browser launch (``ras.portal.weblaunch``) asks the
broker for a web launch token (``launch`` with mode ``web``: single-use, short-lived, bound
to the user, the resource, the host:port, the gateway, the browser's address and an expiry)
and puts it in the page. The page's RDP engine (IronRDP's, from npm) opens a WebSocket to
``WEBSOCKET_PATH`` and sends one RDCleanPath request (``ras.protocol.rdcleanpath``) carrying
the token and the X.224 Connection Request it built. Here:

1. The upgrade is answered and the request read within the connection's pre-authentication
   deadline (absolute from the accept, as for every connection of the gateway).
2. The token is redeemed at the broker (``redeem_ticket`` with ``web``), naming the browser's
   address: a token replayed, edited, expired, issued to another address or through another
   gateway is refused there (403), and nothing is dialled. The request's ``destination`` is
   the browser's and is ignored: the only host this connects to is the one the token names.
3. The host is dialled, the X.224 request forwarded unchanged, the host's Connection Confirm
   read, and the TLS handshake done as the host's client: its certificate must be the one the
   host's agent reported (the token's pin), or, when the broker has none, verify under the
   farm CA (``ca_file``); anything else is refused (a TLS alert in the answer).
4. The answer carries the confirm and the host's certificate (CredSSP in the browser binds to
   it); errors are RDCleanPath error answers with an HTTP status, as IronRDP shows them.
5. From then on, WebSocket binary messages <-> the TLS stream to the host, registered in the
   gateway's tunnels (``via=web``): idle timeout, drain and the one audit line as for every
   tunnel. A closed tab closes the WebSocket (or its TCP connection): the tunnel ends. A user
   has at most ``max_web_tunnels_per_user`` at once (a tab navigated away may keep its
   WebSocket until it closes).

NLA (CredSSP) runs in the browser: the password never reaches the gateway. The gateway sees
the RDP traffic after the login in clear (it holds the TLS to the host), hence step 3.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import mimetypes
import re
import ssl
from collections.abc import Callable
from pathlib import Path

import trio

from ras.errors import PeerError, RemoteProtocolError, TransportError
from ras.gateway.config import GatewayConfig
from ras.gateway.front import Conn
from ras.gateway.link import BrokerClient
from ras.gateway.tunnels import TunnelInfo, Tunnels, Via
from ras.net.channel import aclose_quietly
from ras.net.rdptls import certificate_sha256, rdp_tls, unverified_context
from ras.net.tls import Connect, connect_tcp
from ras.net.websocket import WebSocketStream, accept, upgrade_problem
from ras.pki import client_context
from ras.portal.server import Upgrade
from ras.portal.web import Response
from ras.protocol import TicketOk
from ras.protocol.rdcleanpath import CleanPathPdu, encode_pdu, parse_pdu

__all__ = ["PACKAGES", "WEBSOCKET_PATH", "WebClient", "default_files_dir"]

log = logging.getLogger("ras.gateway")
WEBSOCKET_PATH = "/webclient/connect"
# The npm packages' files the gateway serves under /webclient/ (web/package.json pins them).
PACKAGES = {
    "iron-remote-desktop.js": "iron-remote-desktop",
    "iron-remote-desktop-rdp.js": "iron-remote-desktop-rdp",
}
# A component's stylesheet in the engine's compiled (Svelte) code: the <style> it injects holds
# this JavaScript string, which the page's Content-Security-Policy allows by its hash.
_COMPONENT_CSS = re.compile(rb'hash:\s*"svelte-[0-9a-z]+",\s*code:\s*("(?:[^"\\\n]|\\.)*")')
_BAD_CERTIFICATE = 42  # TLS alert: the host's certificate is not the one expected
_READ = 16384


def default_files_dir() -> Path:
    """Where ``./dev`` installs the npm packages in a checkout: web/node_modules/@devolutions."""
    return Path(__file__).resolve().parents[2] / "web" / "node_modules" / "@devolutions"


class WebClient:
    """The web client's endpoint and files of one gateway."""

    def __init__(
        self,
        config: GatewayConfig,
        broker: BrokerClient,
        tunnels: Tunnels,
        *,
        connect: Connect = connect_tcp,
        host_context: Callable[[TicketOk], ssl.SSLContext] | None = None,
    ) -> None:
        self.config = config
        self._broker = broker
        self._tunnels = tunnels
        self._dial = connect
        self._files = config.web_client_dir or default_files_dir()
        self._host_context = host_context or self._context
        self._ca_context: ssl.SSLContext | None = None
        self._styles: tuple[str, ...] | None = None

    # -- the files --------------------------------------------------------------------------

    def files(self, name: str) -> Response:
        """GET /webclient/NAME: the RDP engine's files (404 for anything else, or if ``./dev``
        has not installed them)."""
        package = PACKAGES.get(name)
        path = self._files / package / name if package else None
        if path is None or not path.is_file():
            return Response(404, b"Not found\n", "text/plain; charset=utf-8")
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if kind in ("text/javascript", "application/javascript"):
            kind = "text/javascript; charset=utf-8"
        return Response(200, path.read_bytes(), kind)

    def styles(self) -> tuple[str, ...]:
        """The CSP sources (``'sha256-...'``) of the ``<style>`` elements the RDP engine
        injects, read from its installed file once (none if it is not installed)."""
        if self._styles is None:
            path = self._files / PACKAGES["iron-remote-desktop.js"] / "iron-remote-desktop.js"
            try:
                code = path.read_bytes()
            except OSError:
                return ()
            hashes = (_csp_hash(m.group(1)) for m in _COMPONENT_CSS.finditer(code))
            self._styles = tuple(h for h in hashes if h)
        return self._styles

    # -- the endpoint -----------------------------------------------------------------------

    async def serve(self, stream: trio.abc.Stream, upgrade: Upgrade, conn: Conn) -> None:
        """One WebSocket upgrade on the TLS port (the portal's parser read the request)."""
        peer = conn.client
        problem = upgrade_problem(upgrade.headers)
        if upgrade.path != WEBSOCKET_PATH or problem is not None:
            log.info(
                "web client refused client=%s:%d path=%s reason=%s",
                *peer,
                upgrade.path[:64],
                problem or "no such WebSocket",
            )
            with contextlib.suppress(TransportError, trio.BrokenResourceError):
                await stream.send_all(
                    b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
                )
            return
        try:
            with trio.fail_at(conn.deadline):
                ws = await accept(stream, upgrade.headers, upgrade.trailing)
                request = await _read_request(ws)
        except trio.TooSlowError:
            log.info("pre-auth deadline client=%s:%d phase=web client request: closing", *peer)
            return
        except RemoteProtocolError as exc:
            log.info("web client refused client=%s:%d reason=%s", *peer, exc)
            await _answer(ws, CleanPathPdu.http_error(400))
            return
        except TransportError as exc:
            log.info("web client ended client=%s:%d reason=%s", *peer, exc)
            return
        if request is None:
            return
        await self._connect(ws, request, conn)

    async def _connect(self, ws: WebSocketStream, request: CleanPathPdu, conn: Conn) -> None:
        cfg = self.config
        peer = conn.client
        assert request.proxy_auth is not None
        assert request.x224 is not None
        try:
            with trio.fail_after(cfg.broker_timeout_s):
                granted = await self._broker.redeem(request.proxy_auth, peer, web=True)
        except PeerError as exc:  # the broker refused the token (it logs why)
            log.warning("web client refused client=%s:%d reason=%s", *peer, exc.error.message)
            await _answer(ws, CleanPathPdu.http_error(403))
            return
        except (TransportError, trio.TooSlowError) as exc:
            log.warning("broker unavailable client=%s:%d reason=%s", *peer, exc or "timeout")
            await _answer(ws, CleanPathPdu.http_error(503))
            return
        open_now = sum(
            1 for t in self._tunnels if t.info.via is Via.WEB and t.info.user == granted.user
        )
        if open_now >= cfg.max_web_tunnels_per_user:
            log.warning(
                "web client refused user=%s client=%s:%d reason=limit: %d web tunnels open",
                granted.user,
                *peer,
                open_now,
            )
            await _answer(ws, CleanPathPdu.http_error(429))
            return
        target = (granted.host, granted.port)
        host: trio.abc.Stream | None = None
        try:
            with trio.fail_after(cfg.connect_timeout_s):
                host = await self._dial(*target)
                confirm, tls = await rdp_tls(host, request.x224, self._host_context(granted))
                if tls is None:
                    log.warning(
                        "web client: the host refused the negotiation user=%s rdp=%s:%d",
                        granted.user,
                        *target,
                    )
                    await _answer(ws, CleanPathPdu.negotiation_error(confirm.data))
                    await aclose_quietly(host)
                    return
                host = tls
                pin = certificate_sha256(tls)
                if granted.cert_sha256 and pin != granted.cert_sha256:
                    raise _Mismatch(pin)
        except _Mismatch as exc:
            log.warning(
                "web client refused user=%s rdp=%s:%d reason=the host's certificate sha256=%s "
                "is not the one its agent reported",
                granted.user,
                *target,
                exc,
            )
            await _answer(ws, CleanPathPdu.tls_error(_BAD_CERTIFICATE))
            if host is not None:
                await aclose_quietly(host)
            return
        except (TransportError, RemoteProtocolError, trio.TooSlowError) as exc:
            log.warning(
                "tunnel failed user=%s client=%s:%d rdp=%s:%d via=web reason=%s",
                granted.user,
                *peer,
                *target,
                exc or "connect timeout",
            )
            await _answer(ws, CleanPathPdu.http_error(502))
            if host is not None:
                await aclose_quietly(host)
            return
        chain = (tls.getpeercert(binary_form=True) or b"",)
        try:
            await ws.send_all(encode_pdu(CleanPathPdu.response(target[0], confirm.data, chain)))
        except BaseException:
            await aclose_quietly(tls)
            raise
        conn.tunnelled()  # a redeemed token authenticates the connection; a drain lets it run
        info = TunnelInfo(
            via=Via.WEB,
            client=peer,
            target=target,
            gateway=cfg.name,
            path=(*conn.path, cfg.name),
            tls=True,
            user=granted.user,
            resource=granted.resource,
        )
        await self._tunnels.run(info, ws, tls)

    def _context(self, granted: TicketOk) -> ssl.SSLContext:
        """Pinned (the agent reported the certificate): any certificate, checked after the
        handshake; otherwise the farm CA's."""
        if granted.cert_sha256:
            return unverified_context()
        if self._ca_context is None:
            assert self.config.ca_file is not None  # a normal gateway has the farm CA
            # RDP hosts are named by address: the chain is verified, not the name
            self._ca_context = client_context(self.config.ca_file, check_hostname=False)
        return self._ca_context


class _Mismatch(Exception):
    pass


async def _read_request(ws: WebSocketStream) -> CleanPathPdu | None:
    """The browser's RDCleanPath request (None: it closed first)."""
    data = b""
    while True:
        chunk = await ws.receive_some(_READ)
        if not chunk:
            return None
        data += chunk
        got = parse_pdu(data)
        if got is None:
            continue
        pdu, length = got
        if length != len(data) or not pdu.is_request:
            raise RemoteProtocolError("not an RDCleanPath request (or bytes after it)")
        return pdu


async def _answer(ws: WebSocketStream, pdu: CleanPathPdu) -> None:
    """An error answer, then the WebSocket closed."""
    with contextlib.suppress(TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
        with trio.move_on_after(5):
            await ws.send_all(encode_pdu(pdu))
    await aclose_quietly(ws)


def _csp_hash(literal: bytes) -> str:
    """``'sha256-...'`` of the text a JavaScript string literal stands for ("" for one with
    escapes JSON does not have: that style stays blocked, as before)."""
    try:
        text = json.loads(literal)
    except ValueError:
        return ""
    digest = hashlib.sha256(text.encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"
