"""``/api/brokers``: the farm's brokers and their roles, and promotion (ras.broker.roles).

``GET /api/brokers`` lists the brokers present, their priority and role; ``POST
/api/brokers/<name>/promote`` makes one the primary. Promotion is taken by any broker (it is
how a farm whose primary is gone gets one back); every other write goes to the primary only
(``ras.broker.admin`` answers it on a secondary with a redirect naming the primary).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ras.broker.admin_api import ApiError, ApiRequest, Route
from ras.broker.parts import BrokerParts
from ras.errors import RasError

__all__ = ["PROMOTE", "broker_routes"]

log = logging.getLogger("ras.broker.admin")
PROMOTE = ("brokers", "{}", "promote")  # the one write a secondary takes


def broker_routes(broker: BrokerParts) -> list[Route]:
    async def listing(request: ApiRequest) -> tuple[int, Any]:
        roles = broker.roles
        if roles is None:  # one broker on SQLite: the primary, alone
            name = broker.config.name
            return 200, {
                "self": name, "primary": name, "designated": name, "auto_promote": False,
                "brokers": [{"name": name, "priority": 0, "role": "primary", "admin_url": ""}],
            }  # fmt: skip
        try:
            return 200, await trio.to_thread.run_sync(roles.status)
        except RasError as exc:
            raise ApiError(503, "unavailable", f"the farm's state cannot be read: {exc}") from None

    async def promote(request: ApiRequest) -> tuple[int, Any]:
        name = request.parts[1]
        roles = broker.roles
        if roles is None:
            raise ApiError(409, "single_broker", "this farm has one broker: it is the primary")
        try:
            await trio.to_thread.run_sync(roles.promote, name)
        except LookupError as exc:
            raise ApiError(404, "not_found", str(exc)) from None
        except RasError as exc:
            raise ApiError(
                503, "unavailable", f"the farm's state cannot be written: {exc}"
            ) from None
        log.warning("admin promote broker=%s by=%s", name, request.admin)
        return 202, {"promoted": name, "message": f"{name} takes the primary role within seconds"}

    return [Route("GET", ("brokers",), listing), Route("POST", PROMOTE, promote)]
