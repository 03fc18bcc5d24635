"""The User Portal's handling, fast level: a real broker and a real gateway's portal on a memory
network under trio's autojump clock, requests given to ``Portal.handle`` as a browser would
send them (cookies kept, forms posted with the tokens the pages carry). What is asserted is
what a browser would get: status, page text, cookies and headers. The real browser, the real
TLS port and real xfreerdp are in tests/test_portal_browser.py."""

from __future__ import annotations

import re
import time

import pytest
import trio
import trio.testing
from farmkit import PASSWORD, USER
from memkit import MemoryFarm, memory_farm
from portalkit import Browser

from ras.broker.passwords import hash_password
from ras.broker.store import UserRecord
from ras.broker.totp import totp
from ras.client.rdpfile import parse_rdp_file
from ras.config import Invalid
from ras.portal import LaunchMethod, Portal, PortalSettings, serve_portal
from ras.portal.sessions import MAX_PENDING_PER_IP, PENDING_S
from ras.portal.web import MAX_BODY

pytestmark = pytest.mark.usefixtures("inline_threads")


def _portal(f: MemoryFarm, *, rdp: bool = True, **settings: object) -> Portal:
    portal = f.gateway(rdp_lb_enabled=rdp, public_host="gw.example.com").portal
    assert portal is not None
    portal.settings = PortalSettings(**settings)  # type: ignore[arg-type]
    assert portal.web_launch is not None  # the gateway's web client (ras.portal.weblaunch)
    return portal


async def test_login_lists_resources_and_logout_ends_the_session(tmp_path, nursery, autojump_clock):
    async with memory_farm(tmp_path, nursery) as f:
        browser = Browser(_portal(f))
        first = await browser.request("GET", "/")
        assert first.status == 303
        assert first.header("location") == "/login"
        got = await browser.log_in()
        assert got.status == 303
        assert got.header("location") == "/resources"
        session_cookie = next(v for k, v in got.headers if v.startswith("ras_portal="))
        for attribute in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/"):
            assert attribute in session_cookie
        listing = await browser.request("GET", "/resources")
        assert listing.status == 200
        assert 'data-id="desktop"' in browser.page
        assert ">Desktop<" in browser.page
        assert USER in browser.page
        out = await browser.request("POST", "/logout", {"csrf": browser.field("csrf")})
        assert out.status == 303
        assert out.header("location") == "/login?out=1"
        assert "ras_portal" not in browser.cookies
        assert len(browser.portal.sessions) == 0
        again = await browser.request("GET", "/resources")
        assert again.status == 303
        assert again.header("location") == "/login"


async def test_a_stolen_cookie_after_logout_reaches_nothing(tmp_path, nursery, autojump_clock):
    async with memory_farm(tmp_path, nursery) as f:
        browser = Browser(_portal(f))
        await browser.log_in()
        stolen = dict(browser.cookies)
        await browser.request("GET", "/resources")
        await browser.request("POST", "/logout", {"csrf": browser.field("csrf")})
        thief = Browser(browser.portal)
        thief.cookies = stolen
        got = await thief.request("GET", "/resources")
        assert got.status == 303
        assert got.header("location") == "/login?expired=1"


async def test_wrong_password_and_lockout(tmp_path, nursery, autojump_clock):
    async with memory_farm(tmp_path, nursery, max_failures_per_user=3, lockout_s=600.0) as f:
        browser = Browser(_portal(f))
        for _ in range(3):
            got = await browser.log_in(password="wrong")
            assert got.status == 401
            assert "Wrong user name or password." in browser.page
            assert "ras_portal" not in browser.cookies
        locked = await browser.log_in()  # the right password, but locked out now
        assert locked.status == 429
        assert "too many failed logins" in browser.page
        assert "ras_portal" not in browser.cookies


