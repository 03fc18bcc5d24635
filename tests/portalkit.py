"""The User Portal as a browser sees it, fast level: requests given to ``Portal.handle`` with
cookies kept and forms posted with the tokens the pages carry (tests/test_portal.py)."""

from __future__ import annotations

import re
import urllib.parse

from farmkit import PASSWORD, USER

from ras.portal import Portal
from ras.portal.web import Request, Response

__all__ = ["HOST", "Browser"]

HOST = "portal.test"


class Browser:
    """Cookies, forms and the portal's answers, as a browser sees them."""

    def __init__(self, portal: Portal, client: str = "192.0.2.10") -> None:
        self.portal = portal
        self.client = client
        self.cookies: dict[str, str] = {}
        self.page = ""

    async def request(
        self, method: str, target: str, form: dict[str, str] | None = None, **headers: str
    ) -> Response:
        sent = [("host", HOST)]
        if self.cookies:
            sent.append(("cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items())))
        body = b""
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            sent.append(("content-type", "application/x-www-form-urlencoded"))
        sent += [(k.replace("_", "-"), v) for k, v in headers.items()]
        request = Request(method, target, tuple(sent), body, (self.client, 50000))
        response = await self.portal.handle(request)
        for key, value in response.headers:
            if key == "set-cookie":
                name, _, rest = value.partition("=")
                val = rest.split(";", 1)[0]
                if "Max-Age=0" in value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = val
        self.page = response.body.decode("utf-8", "replace")
        return response

    def field(self, name: str) -> str:
        found = re.search(rf'name="{name}" value="([^"]*)"', self.page)
        assert found, f"no {name} in the page"
        return found.group(1)

    async def log_in(self, user: str = USER, password: str = PASSWORD) -> Response:
        await self.request("GET", "/login")
        return await self.request(
            "POST", "/login", {"csrf": self.field("csrf"), "username": user, "password": password}
        )
