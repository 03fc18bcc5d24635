"""What the User Portal costs next to the native client's way in, through the same gateway.

An in-process farm on loopback (tests/farmkit.py: a real broker, a real gateway on its real
TLS port). In interleaved blocks, one after the other:

- ``portal page``: a browser's GET /login on a new TLS connection (the portal answers one
  request per connection);
- ``portal login+list``: what a browser does to see its list: GET /login, POST /login (the
  broker's login), GET /resources, each on a new TLS connection;
- ``native login+list``: what ``ras client`` does: one TLS connection to the gateway's TLS
  port, hello, authenticate, list_resources (``ras.client.session.ClientSession``).

The user's password hash is made cheap (scrypt N=2^10) so the figures show the paths, not the
hash. Prints the median wall milliseconds of each, the ratio portal/native, and the load
average before and after (2 shared cores: compare within one run, never across runs). The
client and the farm share one process and one core: the figures are the cost of both ends.

    uv run python benchmarks/portal.py [--blocks 7] [--per-block 20]
"""

from __future__ import annotations

import argparse
import os
import re
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from farmkit import PASSWORD, USER, Farm, add_gateway, farm

from ras.broker.passwords import hash_password
from ras.broker.store import UserRecord
from ras.client.session import ClientSession
from ras.protocol import Mode

_LOGIN_COOKIE = re.compile(rb"ras_portal_login=([A-Za-z0-9_-]+);")
_SESSION_COOKIES = re.compile(rb"set-cookie: (ras_portal(?:_resume)?=[^;]+);", re.IGNORECASE)


async def _https(f: Farm, ctx: ssl.SSLContext, request: bytes) -> bytes:
    tcp = await trio.open_tcp_stream(*f.gateway_addrs["gateway"]["tls"])
    stream = trio.SSLStream(tcp, ctx, server_hostname="localhost", https_compatible=True)
    reply = bytearray()
    async with stream:
        await stream.send_all(request)
        try:
            while data := await stream.receive_some():
                reply += data
        except trio.BrokenResourceError:
            pass
    return bytes(reply)


async def _page(f: Farm, ctx: ssl.SSLContext) -> None:
    reply = await _https(f, ctx, b"GET /login HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:100]


async def _portal_login_list(f: Farm, ctx: ssl.SSLContext) -> None:
    page = await _https(f, ctx, b"GET /login HTTP/1.1\r\nHost: localhost\r\n\r\n")
    found = _LOGIN_COOKIE.search(page)
    assert found is not None
    token = found.group(1)
    form = b"csrf=%s&username=%s&password=%s" % (
        token,
        USER.encode(),
        PASSWORD.replace(" ", "+").encode(),
    )
    login = await _https(
        f,
        ctx,
        b"POST /login HTTP/1.1\r\nHost: localhost\r\ncookie: ras_portal_login=%s\r\n"
        b"content-type: application/x-www-form-urlencoded\r\ncontent-length: %d\r\n\r\n%s"
        % (token, len(form), form),
    )
    assert login.startswith(b"HTTP/1.1 303 "), login[:200]
    cookies = b"; ".join(_SESSION_COOKIES.findall(login))
    listing = await _https(
        f, ctx, b"GET /resources HTTP/1.1\r\nHost: localhost\r\ncookie: %s\r\n\r\n" % cookies
    )
    assert b'data-id="desktop"' in listing, listing[:300]
    sid = cookies.split(b";")[0]
    logout_page = listing.split(b'name="csrf" value="', 1)[1].split(b'"', 1)[0]
    form = b"csrf=" + logout_page
    await _https(
        f,
        ctx,
        b"POST /logout HTTP/1.1\r\nHost: localhost\r\ncookie: %s\r\n"
        b"content-type: application/x-www-form-urlencoded\r\ncontent-length: %d\r\n\r\n%s"
        % (sid, len(form), form),
    )  # so the sessions do not pile up (not timed apart: part of the round)


async def _native_login_list(f: Farm) -> None:
    async with await ClientSession.connect(f.client_config(mode=Mode.GATEWAY_SSL)) as session:
        await session.authenticate(USER, PASSWORD)
        assert [r.id for r in await session.list_resources()] == ["desktop"]


async def main(blocks: int, per_block: int) -> None:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ras-bench-portal-") as tmp:
        async with farm(Path(tmp), gateways=()) as f, trio.open_nursery() as nursery:
            # one client address asks flat out here: the per-address rate limit would refuse it
            await add_gateway(f, nursery, "gateway", max_new_per_ip_per_s=100_000.0,
                              max_new_per_ip_burst=100_000)  # fmt: skip
            f.store.put_user(UserRecord(USER, hash_password(PASSWORD, log2_n=10), ("users",)))
            ctx = ssl.create_default_context(cafile=str(f.pki.directory / "gateway-public.pem"))
            with trio.fail_after(30):
                await f.gateways["gateway"].registered.wait()
            ways = {
                "portal page": lambda: _page(f, ctx),
                "portal login+list": lambda: _portal_login_list(f, ctx),
                "native login+list": lambda: _native_login_list(f),
            }
            times: dict[str, list[float]] = {name: [] for name in ways}
            for way in ways.values():  # warm up
                await way()
            for _ in range(blocks):
                for name, way in ways.items():
                    for _ in range(per_block):
                        start = time.perf_counter()
                        await way()
                        times[name].append((time.perf_counter() - start) * 1000)
            nursery.cancel_scope.cancel()
    load_after = os.getloadavg()
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name:<18} median {median:7.2f} ms  (n={len(times[name])})")
    ratio = medians["portal login+list"] / medians["native login+list"]
    print(f"portal/native login+list: {ratio:.2f}x")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=7, help="interleaved blocks (7)")
    parser.add_argument("--per-block", type=int, default=20, help="rounds per way and block")
    args = parser.parse_args()
    trio.run(main, args.blocks, args.per_block)