async def test_totp_prompt_then_the_list(tmp_path, nursery, autojump_clock):
    secret = b"0123456789abcdef0123"
    async with memory_farm(tmp_path, nursery) as f:
        f.store.put_user(UserRecord(USER, hash_password(PASSWORD), ("users",), True, secret))
        browser = Browser(_portal(f))
        prompt = await browser.log_in()
        assert prompt.status == 200
        assert "Verification code" in browser.page
        assert 'name="answer"' in browser.page
        assert "ras_portal" not in browser.cookies  # not logged in yet
        form = {"csrf": browser.field("csrf"), "pending": browser.field("pending")}
        got = await browser.request(
            "POST", "/login/answer", form | {"answer": totp(secret, time.time())}
        )
        assert got.status == 303
        assert got.header("location") == "/resources"
        await browser.request("GET", "/resources")
        assert 'data-id="desktop"' in browser.page
        # a wrong code: back to the login page, refused
        other = Browser(browser.portal, "192.0.2.11")
        await other.log_in()
        form = {"csrf": other.field("csrf"), "pending": other.field("pending")}
        refused = await other.request("POST", "/login/answer", form | {"answer": "000000x"})
        assert refused.status == 401
        assert "ras_portal" not in other.cookies
        # a pending login belongs to the address that started it
        await other.log_in()
        form = {"csrf": other.field("csrf"), "pending": other.field("pending")}
        thief = Browser(browser.portal, "192.0.2.99")
        thief.cookies = dict(other.cookies)
        stolen = await thief.request(
            "POST", "/login/answer", form | {"answer": totp(secret, time.time())}
        )
        assert stolen.status == 401
        assert "ras_portal" not in thief.cookies


async def test_logins_waiting_for_a_code_are_bounded_per_address(tmp_path, nursery, autojump_clock):
    """Each login waiting for its second factor holds a broker connection: a stranger cannot
    hold more than MAX_PENDING_PER_IP of them, and they end after PENDING_S."""
    secret = b"0123456789abcdef0123"
    async with memory_farm(tmp_path, nursery) as f:
        f.store.put_user(UserRecord(USER, hash_password(PASSWORD), ("users",), True, secret))
        portal = _portal(f)
        nursery.start_soon(portal.run)
        browser = Browser(portal)
        for _ in range(MAX_PENDING_PER_IP):
            assert (await browser.log_in()).status == 200  # the prompt
        refused = await browser.log_in()
        assert refused.status == 429
        assert "Too many logins in progress" in browser.page
        assert (await Browser(portal, "192.0.2.77").log_in()).status == 200  # another address
        await trio.sleep(PENDING_S + 1)
        assert (await browser.log_in()).status == 200  # the old ones expired


async def test_csrf_token_missing_or_wrong_is_refused(tmp_path, nursery, autojump_clock):
    async with memory_farm(tmp_path, nursery) as f:
        browser = Browser(_portal(f))
        await browser.request("GET", "/login")
        no_token = await browser.request("POST", "/login", {"username": USER, "password": PASSWORD})
        assert no_token.status == 403
        assert "ras_portal" not in browser.cookies
        wrong = await browser.request(
            "POST", "/login", {"csrf": "x" * 43, "username": USER, "password": PASSWORD}
        )
        assert wrong.status == 403
        await browser.log_in()
        await browser.request("GET", "/resources")
        token = browser.field("csrf")
        form = {"resource": "desktop", "method": "native"}
        assert (await browser.request("POST", "/launch", form)).status == 403
        assert (await browser.request("POST", "/launch", form | {"csrf": token[:-1]})).status == 403
        assert (await browser.request("POST", "/logout", {})).status == 403
        assert len(browser.portal.sessions) == 1  # the refused logout ended nothing
        # the right token, but posted from another site's page
        cross = await browser.request(
            "POST", "/launch", form | {"csrf": token}, origin="https://evil.example"
        )
        assert cross.status == 403
        ok = await browser.request("POST", "/launch", form | {"csrf": token})
        assert ok.status == 200


