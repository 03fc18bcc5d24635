"""A client session that lives as long as the user's: keepalive, resume after a lost
connection, tunnels that land on whichever gateway answers.

Real in-process farms (broker, two gateways, an agent over mutual TLS on loopback) with an
echoing stand-in RDP host; the client is the library the `ras client` command uses.
"""

from __future__ import annotations

import dataclasses

import pytest
import trio
from farmkit import PASSWORD, USER, add_gateway, farm
from labkit import await_until

from ras.broker.passwords import hash_password
from ras.client.forwarder import serve_forwarder
from ras.client.session import ClientSession
from ras.errors import AuthError, ErrorCode, TransportError
from ras.net.channel import PeerError, greet
from ras.net.tls import connect_tcp, connect_tls
from ras.pki import client_context
from ras.protocol import AuthOk, Mode, Resume, Role
from ras.protocol import ClientSession as ClientSessionMsg


def _two_gateway_config(f, **kw: object):
    """Plain gateway mode: gw-a first, gw-b as the secondary server."""
    cfg = f.client_config("gw-a", mode=Mode.GATEWAY, **kw)
    b_host, b_port = f.gateway_addrs["gw-b"]["plain"]
    return dataclasses.replace(cfg, secondary_servers=(f"{b_host}:{b_port}",))


async def _echo_through(session: ClientSession, payload: bytes = b"rdp bytes") -> bytes:
    launched = await session.launch("desktop")
    tunnel = await session.open_tunnel(launched.ticket)
    async with tunnel:
        await tunnel.send_all(payload)
        got = b""
        while len(got) < len(payload):
            got += await tunnel.receive_some()
    return got


async def test_keepalive_holds_a_session_past_the_gateways_idle_timeout(tmp_path, host, nursery):
    """Pings are answered with pongs the client waits for: no 'did not answer in time' and no
    reconnect, though the gateway closes sessions idle for a second."""
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=()) as f:
        await add_gateway(f, nursery, "gateway", session_idle_timeout_s=1.0)
        cfg = f.client_config(mode=Mode.GATEWAY, keepalive_s=0.3, request_timeout_s=2.0)
        async with await ClientSession.connect(cfg) as session:
            await session.authenticate(USER, PASSWORD)
            nursery.start_soon(session.keepalive)
            await trio.sleep(4)  # four idle timeouts, a dozen pings
            assert await _echo_through(session) == b"rdp bytes"
            assert session.reconnects == 0
        nursery.cancel_scope.cancel()


async def test_a_lost_session_resumes_on_the_next_server_without_the_password(tmp_path, host):
    async with farm(
        tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=("gw-a", "gw-b")
    ) as f:
        cfg = _two_gateway_config(f)
        async with await ClientSession.connect(cfg) as session:
            auth = await session.authenticate(USER, PASSWORD)
            assert auth.resume_token
            assert session.server == f.gateway_addrs["gw-a"]["plain"]
            # the password changes: a resume must not need it
            record = f.store.get_user(USER)
            assert record is not None
            f.store.put_user(dataclasses.replace(record, password_hash=hash_password("new one")))
            f.gateways["gw-a"].stop()  # drain: the session is closed, the port stops listening
            with trio.fail_after(30):
                await await_until(lambda: not f.broker.gateways["gw-a"].online, what="gw-a off")
                # the next request meets the lost connection, resumes on gw-b and goes through
                assert await _echo_through(session) == b"rdp bytes"
            assert session.server == f.gateway_addrs["gw-b"]["plain"]
            assert session.reconnects == 1
    assert host.connections == 1


async def test_resume_refused_for_a_disabled_user_and_the_password_is_asked_again(tmp_path, host):
    async with farm(
        tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=("gw-a", "gw-b")
    ) as f:
        cfg = _two_gateway_config(f)
        async with await ClientSession.connect(cfg) as session:
            await session.authenticate(USER, PASSWORD)
            record = f.store.get_user(USER)
            assert record is not None
            f.store.put_user(dataclasses.replace(record, enabled=False))
            f.gateways["gw-a"].stop()
            with trio.fail_after(30), pytest.raises(AuthError) as info:
                await session.launch("desktop")
            assert info.value.code is ErrorCode.AUTH_FAILED
    assert host.connections == 0


