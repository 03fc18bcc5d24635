"""HTTP on the gateway's ports: the plain port sends browsers to HTTPS; the TLS port serves the
User Portal (its pages: tests/test_portal.py). Neither touches the RDP hosts."""

from __future__ import annotations

import ssl

import trio
from farmkit import farm


async def _http(stream: trio.abc.Stream, request: bytes) -> bytes:
    await stream.send_all(request)
    reply = bytearray()
    with trio.fail_after(10):
        while data := await stream.receive_some():
            reply += data
    return bytes(reply)


async def test_plain_http_is_redirected_to_https(tmp_path):
    async with farm(tmp_path) as f:
        host, port = f.gateway_addrs["gateway"]["plain"]
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            reply = await _http(stream, b"GET /portal?x=1 HTTP/1.1\r\nHost: gw\r\n\r\n")
    head = reply.split(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 301")
    assert "location: https://localhost/portal?x=1" in head.lower()


async def test_http_inside_tls_is_the_portal_and_garbage_is_closed(tmp_path):
    async with farm(tmp_path) as f:
        host, port = f.gateway_addrs["gateway"]["tls"]
        ctx = ssl.create_default_context(cafile=str(f.pki.directory / "gateway-public.pem"))
        tcp = await trio.open_tcp_stream(host, port)
        stream = trio.SSLStream(tcp, ctx, server_hostname="localhost", https_compatible=True)
        async with stream:
            reply = await _http(stream, b"GET /login HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200")
        assert b'<form method="post" action="/login"' in reply
        head = reply.split(b"\r\n\r\n")[0].decode().lower()
        assert "strict-transport-security: max-age=31536000" in head
        assert "; secure; httponly; samesite=strict" in head  # the login form's CSRF cookie
        # junk on the plain port is closed without an answer, and the gateway keeps serving
        junk = await trio.open_tcp_stream(*f.gateway_addrs["gateway"]["plain"])
        async with junk:
            try:  # closed with unread bytes pending, the kernel may answer with a reset
                answer = await _http(junk, b"\x00\x01\x02 not a protocol\r\n\r\n" * 3)
            except trio.BrokenResourceError:
                answer = b""
            assert answer == b""
        again = await trio.open_tcp_stream(*f.gateway_addrs["gateway"]["plain"])
        async with again:
            assert (await _http(again, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(
                b"HTTP/1.1 301"
            )
