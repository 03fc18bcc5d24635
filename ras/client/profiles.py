"""Connection profiles kept in one file (``~/.config/ras/profiles.toml`` by default).

The file holds named profiles, each a :class:`~ras.client.config.ClientConfig` table (the same
keys as a ``client.toml``), and optionally which one is the default::

    default = "work"

    [profiles.work]
    server_host = "gw1.example.com"
    server_port = 443
    secondary_servers = ["gw2.example.com:443"]
    mode = "gateway_ssl"
    ca_file = "/home/alice/.config/ras/farm-ca.pem"
    username = "alice"
    resource = "desktop"

Reading is as strict as every other config (an unknown key is an error naming the file and
the key). ``ras client profile add/remove`` rewrite the file: it is written whole to a temporary
file and renamed over the old one, so that a crash never leaves half a file. Comments in a
file edited by hand are not kept by those commands.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ras.client.config import ClientConfig
from ras.config import from_mapping
from ras.errors import ConfigError

__all__ = ["Profiles", "default_path", "load_profiles", "save_profiles"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def default_path() -> Path:
    """``$XDG_CONFIG_HOME/ras/profiles.toml``, or ``~/.config/ras/profiles.toml``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ras" / "profiles.toml"


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"profile name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    return name


@dataclass
class Profiles:
    """The profiles of one file, in file order, and the default's name ("" for none)."""

    path: Path
    profiles: dict[str, ClientConfig] = field(default_factory=dict)
    default: str = ""

    def get(self, name: str | None) -> ClientConfig:
        """The named profile, else the default one, else the only one."""
        if name is None:
            if self.default:
                name = self.default
            elif len(self.profiles) == 1:
                name = next(iter(self.profiles))
            elif not self.profiles:
                raise ConfigError(
                    f"{self.path}: no profiles yet: add one with 'ras client profile add'"
                )
            else:
                raise ConfigError(
                    f"{self.path}: several profiles and no default: name one with --profile "
                    f"({', '.join(self.profiles)})"
                )
        try:
            return self.profiles[name]
        except KeyError:
            known = ", ".join(self.profiles) or "none"
            raise ConfigError(f"{self.path}: no profile {name!r} (profiles: {known})") from None


def load_profiles(path: Path) -> Profiles:
    """Read ``path``; a missing file is an empty set of profiles."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return Profiles(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(data) - {"default", "profiles"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {sorted(unknown)[0]!r} (known keys: default, profiles)"
        )
    default = data.get("default", "")
    tables = data.get("profiles", {})
    if not isinstance(default, str):
        raise ConfigError(f"{path}: key 'default': expected the name of a profile")
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: key 'profiles': expected tables [profiles.NAME]")
    profiles: dict[str, ClientConfig] = {}
    for name, table in tables.items():
        if not _NAME.fullmatch(name) or not isinstance(table, dict):
            raise ConfigError(f"{path}: 'profiles.{name}' is not a profile table with a valid name")
        profiles[name] = from_mapping(
            ClientConfig, table, source=str(path), base=path.parent, prefix=f"profiles.{name}."
        )
    if default and default not in profiles:
        raise ConfigError(f"{path}: key 'default': there is no profile {default!r}")
    return Profiles(path, profiles, default)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _toml_value(value.value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _table(cfg: ClientConfig) -> Mapping[str, Any]:
    """The fields that differ from the defaults (and the required ones)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.default is dataclasses.MISSING or value != f.default:
            out[f.name] = value
    return out


def render(profiles: Profiles) -> str:
    lines = ["# ras client connection profiles (ras client profile add/list/remove)."]
    if profiles.default:
        lines.append(f"default = {_toml_value(profiles.default)}")
    for name, cfg in profiles.profiles.items():
        lines += ["", f"[profiles.{name}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in _table(cfg).items()]
    return "\n".join(lines) + "\n"


def save_profiles(profiles: Profiles) -> None:
    """Write the file whole: a temporary file in the same folder, renamed over the old one."""
    path = profiles.path
    text = render(profiles)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror}") from None
