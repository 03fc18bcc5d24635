"""An admin API request body (``ras.broker.admin``): ``ApiRequest.json()``, the decode every
handler calls, then every validation the API applies to a body before it reaches the store:
the records of ``ras.broker.model`` (groups, hosts, pools, resources, factor rules) and a
user's fields, as ``POST`` and ``PUT`` take them.

A refusal is ``ApiError`` with status 400, whose answer must serialise; anything else escaping
is what the API would answer 500 to. A record that validates must come back equal from its own
JSON, as a ``PUT`` (which merges the stored record's JSON with the body) relies on.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ras.broker.admin import ApiError, ApiRequest
from ras.broker.admin_routes import _record, _user_fields
from ras.broker.model import (
    FactorRule,
    Filter,
    GroupRecord,
    HostRecord,
    PoolRecord,
    ResourceRecord,
)

RECORDS = (GroupRecord, HostRecord, PoolRecord, ResourceRecord, FactorRule)
DICTIONARY = (
    b'{"',
    b'":"',
    b'":',
    b'":[',
    b'":{',
    b"\\ud800",
    b"\\u0000",
    b"1e999",
    b"-0.0",
    b"true",
    b"null",
    b'"username"',
    b'"password"',
    *sorted(
        {f'"{f.name}"'.encode() for cls in (*RECORDS, Filter) for f in dataclasses.fields(cls)}
    ),
)


def _refused(exc: ApiError) -> None:
    assert exc.status == 400, (exc.status, exc.code, exc.message)
    json.dumps(exc.body(), indent=2, sort_keys=True).encode()  # as the API answers it


def _validate(body: dict[str, Any]) -> None:
    for cls in RECORDS:
        try:
            record = _record(cls, body)
        except ApiError as exc:
            _refused(exc)
            continue
        again = record.to_json()
        json.dumps(again)
        assert _record(cls, again) == record, (record, again)
    for creating in (True, False):
        try:
            _user_fields(body, creating=creating)
        except ApiError as exc:
            _refused(exc)


def fuzz_one(data: bytes) -> None:
    request = ApiRequest("POST", ("users",), {}, data, "192.0.2.1")
    try:
        body = request.json()
    except ApiError as exc:
        _refused(exc)
        return
    assert isinstance(body, dict)
    _validate(body)
