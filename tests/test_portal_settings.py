"""The User Portal's settings in the broker: stored through the admin API (and `ras admin
portal`), per gateway or farm default, pushed to the gateways over their links at once and to a
gateway that registers later; bad values refused naming the field; the client IP detection
service tested from the broker. On the in-process farm over real TLS."""

from __future__ import annotations

import json
from functools import partial

import pytest
import trio
from adminkit import call, logged_on, ras_admin, refused, with_admin
from farmkit import add_gateway, farm, until

from ras.portal import LaunchMethod, PortalSettings


async def test_settings_per_gateway_and_farm_default_reach_the_gateways(tmp_path, nursery):
    async with farm(tmp_path, gateways=("gw1", "gw2")) as f:
        api = await logged_on(with_admin(f))
        gw1, gw2 = f.gateways["gw1"], f.gateways["gw2"]
        await until(lambda: gw1.registered.is_set() and gw2.registered.is_set())
        assert gw1.portal is not None
        assert gw2.portal is not None
        shown = await call(api, "GET", "portal/gw1")
        assert shown["source"] == "built-in"
        assert shown["launch_method"] == "native_fallback"

        await call(api, "PUT", "portal/default", {"launch_method": "browser"})
        await call(
            api,
            "PUT",
            "portal/gw2",
            {"launch_method": "native", "cors_origins": ["https://intranet.example"]},
        )
        await until(lambda: gw1.portal.settings.launch_method is LaunchMethod.BROWSER)
        await until(lambda: gw2.portal.settings.launch_method is LaunchMethod.NATIVE)
        assert gw2.portal.settings.cors_origins == ("https://intranet.example",)
        assert gw1.portal.settings.cors_origins == ()
        assert (await call(api, "GET", "portal/gw1"))["source"] == "default"
        assert (await call(api, "GET", "portal/gw2"))["source"] == "gateway"
        assert [r["name"] for r in await call(api, "GET", "portal")] == ["default", "gw2"]

        # a gateway that registers later gets what applies to it
        late = await add_gateway(f, nursery, "gw3")
        assert late.portal is not None
        await until(lambda: late.portal.settings.launch_method is LaunchMethod.BROWSER)

        # removed: gw2 falls back to the farm default
        await call(api, "DELETE", "portal/gw2")
        await until(lambda: gw2.portal.settings.launch_method is LaunchMethod.BROWSER)
        assert (await refused(api, "DELETE", "portal/gw2")).status == 404

        # bad input names the field and changes nothing
        err = await refused(api, "PUT", "portal/default", {"launch_method": "telepathy"})
        assert (err.status, err.field) == (400, "launch_method")
        err = await refused(api, "PUT", "portal/default", {"cors_origins": ["https://a/b"]})
        assert (err.status, err.field) == (400, "cors_origins[0]")
        err = await refused(api, "PUT", "portal/default", {"colour": "blue"})
        assert (err.status, err.field) == (400, "colour")
        assert gw1.portal.settings.launch_method is LaunchMethod.BROWSER


async def test_client_ip_detection_service_test_action(tmp_path, nursery):
    async def service(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(4096)
            body = b"203.0.113.5\n"
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                % (len(body), body)
            )

    listeners = await nursery.start(partial(trio.serve_tcp, service, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    async with farm(tmp_path) as f:
        api = await logged_on(with_admin(f))
        err = await refused(api, "POST", "portal/default/test-ip-detection")
        assert err.field == "client_ip_detection_url"  # none set yet
        url = f"http://127.0.0.1:{port}/ip"
        await call(api, "PUT", "portal/default", {"client_ip_detection_url": url})
        got = await call(api, "POST", "portal/default/test-ip-detection")
        assert got == {"url": url, "ok": True, "status": 200, "address": "203.0.113.5"}
        await call(api, "PUT", "portal/default", {"client_ip_detection_url": "http://127.0.0.1:9/"})
        got = await call(api, "POST", "portal/default/test-ip-detection")
        assert got["ok"] is False
        assert got["error"]


async def test_ras_admin_portal_command(tmp_path):
    async with farm(tmp_path) as f:
        with_admin(f)
        gw = f.gateways["gateway"]
        assert gw.portal is not None
        code, out, err = await ras_admin(
            f, tmp_path, "portal", "set", "gateway", "--launch-method", "native",
            "--no-user-select", "--cors-origin", "https://a.example",
            "--cors-origin", "https://b.example", "--embedding", "--alternate-host",
            "rds.example.com",
        )  # fmt: skip
        assert code == 0, err
        await until(lambda: gw.portal.settings.allow_embedding)
        assert gw.portal.settings == PortalSettings(
            name="gateway",
            launch_method=LaunchMethod.NATIVE,
            allow_user_select=False,
            cors_origins=("https://a.example", "https://b.example"),
            allow_embedding=True,
            alternate_host="rds.example.com",
        )
        code, out, err = await ras_admin(f, tmp_path, "--json", "portal", "show", "gateway")
        assert code == 0, err
        assert json.loads(out)["source"] == "gateway"
        code, out, err = await ras_admin(f, tmp_path, "portal", "set", "--session-idle", "5")
        assert code == 2
        assert "session_idle_s" in err
        code, out, err = await ras_admin(f, tmp_path, "portal", "reset", "gateway")
        assert code == 0, err
        await until(lambda: not gw.portal.settings.allow_embedding)


@pytest.mark.parametrize("bad", ['{"launch_method": "x"}', '{"name": 5}', "[]"])
def test_a_gateway_keeps_its_settings_when_pushed_bad_ones(bad):
    from ras.portal import Portal, PortalSite

    async def never(peer: tuple[str, int]):  # type: ignore[no-untyped-def]
        raise AssertionError("no broker here")

    portal = Portal(PortalSite("gw", 443, 3389, True, 5.0), never)
    before = portal.settings
    assert not portal.apply(bad)
    assert portal.settings is before
    assert portal.apply('{"launch_method": "browser"}')
    assert portal.settings.launch_method is LaunchMethod.BROWSER


async def test_the_plain_ports_redirect_names_the_alternate_address(tmp_path):
    """Behind a network load balancer, the URLs the gateway hands out name the balancer."""
    async with farm(tmp_path) as f:
        gw = f.gateways["gateway"]
        assert gw.portal is not None
        await until(gw.registered.is_set)
        await trio.to_thread.run_sync(
            f.store.put_object,
            PortalSettings(alternate_host="rds.example.com", alternate_port=8443),
        )
        await f.broker.links.push_portal()
        await until(lambda: gw.portal.settings.alternate_port == 8443)
        stream = await trio.open_tcp_stream(*f.gateway_addrs["gateway"]["plain"])
        async with stream:
            await stream.send_all(b"GET /resources HTTP/1.1\r\nHost: gw\r\n\r\n")
            reply = b""
            with trio.fail_after(10):
                while data := await stream.receive_some():
                    reply += data
        assert b"location: https://rds.example.com:8443/resources\r\n" in reply.lower()
