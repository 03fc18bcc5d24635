"""``ras admin portal``: the User Portal's settings, per gateway or farm default
(docs/portal.md; the API is ``/api/portal``, ras.broker.portal)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["COLUMNS", "add_portal_parser"]

COLUMNS = ["name", "launch_method", "allow_user_select", "alternate_host", "cors_origins"]
# option -> (API field, argparse keywords)
_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "--launch-method": (
        "launch_method",
        {
            "choices": ("browser", "native", "native_fallback"),
            "help": "browser only, native client only (an .rdp file), or native with the "
            "browser as fallback",
        },
    ),
    "--user-select": (
        "allow_user_select",
        {"action": argparse.BooleanOptionalAction, "help": "users may pick the method"},
    ),
    "--new-tab": (
        "open_in_new_tab",
        {"action": argparse.BooleanOptionalAction, "help": "open in the browser in a new tab"},
    ),
    "--alternate-host": (
        "alternate_host",
        {"metavar": "HOST", "help": "the host name URLs and .rdp files name ('' : none)"},
    ),
    "--alternate-port": (
        "alternate_port",
        {"type": int, "metavar": "PORT", "help": "the HTTPS port URLs name (0: none)"},
    ),
    "--alternate-rdp-port": (
        "alternate_rdp_port",
        {"type": int, "metavar": "PORT", "help": "the RDP port .rdp files name (0: none)"},
    ),
    "--cookie-name": ("cookie_name", {"metavar": "NAME", "help": "the web session cookie"}),
    "--cors-origin": (
        "cors_origins",
        {
            "action": "append",
            "metavar": "ORIGIN",
            "help": "an origin allowed to call the portal (repeatable; '' clears the list)",
        },
    ),
    "--cors-max-age": (
        "cors_max_age_s",
        {"type": int, "metavar": "S", "help": "seconds a browser caches a CORS preflight"},
    ),
    "--embedding": (
        "allow_embedding",
        {"action": argparse.BooleanOptionalAction, "help": "allow frames of other pages"},
    ),
    "--ip-detection-url": (
        "client_ip_detection_url",
        {"metavar": "URL", "help": "client IP detection service ('' : none)"},
    ),
    "--hsts": (
        "hsts",
        {"action": argparse.BooleanOptionalAction, "help": "Strict-Transport-Security"},
    ),
    "--hsts-max-age": ("hsts_max_age_s", {"type": int, "metavar": "S", "help": "HSTS max-age"}),
    "--session-idle": (
        "session_idle_s",
        {"type": int, "metavar": "S", "help": "a web session idle this long ends"},
    ),
    "--session-max": (
        "session_max_s",
        {"type": int, "metavar": "S", "help": "no web session lives longer"},
    ),
}


def _body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for field, _ in _OPTIONS.values():
        value = getattr(args, field)
        if value is None:
            continue
        if field == "cors_origins":
            value = [o for o in value if o]
        body[field] = value
    return body


def add_portal_parser(sub: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    """``portal show|list|set|reset|test-ip-detection`` (``leaf``: ras.cli.admin's)."""
    portal = sub.add_parser(
        "portal", help="User Portal settings (per gateway or the farm default)"
    ).add_subparsers(dest="action", metavar="ACTION", required=True)

    def request(method: str, path: str, body: bool = False) -> Callable[..., Any]:
        return lambda api, a: api.request(
            method, path.format(name=a.name), _body(a) if body else None
        )

    leaf(portal, "list", request("GET", "portal"), "portal", "the stored settings records")
    p = leaf(
        portal,
        "show",
        request("GET", "portal/{name}"),
        "portal",
        "the settings that apply to a gateway (or the farm default)",
    )
    p.add_argument("name", nargs="?", default="default", help="a gateway, or default")
    p = leaf(
        portal,
        "set",
        request("PUT", "portal/{name}", body=True),
        "portal",
        "change settings of a gateway (made from what applied) or of the farm default",
    )
    p.add_argument("name", nargs="?", default="default", help="a gateway, or default")
    for option, (field, kw) in _OPTIONS.items():
        p.add_argument(option, dest=field, **kw)
    p = leaf(
        portal,
        "reset",
        request("DELETE", "portal/{name}"),
        "portal",
        "remove a gateway's settings (it takes the farm default again)",
    )
    p.add_argument("name", help="a gateway, or default")
    p = leaf(
        portal,
        "test-ip-detection",
        request("POST", "portal/{name}/test-ip-detection"),
        "portal",
        "ask the client IP detection service what address it sees, from the broker",
    )
    p.add_argument("name", nargs="?", default="default", help="a gateway, or default")
