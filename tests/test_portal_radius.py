"""The User Portal's second factor through a real FreeRADIUS with Access-Challenge rounds
(tests/radiuskit.py): each prompt is a page with the server's own text, the right code logs
in, a wrong one is refused, and a RADIUS server that is down denies with its own message."""

from __future__ import annotations

import trio
from farmkit import PASSWORD, USER, farm
from portalkit import Browser
from radiuskit import CODE, GUARD_S, PROMPT, farm_radius, freeradius


async def _prompt(browser: Browser) -> str:
    assert 'name="answer"' in browser.page, browser.page
    label = browser.page.split('<label for="answer">', 1)[1].split("</label>", 1)[0]
    return label


async def test_radius_challenge_rounds_in_the_portal(tmp_path):
    with trio.fail_after(GUARD_S * 2):
        async with (
            freeradius(tmp_path / "radius", users={USER: (PASSWORD, True)}) as server,
            farm(tmp_path / "farm", **farm_radius(server)) as f,
        ):
            portal = f.gateways["gateway"].portal
            assert portal is not None

            async def log_in(code: str) -> Browser:
                browser = Browser(portal)
                await browser.log_in()
                for _ in range(3):  # the broker's code prompt, then RADIUS's own
                    if 'name="answer"' not in browser.page:
                        break
                    prompt = await _prompt(browser)
                    answer = code if prompt == PROMPT else PASSWORD
                    form = {"csrf": browser.field("csrf"), "pending": browser.field("pending")}
                    await browser.request("POST", "/login/answer", form | {"answer": answer})
                return browser

            right = await log_in(CODE)
            assert "ras_portal" in right.cookies
            await right.request("GET", "/resources")
            assert 'data-id="desktop"' in right.page
            wrong = await log_in("000000")
            assert "ras_portal" not in wrong.cookies
            assert "Wrong user name or password." in wrong.page
            await server.stop()
            down = Browser(portal)
            got = await down.log_in()
            if 'name="answer"' in down.page:  # the broker asks for the code first
                form = {"csrf": down.field("csrf"), "pending": down.field("pending")}
                got = await down.request("POST", "/login/answer", form | {"answer": CODE})
            assert got.status == 503
            assert "The second-factor server cannot be reached." in down.page
            assert "ras_portal" not in down.cookies
    assert f"Login OK: [{USER}]" in server.log_text()
