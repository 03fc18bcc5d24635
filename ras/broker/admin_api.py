"""The admin API's requests, routes and errors, without I/O (the shell is
:mod:`ras.broker.admin`, the routes :mod:`ras.broker.admin_routes`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ApiError",
    "ApiRequest",
    "Handler",
    "Route",
    "bad_field",
    "decode_json",
]


class ApiError(Exception):
    """An answer other than success: HTTP ``status``, a short ``code``, a message for a human
    and, for a bad request body, the ``field`` at fault."""

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.extra: dict[str, Any] = {}  # more fields of the answer (a redirect's location)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.code, "message": self.message, **self.extra}
        if self.field is not None:
            out["field"] = self.field
        return out


def bad_field(name: str, why: str) -> ApiError:
    return ApiError(400, "bad_field", f"{name}: {why}", field=name)


# -- request bodies -------------------------------------------------------------------------------
#
# Strict, like the control protocol's decoder (ras.protocol.messages): UTF-8 only, no duplicate
# keys, no NaN or Infinity, bounded nesting and number lengths, and no lone surrogates (they
# are not Unicode: a name holding one could be neither stored nor logged). Every refusal is a
# 400, never a 500.

MAX_DEPTH = 32  # the deepest body the API takes is a resource with its filter: 3 levels
MAX_DIGITS = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


def _bad_json(why: str) -> ApiError:
    return ApiError(400, "bad_json", f"the body is not acceptable JSON: {why}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _bad_json(f"the key {key!a} appears twice in one object")
        obj[key] = value
    return obj


def _number(text: str) -> int | float:
    if sum(c.isdigit() for c in text) > MAX_DIGITS:
        raise _bad_json(f"a number with more than {MAX_DIGITS} digits")
    value = float(text) if any(c in text for c in ".eE") else int(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad_json(f"the number {text} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise _bad_json(f"{name} is not a number JSON allows")


def _where(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _check_tree(value: Any) -> None:
    """Depth and strings, walked without recursion (the tree may be as deep as the parser
    allowed)."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise _bad_json(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise bad_field(_where(path) or "body", "holds a lone surrogate (not Unicode)")
        elif isinstance(item, dict):
            for key, child in item.items():
                if _SURROGATE.search(key):
                    raise _bad_json(f"a key holds a lone surrogate: {key!a}")
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((child, (*path, i)) for i, child in enumerate(item))


def decode_json(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or ApiError 400: ``bad_json`` for what is not strict
    JSON, ``bad_field`` (naming it) for a string that is not Unicode."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad_json(f"not UTF-8 (at byte {exc.start})") from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_int=_number,
            parse_float=_number,
            parse_constant=_no_constant,
        )
    except json.JSONDecodeError as exc:
        raise _bad_json(f"{exc.msg} (line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise _bad_json(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # what the parser's own number conversion refused
        raise _bad_json(str(exc)) from None
    _check_tree(value)
    if not isinstance(value, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """One parsed request; ``admin`` is who asked (a user name or ``cert:<name>``)."""

    method: str
    parts: tuple[str, ...]  # the path's segments after /api, URL-decoded
    query: dict[str, str]
    body: bytes
    client: str
    headers: dict[str, str] = field(default_factory=dict)
    admin: str = ""

    def json(self) -> dict[str, Any]:
        """The body as a JSON object; 400 if it is not one (see :func:`decode_json`)."""
        if not self.body:
            return {}
        return decode_json(self.body)


Handler = Callable[[ApiRequest], Awaitable[tuple[int, Any]]]


@dataclass(frozen=True, slots=True)
class Route:
    """``pattern`` holds literal segments and ``{}`` for one variable segment; the handler
    gets the request and reads the variables from ``request.parts``."""

    method: str
    pattern: tuple[str, ...]
    handler: Handler

    def matches(self, parts: tuple[str, ...]) -> bool:
        return len(parts) == len(self.pattern) and all(
            p == "{}" or p == s for p, s in zip(self.pattern, parts, strict=True)
        )
