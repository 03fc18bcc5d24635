"""The portal's browser launch: a web launch token from the broker, in the web client's page.

``web_launch`` is the portal's ``WebLaunch`` (``Portal(web_launch=...)``): it asks the broker
for a ``launch`` in mode ``web`` on the browser's own broker connection, so the token is bound
to this user, the resource, the host the broker picked, this gateway and the browser's
address, and expires soon (the broker's ``ticket_ttl_s``). The page (``templates/
webclient.html``, behaviour in ``static/webclient.js``) asks for the desktop's user name and
password and hands them with the token to IronRDP's engine, which connects through the
gateway's WebSocket (``ras.gateway.webclient``). The password stays in the page.
"""

from __future__ import annotations

import functools
import html
import logging
import string
from collections.abc import Callable
from importlib import resources

from ras.portal.app import FARM, BrokerDown, Portal, SessionLost
from ras.portal.security import csp
from ras.portal.sessions import WebSession
from ras.portal.web import BadRequest, Request, Response, redirect
from ras.protocol import Error, Launch, LaunchOk, Mode

__all__ = ["web_launch"]

log = logging.getLogger("ras.portal")


@functools.cache
def _template() -> string.Template:
    text = resources.files("ras.portal").joinpath("templates", "webclient.html").read_text()
    return string.Template(text)


async def web_launch(
    portal: Portal,
    session: WebSession,
    resource: str,
    request: Request,
    *,
    styles: Callable[[], tuple[str, ...]] = tuple,
) -> Response:
    """The web client's page for ``resource``, with a fresh web launch token. ``styles``:
    the CSP sources (hashes) of the styles the RDP engine injects into the page."""
    try:
        msg = Launch(resource, Mode.WEB)
    except ValueError:
        raise BadRequest("no such resource") from None
    try:
        reply = await portal.ask(session, msg)
    except SessionLost:
        return redirect("/login?expired=1")
    if isinstance(reply, Error):
        page = portal.message(404, "Not available", reply.message, "/resources")
        return page
    if not isinstance(reply, LaunchOk) or not reply.ticket:
        raise BrokerDown
    host = f"[{reply.host}]" if ":" in reply.host else reply.host
    values = {
        "farm": FARM,
        "name": resource,
        "token": reply.ticket,
        "destination": f"{host}:{reply.port}",
        "user": session.user.rsplit("\\", 1)[-1].split("@", 1)[0],
    }
    body = _template().substitute({k: html.escape(v, quote=True) for k, v in values.items()})
    log.info(
        "portal web launch user=%s client=%s resource=%s", session.user, session.client, resource
    )
    # The RDP engine instantiates its WASM from a data: URL it fetches: that, and no more; and
    # it injects its component's <style>: that one, by hash.
    policy = csp(portal.settings, extra_connect=("data:",), extra_style=styles())
    return Response(200, body.encode(), headers=[("content-security-policy", policy)])