async def test_native_launch_is_an_rdp_file_for_the_rdp_port(tmp_path, nursery, autojump_clock):
    async with memory_farm(tmp_path, nursery) as f:
        browser = Browser(_portal(f, launch_method=LaunchMethod.NATIVE))
        await browser.log_in()
        await browser.request("GET", "/resources")
        form = {"csrf": browser.field("csrf"), "resource": "desktop", "method": "native"}
        got = await browser.request("POST", "/launch", form)
        assert got.status == 200
        assert got.content_type == "application/x-rdp"
        assert got.header("content-disposition") == 'attachment; filename="desktop.rdp"'
        settings = parse_rdp_file(browser.page)
        assert settings["full address"] == "gw.example.com:3389"
        assert settings["loadbalanceinfo"].startswith("Cookie: msts=r1.")
        # behind a load balancer: the alternate host name and RDP port
        browser.portal.settings = PortalSettings(
            alternate_host="nlb.example.com", alternate_rdp_port=13389
        )
        await browser.request("POST", "/launch", form)
        assert parse_rdp_file(browser.page)["full address"] == "nlb.example.com:13389"
        # not published to this user: nothing
        missing = await browser.request("POST", "/launch", form | {"resource": "other"})
        assert missing.status == 404


def _methods(page: str) -> list[str]:
    return re.findall(r'<button type="submit" data-method="(\w+)"', page)


@pytest.mark.parametrize(
    ("method", "select", "offered"),
    [
        (LaunchMethod.BROWSER, False, ["browser"]),
        (LaunchMethod.NATIVE, False, ["native"]),
        (LaunchMethod.NATIVE_FALLBACK, False, ["native", "browser"]),
        (LaunchMethod.NATIVE, True, ["native", "browser"]),
        (LaunchMethod.BROWSER, True, ["browser", "native"]),
    ],
)
async def test_launch_methods_change_what_the_page_offers(
    tmp_path, nursery, autojump_clock, method, select, offered
):
    async with memory_farm(tmp_path, nursery) as f:
        browser = Browser(_portal(f, launch_method=method, allow_user_select=select))
        await browser.log_in()
        await browser.request("GET", "/resources")
        assert _methods(browser.page) == offered
        assert ('id="launch-chooser"' in browser.page) is select
        token = browser.field("csrf")
        for refused in {"browser", "native"} - set(offered):  # not offered: not served either
            form = {"csrf": token, "resource": "desktop", "method": refused}
            assert (await browser.request("POST", "/launch", form)).status == 403


async def test_only_what_the_gateway_can_do_is_offered(tmp_path, nursery, autojump_clock):
    async with memory_farm(tmp_path, nursery) as f:
        # no RDP port on the gateway: no .rdp files (they would name nothing)
        browser = Browser(_portal(f, rdp=False, launch_method=LaunchMethod.NATIVE_FALLBACK))
        await browser.log_in()
        await browser.request("GET", "/resources")
        assert _methods(browser.page) == ["browser"]
        assert 'id="launch-chooser"' not in browser.page
        form = {"csrf": browser.field("csrf"), "resource": "desktop", "method": "native"}
        assert (await browser.request("POST", "/launch", form)).status == 403
        # ... unless a load balancer in front has one
        browser.portal.settings = PortalSettings(alternate_rdp_port=3389)
        await browser.request("GET", "/resources")
        assert _methods(browser.page) == ["native", "browser"]
        # applications (and desktops) in the browser: a new tab, or this one
        assert '<form method="post" action="/launch" target="_blank">' in browser.page
        browser.portal.settings = PortalSettings(alternate_rdp_port=3389, open_in_new_tab=False)
        await browser.request("GET", "/resources")
        assert 'target="_blank"' not in browser.page
        # neither: the list says so
        browser.portal.web_launch = None
        browser.portal.settings = PortalSettings(launch_method=LaunchMethod.BROWSER)
        await browser.request("GET", "/resources")
        assert _methods(browser.page) == []
        assert "Launching is not available on this gateway." in browser.page


async def test_sessions_expire_when_idle_and_at_their_maximum(tmp_path, nursery, autojump_clock):
    async with memory_farm(tmp_path, nursery) as f:
        portal = _portal(f, session_idle_s=300, session_max_s=900)
        nursery.start_soon(portal.run)
        browser = Browser(portal)
        await browser.log_in()
        await trio.sleep(299)
        assert (await browser.request("GET", "/resources")).status == 200
        await trio.sleep(301)  # idle too long
        got = await browser.request("GET", "/resources")
        assert got.header("location") == "/login?expired=1"
        await browser.request("GET", "/login?expired=1")
        assert "Your session has ended" in browser.page
        await browser.log_in()
        for _ in range(4):  # busy all along, but 900 s after the login it ends
            await trio.sleep(200)
            assert (await browser.request("GET", "/resources")).status == 200
        await trio.sleep(200)
        assert (await browser.request("GET", "/resources")).status == 303
        await trio.sleep(20)  # the sweeper closed the broker connections of both sessions
        assert len(portal.sessions) == 0


