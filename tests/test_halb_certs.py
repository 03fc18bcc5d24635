"""A HALB connected to the broker (in-process farm, real TLS, no lab): it answers ACME HTTP-01
itself on a service with ``acme = true`` and passes everything else to a gateway; its TLS
offload listener takes the farm certificate the broker distributes, and keeps it in its files.
(The same over a real VIP with pebble: tests/test_acme_lab.py.)"""

from __future__ import annotations

import socket
import ssl

import pytest
import trio
from cryptography import x509
from farmkit import farm
from labkit import await_until

from ras.config import from_mapping
from ras.errors import ConfigError
from ras.halb.config import HalbConfig
from ras.halb.daemon import Halb
from ras.pki import self_signed_certificate

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEY_AUTHORIZATION = f"{TOKEN}.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
VIP = "127.0.0.3"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def _http(port: int, path: str, host: str) -> tuple[str, bytes]:
    stream = await trio.open_tcp_stream(VIP, port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        reply = bytearray()
        with trio.fail_after(10):
            while data := await stream.receive_some():
                reply += data
    head, _, body = bytes(reply).partition(b"\r\n\r\n")
    return head.decode(), body


async def _presented(port: int) -> int:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    stream = trio.SSLStream(await trio.open_tcp_stream(VIP, port), ctx, server_hostname="x")
    async with stream:
        with trio.fail_after(10):
            await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_the_halb_answers_acme_and_offloads_tls_with_the_broker_certificate(
    tmp_path, nursery
):
    async with farm(tmp_path) as f:
        gw = f.gateways["gateway"]
        with trio.fail_after(10):
            await gw.registered.wait()
        plain = f.gateway_addrs["gateway"]["plain"][1]
        cert, key = f.pki.ensure("halb1", ("localhost",))
        offload_cert, offload_key = f.pki.ensure_self_signed("halb1-offload", [VIP])
        http_port, tls_port = _free_port(VIP), _free_port(VIP)
        cfg = from_mapping(
            HalbConfig,
            {
                "name": "halb1",
                "vips": [f"{VIP}/32"],
                "services": [
                    {"listen_port": http_port, "backend_port": plain, "proxy_protocol": False,
                     "acme": True},
                    {"listen_port": tls_port, "backend_port": plain, "proxy_protocol": False,
                     "tls_cert_file": str(offload_cert), "tls_key_file": str(offload_key)},
                ],
                "gateways": [{"name": "gateway", "host": "127.0.0.1"}],
                "health_port": plain,
                "health_interval_s": 0.2,
                "rise": 1,
                "broker_host": "127.0.0.1",
                "broker_port": f.broker_addrs["gateways"][1],
                "cert_file": str(cert),
                "key_file": str(key),
                "ca_file": str(f.pki.ca_path),
                "broker_poll_interval_s": 0.2,
            },
            source="halb.toml",
        )  # fmt: skip
        halb = Halb(cfg)
        await nursery.start(halb.balancer.serve)
        nursery.start_soon(halb._broker_gateways)
        with trio.fail_after(10):
            await halb.balancer.ready.wait()
            await await_until(lambda: "halb1" in f.broker.links.online, what="halb linked")

        # ACME: the HALB answers the token the broker pushed, for its name only
        await f.broker.links.publish_acme(TOKEN, KEY_AUTHORIZATION, "farm.example.com")
        with trio.fail_after(10):
            await await_until(lambda: TOKEN in halb.balancer.challenges, what="token at HALB")
        head, body = await _http(
            http_port, f"/.well-known/acme-challenge/{TOKEN}", "farm.example.com:80"
        )
        assert head.startswith("HTTP/1.1 200"), head
        assert body == KEY_AUTHORIZATION.encode()
        for path, host in [
            ("/.well-known/acme-challenge/nosuchtoken", "farm.example.com"),
            (f"/.well-known/acme-challenge/{TOKEN}", "unknown.example.org"),
        ]:
            head, _ = await _http(http_port, path, host)
            assert head.startswith("HTTP/1.1 404"), (path, host, head)
        assert halb.balancer.backends["gateway"].total == 0  # none of that reached a gateway
        head, _ = await _http(http_port, "/", "farm.example.com")  # anything else: passed on
        assert head.startswith("HTTP/1.1 301"), head
        assert halb.balancer.backends["gateway"].total == 1
        await f.broker.links.withdraw_acme(TOKEN)
        with trio.fail_after(10):
            await await_until(lambda: TOKEN not in halb.balancer.challenges, what="withdrawn")

        # the farm certificate: presented by the offload listener, written over its files
        pair = self_signed_certificate(["farm.example.com"])
        await f.broker.links.distribute_certificate(pair.cert_pem.decode(), pair.key_pem.decode())
        serial = x509.load_pem_x509_certificate(pair.cert_pem).serial_number
        with trio.fail_after(10):
            while await _presented(tls_port) != serial:  # noqa: ASYNC110 (a port)
                await trio.sleep(0.05)
        assert offload_cert.read_bytes() == pair.cert_pem
        assert offload_key.stat().st_mode & 0o777 == 0o600
        nursery.cancel_scope.cancel()


def test_acme_is_answered_on_a_plain_port_only():
    with pytest.raises(ConfigError, match="acme") as info:
        from_mapping(
            HalbConfig,
            {"name": "h", "vips": ["10.0.0.9"], "services": [
                {"listen_port": 443, "backend_port": 80, "acme": True,
                 "tls_cert_file": "c.pem", "tls_key_file": "k.pem"}]},
            source="halb.toml",
        )  # fmt: skip
    assert "halb.toml" in str(info.value)