async def test_a_resume_token_is_bound_to_its_client_address(tmp_path, host):
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        cfg = f.client_config(mode=Mode.GATEWAY)
        async with await ClientSession.connect(cfg) as session:
            token = (await session.authenticate(USER, PASSWORD)).resume_token
        cert, key = f.pki.ensure("gateway")
        ctx = client_context(f.pki.ca_path, cert_file=cert, key_file=key)

        async def resume_from(address: str) -> object:
            stream = await connect_tls(*f.broker_addrs["gateways"], ctx)
            async with await greet(stream, Role.GATEWAY, "test") as chan:
                await chan.send(ClientSessionMsg(address, 50000))
                try:
                    return await chan.request(Resume(token))
                except PeerError as exc:
                    return exc.code

        with trio.fail_after(30):
            assert await resume_from("192.0.2.7") is ErrorCode.AUTH_FAILED
            resumed = await resume_from("127.0.0.1")
            assert isinstance(resumed, AuthOk)
            assert resumed.user == USER
            # a forged token (another signature) is refused too
            forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
            stream = await connect_tls(*f.broker_addrs["gateways"], ctx)
            async with await greet(stream, Role.GATEWAY, "test") as chan:
                await chan.send(ClientSessionMsg("127.0.0.1", 50000))
                with pytest.raises(PeerError) as info:
                    await chan.request(Resume(forged))
                assert info.value.code is ErrorCode.AUTH_FAILED


async def test_resume_can_be_turned_off(tmp_path, host):
    hosts = [("host1", "127.0.0.1", host.port)]
    async with (
        farm(tmp_path, rdp_hosts=hosts, resume_ttl_s=0) as f,
        await ClientSession.connect(f.client_config(mode=Mode.GATEWAY)) as session,
    ):
        assert (await session.authenticate(USER, PASSWORD)).resume_token == ""


async def test_a_running_forwarder_survives_its_gateway(tmp_path, host):
    """The `launch --listen` case: the gateway of the session dies; the keepalive notices and
    resumes on the secondary, and the next RDP connection through the forwarder works."""
    async with farm(
        tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=("gw-a", "gw-b")
    ) as f:
        cfg = _two_gateway_config(f, keepalive_s=0.2, request_timeout_s=2.0)
        async with await ClientSession.connect(cfg) as session, trio.open_nursery() as nursery:
            await session.authenticate(USER, PASSWORD)
            nursery.start_soon(session.keepalive)
            local = await nursery.start(serve_forwarder, session, "desktop")

            async def rdp_connection() -> bytes:
                stream = await connect_tcp(*local)
                async with stream:
                    await stream.send_all(b"\x03\x00hello")
                    got = b""
                    while len(got) < 7:
                        got += await stream.receive_some()
                return got

            with trio.fail_after(30):
                assert await rdp_connection() == b"\x03\x00hello"
                f.gateways["gw-a"].stop()
                # the keepalive finds the session lost
                await await_until(lambda: session.reconnects, what="a reconnect")
                assert session.server == f.gateway_addrs["gw-b"]["plain"]
                assert await rdp_connection() == b"\x03\x00hello"
            nursery.cancel_scope.cancel()
    assert host.connections == 2


async def test_a_tunnel_goes_to_the_next_server_when_the_sessions_server_is_gone(tmp_path, host):
    async with farm(
        tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=("gw-a", "gw-b")
    ) as f:
        cfg = _two_gateway_config(f)
        async with await ClientSession.connect(cfg) as session:
            await session.authenticate(USER, PASSWORD)
            launched = await session.launch("desktop")
            f.gateways["gw-a"].stop()
            with trio.fail_after(30):

                async def refused() -> bool:
                    try:
                        await (await connect_tcp(*f.gateway_addrs["gw-a"]["plain"])).aclose()
                    except TransportError:
                        return True
                    return False

                while not await refused():  # noqa: ASYNC110 (a check that must await)
                    await trio.sleep(0.05)
                tunnel = await session.open_tunnel(launched.ticket)
            async with tunnel:
                await tunnel.send_all(b"x")
                assert await tunnel.receive_some(1) == b"x"
    assert host.connections == 1
