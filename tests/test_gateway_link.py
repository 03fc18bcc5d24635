"""What the broker pushes to its gateways over the link: ACME HTTP-01 tokens answered on the
plain port (never on the TLS port), and a new public certificate that new TLS connections get
while open tunnels carry on. And the TLS port refuses old TLS.

Each test runs a real in-process farm on loopback; the broker's ``links`` is what an ACME
client or an administrator's import would call.
"""

from __future__ import annotations

import ssl
import warnings

import trio
from farmkit import PASSWORD, USER, Listener, add_gateway, farm

from ras.client.session import ClientSession
from ras.pki import FarmPKI
from ras.protocol import Mode

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEY_AUTHORIZATION = f"{TOKEN}.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


async def _http(addr: tuple[str, int], request: bytes, *, ctx: ssl.SSLContext | None = None):
    stream: trio.abc.Stream = await trio.open_tcp_stream(*addr)
    if ctx is not None:
        stream = trio.SSLStream(stream, ctx, server_hostname="localhost", https_compatible=True)
    async with stream:
        await stream.send_all(request)
        reply = bytearray()
        with trio.fail_after(10):
            while data := await stream.receive_some():
                reply += data
    head, _, body = bytes(reply).partition(b"\r\n\r\n")
    return head.decode(), body


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gw.example.com\r\n\r\n".encode()


async def _until(predicate, what: str) -> None:
    with trio.fail_after(20):
        while not predicate():  # noqa: ASYNC110 (polling another task's state)
            await trio.sleep(0.02)


async def test_acme_http_01_tokens_from_the_broker(tmp_path, nursery):
    async with farm(tmp_path) as f:
        gw = f.gateways["gateway"]
        plain = f.gateway_addrs["gateway"]["plain"]
        await _until(gw.registered.is_set, "registered")
        await f.broker.links.publish_acme(TOKEN, KEY_AUTHORIZATION)
        await _until(lambda: TOKEN in gw.challenges, "token pushed")

        head, body = await _http(plain, _get(f"/.well-known/acme-challenge/{TOKEN}"))
        assert head.startswith("HTTP/1.1 200"), head
        assert body == KEY_AUTHORIZATION.encode()
        head, _ = await _http(plain, _get("/.well-known/acme-challenge/unknown-token"))
        assert head.startswith("HTTP/1.1 404")
        head, _ = await _http(plain, _get("/anything/else"))  # still the redirect
        assert head.startswith("HTTP/1.1 301")

        # never from the TLS port
        ctx = ssl.create_default_context(cafile=str(f.pki.directory / "gateway-public.pem"))
        tls = f.gateway_addrs["gateway"]["tls"]
        head, body = await _http(tls, _get(f"/.well-known/acme-challenge/{TOKEN}"), ctx=ctx)
        assert head.startswith("HTTP/1.1 404")
        assert KEY_AUTHORIZATION.encode() not in body

        # a gateway that registers later gets the tokens in force
        late = await add_gateway(f, nursery, "late")
        await _until(lambda: TOKEN in late.challenges, "token pushed to the late gateway")
        head, body = await _http(
            f.gateway_addrs["late"]["plain"], _get(f"/.well-known/acme-challenge/{TOKEN}")
        )
        assert body == KEY_AUTHORIZATION.encode()

        # withdrawn: answered no more
        await f.broker.links.withdraw_acme(TOKEN)
        await _until(lambda: TOKEN not in gw.challenges, "token withdrawn")
        head, _ = await _http(plain, _get(f"/.well-known/acme-challenge/{TOKEN}"))
        assert head.startswith("HTTP/1.1 404")


async def test_a_token_handed_out_for_a_name_is_a_404_under_any_other_name(tmp_path):
    async with farm(tmp_path) as f:
        gw = f.gateways["gateway"]
        plain = f.gateway_addrs["gateway"]["plain"]
        await _until(gw.registered.is_set, "registered")
        await f.broker.links.publish_acme(TOKEN, KEY_AUTHORIZATION, "gw.example.com")
        await _until(lambda: TOKEN in gw.challenges, "token pushed")
        path = f"/.well-known/acme-challenge/{TOKEN}"
        for host, status in [
            ("gw.example.com", 200),
            ("GW.Example.COM:80", 200),  # case and port do not matter (pebble sends the port)
            ("gw.example.com.", 200),
            ("other.example.com", 404),
            ("gw.example.com.evil.test", 404),
            ("10.0.0.1", 404),
        ]:
            request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            head, body = await _http(plain, request)
            assert head.startswith(f"HTTP/1.1 {status}"), (host, head)
            assert (body == KEY_AUTHORIZATION.encode()) is (status == 200)


async def _peer_cert(addr: tuple[str, int], ca: str) -> bytes:
    ctx = ssl.create_default_context(cafile=ca)
    stream = trio.SSLStream(await trio.open_tcp_stream(*addr), ctx, server_hostname="localhost")
    async with stream:
        await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
    assert der is not None
    return der