async def test_security_headers_embedding_and_cors(tmp_path, nursery, autojump_clock):
    async with memory_farm(tmp_path, nursery) as f:
        browser = Browser(_portal(f, cors_origins=("https://intranet.example",)))
        got = await browser.request("GET", "/login")
        csp = got.header("content-security-policy") or ""
        assert "default-src 'none'" in csp
        assert "script-src 'self'" in csp
        assert "frame-ancestors 'self'" in csp
        assert got.header("x-frame-options") == "SAMEORIGIN"
        assert got.header("strict-transport-security") == "max-age=31536000"
        assert got.header("cache-control") == "no-store"
        assert "<script" not in browser.page.replace('<script type="module" src="/static/', "")
        # CORS: an origin on the list gets the headers, any other none
        allowed = await browser.request("OPTIONS", "/login", origin="https://intranet.example")
        assert allowed.header("access-control-allow-origin") == "https://intranet.example"
        assert allowed.header("access-control-max-age") == "600"
        other = await browser.request("OPTIONS", "/login", origin="https://evil.example")
        assert not [k for k, _ in other.headers if k.startswith("access-control-")]
        assert other.header("vary") == "Origin"  # a cache keeps the two apart
        # embedding allowed, HSTS off
        browser.portal.settings = PortalSettings(allow_embedding=True, hsts=False)
        browser = Browser(browser.portal, "192.0.2.44")
        got = await browser.request("GET", "/login")
        assert "frame-ancestors *" in (got.header("content-security-policy") or "")
        assert got.header("x-frame-options") is None
        assert got.header("strict-transport-security") is None
        assert "SameSite=None" in (got.header("set-cookie") or "")


async def test_static_files_and_unknown_paths(tmp_path, nursery, autojump_clock):
    async with memory_farm(tmp_path, nursery) as f:
        browser = Browser(_portal(f))
        css = await browser.request("GET", "/static/portal.css")
        assert css.status == 200
        assert css.content_type.startswith("text/css")
        js = await browser.request("GET", "/static/portal.js")
        assert js.status == 200
        assert "javascript" in js.content_type
        assert (await browser.request("GET", "/static/../app.py")).status == 404
        assert (await browser.request("GET", "/nothing")).status == 404
        assert (await browser.request("PUT", "/login")).status == 405
        bad = await browser.request("POST", "/login", None, content_type="text/plain")
        assert bad.status == 400


def test_settings_are_strict():
    assert (
        PortalSettings.from_json({"launch_method": "browser"}).launch_method is LaunchMethod.BROWSER
    )
    bad = [
        ({"launch_method": "telepathy"}, "launch_method"),
        ({"cookie_name": "a b"}, "cookie_name"),
        ({"cors_origins": ["https://x.example/path"]}, "cors_origins[0]"),
        ({"cors_origins": ["null"]}, "cors_origins[0]"),
        ({"hsts": 1}, "hsts"),
        ({"colour": "blue"}, "colour"),
        ({"client_ip_detection_url": "ftp://x"}, "client_ip_detection_url"),
        ({"session_idle_s": 5}, "session_idle_s"),
    ]
    for data, field in bad:
        with pytest.raises(Invalid) as err:
            PortalSettings.from_json(data)
        assert err.value.field == field
    s = PortalSettings(name="gw1", cors_origins=("https://a.example",))
    assert PortalSettings.from_json(s.to_json()) == s


