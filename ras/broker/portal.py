"""The User Portal's settings at the broker: stored, served by the admin API, pushed to gateways.

Records are ``ras.portal.PortalSettings`` in the store (kind ``portal``): ``default`` for the
farm and one per gateway that differs. A gateway gets its own record, else the farm default,
else the built-in defaults (:func:`settings_for`), right after it registers and again after
every change through the API (``GatewayLinks.push_portal``).

Admin API (docs/admin-api.md):
- ``GET /api/portal``: the stored records;
- ``GET /api/portal/<name>``: what applies to ``<name>`` (a gateway or ``default``), with
  ``source``: ``gateway``, ``default`` or ``built-in``;
- ``PUT /api/portal/<name>``: change the fields given (creating the record from what applied);
- ``DELETE /api/portal/<name>``: remove the record (the gateway falls back to the default);
- ``POST /api/portal/<name>/test-ip-detection``: ask the client IP detection service of what
  applies to ``<name>`` as a browser would, and say what it answered.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

import trio

from ras.broker.admin_api import ApiError, ApiRequest, Route, bad_field
from ras.config import Invalid
from ras.portal.settings import DEFAULT, PortalSettings
from ras.protocol import PortalSettingsUpdate

if TYPE_CHECKING:
    from ras.broker.parts import BrokerParts
    from ras.broker.store import Store

__all__ = ["portal_routes", "settings_for", "update_for"]

log = logging.getLogger("ras.broker")
_TEST_TIMEOUT_S = 10.0
_TEST_MAX_BYTES = 4096


def _lookup(store: Store, name: str) -> tuple[PortalSettings, str]:
    own = store.get_object(PortalSettings, name)
    if own is not None:
        return own, "gateway" if name.casefold() != DEFAULT else "default"
    farm = store.get_object(PortalSettings, DEFAULT)
    if farm is not None:
        return farm, "default"
    return PortalSettings(), "built-in"


def settings_for(store: Store, gateway: str) -> PortalSettings:
    """The settings that apply to ``gateway`` (a store call: run it in a worker thread)."""
    return _lookup(store, gateway)[0]


async def update_for(store: Store, gateway: str) -> PortalSettingsUpdate:
    settings = await trio.to_thread.run_sync(settings_for, store, gateway)
    return PortalSettingsUpdate(json.dumps(settings.to_json(), separators=(",", ":")))


def _test_detection(url: str) -> dict[str, Any]:
    """GET ``url`` (a worker thread): its status and the address it answered, if any."""
    request = urllib.request.Request(url, headers={"User-Agent": "ras-broker portal test"})
    try:
        with urllib.request.urlopen(request, timeout=_TEST_TIMEOUT_S) as answer:
            status = int(answer.status)
            text = answer.read(_TEST_MAX_BYTES).decode("utf-8", "replace").strip()
    except urllib.error.HTTPError as exc:
        return {"url": url, "ok": False, "status": exc.code, "error": f"HTTP {exc.code}"}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return {"url": url, "ok": False, "status": None, "error": str(reason)}
    try:
        address = str(ipaddress.ip_address(text))
    except ValueError:
        return {"url": url, "ok": False, "status": status, "error": "the answer is no address"}
    return {"url": url, "ok": status == 200, "status": status, "address": address}


def portal_routes(broker: BrokerParts) -> list[Route]:
    store = broker.store

    def run(fn: Any, *args: Any) -> Any:
        return trio.to_thread.run_sync(fn, *args)

    def check_name(name: str) -> str:
        try:
            PortalSettings(name=name)
        except Invalid as exc:
            raise bad_field("name", exc.why) from None
        return name

    async def list_(request: ApiRequest) -> tuple[int, Any]:
        return 200, [r.to_json() for r in await run(store.list_objects, PortalSettings)]

    async def get(request: ApiRequest) -> tuple[int, Any]:
        name = check_name(request.parts[1])
        settings, source = await run(_lookup, store, name)
        return 200, settings.to_json() | {"name": name, "source": source}

    async def put(request: ApiRequest) -> tuple[int, Any]:
        name = check_name(request.parts[1])
        body = request.json()
        if "name" in body and str(body["name"]).casefold() != name.casefold():
            raise bad_field("name", "is the path's; it cannot be changed")
        current, _ = await run(_lookup, store, name)
        try:
            settings = current.with_changes(body | {"name": name})
        except Invalid as exc:
            raise bad_field(exc.field, exc.why) from None
        await run(store.put_object, settings)
        log.info("portal settings changed name=%s fields=%s", name, ",".join(sorted(body)))
        await broker.links.push_portal()
        return 200, settings.to_json() | {"source": "gateway" if name != DEFAULT else "default"}

    async def delete(request: ApiRequest) -> tuple[int, Any]:
        name = check_name(request.parts[1])
        if not await run(store.delete_object, PortalSettings, name):
            raise ApiError(404, "not_found", f"no portal settings {name!r}")
        log.info("portal settings removed name=%s", name)
        await broker.links.push_portal()
        return 200, {"deleted": name}

    async def test(request: ApiRequest) -> tuple[int, Any]:
        name = check_name(request.parts[1])
        settings, _ = await run(_lookup, store, name)
        if not settings.client_ip_detection_url:
            raise bad_field("client_ip_detection_url", f"is not set for {name!r}")
        return 200, await run(_test_detection, settings.client_ip_detection_url)

    return [
        Route("GET", ("portal",), list_),
        Route("GET", ("portal", "{}"), get),
        Route("PUT", ("portal", "{}"), put),
        Route("DELETE", ("portal", "{}"), delete),
        Route("POST", ("portal", "{}", "test-ip-detection"), test),
    ]