async def _served_with(addr: tuple[str, int], ca: str) -> bytes:
    """The certificate served once a handshake verifies against ``ca`` (the files are written
    before the gateway's TLS context is swapped: a handshake in between still gets the old)."""
    with trio.fail_after(20):
        while True:
            try:
                return await _peer_cert(addr, ca)
            except trio.BrokenResourceError:
                await trio.sleep(0.02)


async def test_a_new_certificate_from_the_broker_without_dropping_tunnels(tmp_path, nursery):
    host = Listener()
    await nursery.start(host.serve)
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        gw = f.gateways["gateway"]
        tls = f.gateway_addrs["gateway"]["tls"]
        old_ca = tmp_path / "old-ca.pem"
        old_ca.write_bytes((f.pki.directory / "gateway-public.pem").read_bytes())
        before = await _peer_cert(tls, str(old_ca))

        cfg = f.client_config(mode=Mode.GATEWAY_SSL)
        async with await ClientSession.connect(cfg) as session:
            await session.authenticate(USER, PASSWORD)
            tunnel = await session.open_tunnel((await session.launch("desktop")).ticket)

        # a new certificate (as an ACME renewal would give) for the same names
        other = FarmPKI(tmp_path / "other")
        cert_path, key_path = other.ensure_self_signed("public", ("localhost", "127.0.0.1"))
        await _until(gw.registered.is_set, "registered")
        await f.broker.links.distribute_certificate(cert_path.read_text(), key_path.read_text())
        await _until(
            lambda: gw.config.public_cert_file.read_text() == cert_path.read_text(),  # type: ignore[union-attr]
            "installed",
        )
        after = await _served_with(tls, str(cert_path))
        assert after != before
        # the open tunnel, on the old TLS session, still carries bytes both ways
        with trio.fail_after(10):
            await tunnel.send_all(b"still here")
            got = b""
            while len(got) < 10:
                got += await tunnel.receive_some()
        assert got == b"still here"
        await tunnel.aclose()

        # a pair that does not match is refused and the current certificate kept
        _, wrong_key = other.ensure_self_signed("unrelated", ("localhost",))
        assert not await gw.install_certificate(cert_path.read_text(), wrong_key.read_text())
        assert await _peer_cert(tls, str(cert_path)) == after


async def test_the_tls_port_refuses_tls_1_1_and_cbc_ciphers(tmp_path):
    async with farm(tmp_path) as f:
        tls = f.gateway_addrs["gateway"]["tls"]
        ca = str(f.pki.directory / "gateway-public.pem")
        for version, ciphers in (
            (ssl.TLSVersion.TLSv1_1, "DEFAULT:@SECLEVEL=0"),
            (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA"),
        ):
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(ca)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx.minimum_version = ctx.maximum_version = version
            ctx.set_ciphers(ciphers)
            stream = trio.SSLStream(
                await trio.open_tcp_stream(*tls), ctx, server_hostname="localhost"
            )
            refused = False
            with trio.fail_after(10):
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError:
                    refused = True
            await stream.aclose()
            assert refused, version
        # and a modern client is served
        assert await _peer_cert(tls, ca)


async def test_a_gateway_with_two_workers_stays_online_and_both_get_the_pushes(tmp_path, nursery):
    """``workers = 2`` gives two links under one certificate name: both get the ACME tokens,
    and the gateway stays online for the broker (and the HALB's list) while either is up."""

    async def worker(f, *, task_status=trio.TASK_STATUS_IGNORED):
        async with trio.open_nursery() as own:
            task_status.started((await add_gateway(f, own, "twin"), own.cancel_scope))
            await trio.sleep_forever()

    async with farm(tmp_path) as f:
        one, stop_one = await nursery.start(worker, f)
        two, stop_two = await nursery.start(worker, f)
        await _until(lambda: one.registered.is_set() and two.registered.is_set(), "registered")
        await _until(lambda: f.broker.gateways["twin"].links == 2, "two links")
        await f.broker.links.publish_acme(TOKEN, KEY_AUTHORIZATION)
        await _until(lambda: TOKEN in one.challenges and TOKEN in two.challenges, "both pushed")

        stop_two.cancel()  # one worker stops
        await _until(lambda: f.broker.gateways["twin"].links == 1, "one link left")
        assert f.broker.gateways["twin"].online
        stop_one.cancel()
        await _until(lambda: not f.broker.gateways["twin"].online, "offline with no link")


async def test_the_link_pings_as_often_as_the_broker_asks(tmp_path):
    """A broker that drops daemons silent for 3 s and asks for word every 0.5 s keeps a
    gateway whose own ping interval (link_ping_interval_s, 5 s) is longer: the gateway pings
    at the broker's pace, so its link stays up (it was dropped and re-registered every few
    seconds: an INFO line flood in the lab's broker and gateway logs)."""
    async with farm(tmp_path, report_interval_s=0.5, host_timeout_s=3.0) as f:
        gw = f.gateways["gateway"]
        await _until(gw.registered.is_set, "registered")
        registered = gw.registered
        await trio.sleep(7)  # past a 5 s ping and the broker's 3 s timeout
        assert gw.registered is registered  # never down (a new event each time it goes down)
        assert f.broker.gateways["gateway"].links == 1