async def test_another_gateway_takes_the_session_over(tmp_path, nursery, autojump_clock):
    """Behind a HALB each request may land on another gateway: the session follows."""
    async with memory_farm(tmp_path, nursery) as f:
        first = Browser(_portal(f))
        second_gw = f.gateway("gateway2", rdp_lb_enabled=True).portal
        assert second_gw is not None
        await first.log_in()
        await first.request("GET", "/resources")
        token = first.field("csrf")
        other = Browser(second_gw)
        other.cookies = dict(first.cookies)
        listing = await other.request("GET", "/resources")
        assert listing.status == 200
        assert 'data-id="desktop"' in other.page
        assert other.field("csrf") == token  # the same token on every gateway
        form = {"csrf": token, "resource": "desktop", "method": "native"}
        assert (await other.request("POST", "/launch", form)).status == 200
        assert (await other.request("POST", "/logout", {"csrf": token})).status == 303
        assert not other.cookies
        # a copy of the cookies, replayed at the gateway that logged them out: refused
        replay = Browser(second_gw)
        replay.cookies = dict(first.cookies)
        assert (await replay.request("GET", "/resources")).status == 303
        # a forged resume cookie takes over nothing
        forged = Browser(second_gw)
        forged.cookies = {"ras_portal": "x" * 43, "ras_portal_resume": "not a token"}
        got = await forged.request("GET", "/resources")
        assert got.header("location") == "/login?expired=1"


async def test_logout_at_one_gateway_ends_the_session_at_every_gateway(
    tmp_path, nursery, autojump_clock
):
    """The broker revokes the login at logout: the gateway that logged the browser in (which
    still holds the session) and a third gateway (which would take a copied cookie over) both
    send the copy to the login page."""
    async with memory_farm(tmp_path, nursery) as f:
        first = Browser(_portal(f))
        second_gw = f.gateway("gateway2", rdp_lb_enabled=True).portal
        third_gw = f.gateway("gateway3", rdp_lb_enabled=True).portal
        assert second_gw is not None
        assert third_gw is not None
        await first.log_in()
        assert (await first.request("GET", "/resources")).status == 200
        copied = dict(first.cookies)
        other = Browser(second_gw)
        other.cookies = dict(copied)
        assert (await other.request("GET", "/resources")).status == 200
        assert (await other.request("POST", "/logout", {"csrf": other.field("csrf")})).status == 303
        for portal in (first.portal, third_gw):
            replay = Browser(portal)
            replay.cookies = dict(copied)
            got = await replay.request("GET", "/resources")
            assert got.status == 303
            assert got.header("location") == "/login?expired=1"
            assert 'data-id="desktop"' not in replay.page
        assert len(first.portal.sessions) == 0
        again = Browser(first.portal)  # a new login is a new login: it works
        assert (await again.log_in()).header("location") == "/resources"


async def test_a_lost_broker_connection_is_resumed(tmp_path, nursery, autojump_clock):
    async with memory_farm(tmp_path, nursery) as f:
        browser = Browser(_portal(f))
        await browser.log_in()
        (session,) = browser.portal.sessions._sessions.values()
        assert session.chan is not None
        await session.chan.aclose()  # as when the broker restarts
        assert (await browser.request("GET", "/resources")).status == 200
        assert 'data-id="desktop"' in browser.page


async def _wire(portal: Portal, data: bytes) -> bytes:
    """``data`` sent to the portal's h11 shell over a memory stream; all it answered."""
    client, server = trio.testing.memory_stream_pair()
    reply = bytearray()

    async def serve() -> None:  # as the gateway's front door: the stream closed after
        async with server:
            await serve_portal(portal, server, ("192.0.2.5", 40000))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await client.send_all(data)
        await client.send_eof()
        while chunk := await client.receive_some():
            reply += chunk
    return bytes(reply)


async def test_the_http_shell_answers_once_and_refuses_what_is_too_big_or_not_http(
    tmp_path, nursery, autojump_clock
):
    async with memory_farm(tmp_path, nursery) as f:
        portal = _portal(f)
        head = await _wire(portal, b"HEAD /login HTTP/1.1\r\nhost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert head.endswith(b"\r\n\r\n")  # the head only
        big = b"x" * (MAX_BODY + 1)
        too_big = await _wire(
            portal,
            b"POST /login HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(big), big),
        )
        assert too_big.startswith(b"HTTP/1.1 413 ")
        garbage = await _wire(portal, b"\x16\x03\x01 not http at all\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 ")
        assert await _wire(portal, b"GET /log") == b""  # ended early: nothing to answer
