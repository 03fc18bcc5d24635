"""Strict TOML configuration for every daemon: one frozen dataclass each.

:func:`load` reads a TOML file into a config dataclass. It rejects unknown keys (a misspelt
option is never silently ignored), wrong types and bad values, and every error names the file
and the dotted key. Config classes validate their values in ``__post_init__`` by raising
:class:`Invalid` with the field name; the loader turns that into a :class:`ConfigError` that
names the file too. Relative paths in a file are taken relative to that file's folder, so a
state directory can be moved as a whole.

Naming: durations end in ``_s`` (seconds), sizes in ``_bytes``; no unit-less numbers.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from ras.errors import ConfigError

__all__ = ["Invalid", "check_host", "check_port", "check_positive", "from_mapping", "load"]

T = TypeVar("T")


class Invalid(ValueError):
    """Raised by a config class's ``__post_init__``: ``field`` has a bad value."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


def check_port(name: str, value: int, *, zero_ok: bool = True) -> None:
    low = 0 if zero_ok else 1
    if not low <= value <= 65535:
        raise Invalid(name, f"{value} is not a TCP port ({low}-65535)")


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise Invalid(name, f"must be greater than 0, not {value}")


def check_host(name: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not value or len(value) > 253 or any(c.isspace() or c == "/" for c in value):
            raise Invalid(name, f"{value!r} is not an IP address or host name") from None


def load(cls: type[T], path: Path | str, *, overrides: Mapping[str, Any] | None = None) -> T:
    """Read ``path`` (TOML) into a ``cls`` instance; ``overrides`` win over the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if overrides:
        data.update(overrides)
    return from_mapping(cls, data, source=str(path), base=path.parent)


def from_mapping(
    cls: type[T],
    data: Mapping[str, Any],
    *,
    source: str,
    base: Path | None = None,
    prefix: str = "",
) -> T:
    """Build ``cls`` from a mapping (a parsed TOML table); errors name ``source`` and the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (known keys: {known})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, source, base, f"{prefix}{name}")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]  # fmt: skip
    if missing:
        raise ConfigError(f"{source}: missing required key '{prefix}{missing[0]}'")
    try:
        return cls(**kwargs)
    except Invalid as exc:
        raise ConfigError(f"{source}: key '{prefix}{exc.field}': {exc.why}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, source: str, base: Path | None, key: str) -> Any:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{source}: key '{key}': {why}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        (tp,) = args  # only Optional[X] is used in configs
        origin = typing.get_origin(tp)
    if origin is tuple:
        (item,) = (a for a in typing.get_args(tp) if a is not Ellipsis)
        if not isinstance(value, list):
            raise bad(f"expected a list, got {type(value).__name__}")
        return tuple(_convert(item, v, source, base, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad(f"expected a table, got {type(value).__name__}")
        return from_mapping(
            typing.cast(type[Any], tp), value, source=source, base=base, prefix=f"{key}."
        )
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = ", ".join(str(m.value) for m in tp)
        try:
            return tp(value)
        except ValueError:
            raise bad(f"{value!r} is not one of: {allowed}") from None
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise bad("expected a path (a non-empty string)")
        path = Path(value).expanduser()
        return path if path.is_absolute() or base is None else base / path
    if tp is float:
        if type(value) not in (int, float):
            raise bad(f"expected a number, got {type(value).__name__}")
        return float(value)
    if type(value) is not tp:
        raise bad(f"expected {_type_name(tp)}, got {type(value).__name__}")
    return value
