"""The strict TOML config loader (``ras.config``) and the four daemon configs, from real files.

Every test writes a TOML file into ``tmp_path`` and loads it the way the daemons do. What a user
notices: a good file loads with its relative paths taken from the file's own folder; any
mistake (misspelt key, wrong type, bad value, missing key, broken TOML, missing file) stops the
load with a ``ConfigError`` whose message names the file and the dotted key to fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ras.agents.config import AgentConfig
from ras.broker.config import BrokerConfig, ResourceConfig
from ras.broker.passwords import verify_password
from ras.broker.store import SQLiteStore
from ras.client.config import ClientConfig
from ras.config import load
from ras.errors import ConfigError
from ras.farm import DEMO_USER, init_farm
from ras.gateway.config import GatewayConfig
from ras.protocol import HostKind, Mode, ResourceKind

# -- helpers ------------------------------------------------------------------------------------


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def render(data: dict[str, Any]) -> str:
    """TOML text for a flat config, with ``resources`` as an array of tables."""
    lines = [f"{k} = {_value(v)}" for k, v in data.items() if k != "resources"]
    for res in data.get("resources", []):
        lines += ["", "[[resources]]", *(f"{k} = {_value(v)}" for k, v in res.items())]
    return "\n".join(lines) + "\n"


def write(path: Path, data: dict[str, Any] | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else render(data))
    return path


BROKER: dict[str, Any] = {
    "name": "broker",
    "listen_host": "127.0.0.1",
    "gateway_port": 20002,
    "agent_port": 20003,
    "database": "state/broker.sqlite3",
    "cert_file": "pki/broker.pem",
    "key_file": "pki/broker.key",
    "ca_file": "/etc/ras/ca.pem",
    "ticket_ttl_s": 60,
    "resources": [
        {"id": "desktop", "name": "Desktop", "kind": "desktop"},
        {"id": "calc", "name": "Calculator", "kind": "application", "hosts": ["host1"]},
    ],
}
GATEWAY: dict[str, Any] = {
    "name": "gw1",
    "listen_host": "0.0.0.0",
    "plain_port": 8080,
    "tls_port": 8443,
    "public_host": "rds.example.org",
    "public_port": 443,
    "public_cert_file": "pki/public.pem",
    "public_key_file": "pki/public.key",
    "cert_file": "pki/gw1.pem",
    "key_file": "pki/gw1.key",
    "ca_file": "pki/ca.pem",
    "broker_port": 20002,
    "session_idle_timeout_s": 900.5,
}
AGENT: dict[str, Any] = {
    "name": "host1",
    "kind": "vdi",
    "rdp_host": "10.0.0.5",
    "rdp_port": 3389,
    "max_sessions": 20,
    "cert_file": "pki/host1.pem",
    "key_file": "pki/host1.key",
    "ca_file": "pki/ca.pem",
}
CLIENT: dict[str, Any] = {
    "server_host": "rds.example.org",
    "server_port": 443,
    "mode": "gateway_ssl",
    "ca_file": "gw.pem",
    "username": "alice",
    "resource": "desktop",
}
CONFIGS: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "broker": (BrokerConfig, BROKER),
    "gateway": (GatewayConfig, GATEWAY),
    "agent": (AgentConfig, AGENT),
    "client": (ClientConfig, CLIENT),
}


def load_error(cls: type[Any], path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load(cls, path)
    return str(info.value)


def assert_names(message: str, path: Path, key: str) -> None:
    assert str(path) in message, message
    assert f"'{key}'" in message, message


# -- good files ---------------------------------------------------------------------------------


def test_broker_file_loads_with_relative_paths_from_its_folder(tmp_path, monkeypatch):
    path = write(tmp_path / "etc" / "broker.toml", BROKER)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    cfg = load(BrokerConfig, path)
    assert cfg.database == tmp_path / "etc" / "state" / "broker.sqlite3"
    assert cfg.cert_file == tmp_path / "etc" / "pki" / "broker.pem"
    assert cfg.ca_file == Path("/etc/ras/ca.pem")  # absolute paths stay as they are
    assert cfg.ticket_ttl_s == 60.0
    assert isinstance(cfg.ticket_ttl_s, float)  # an int is fine where seconds are expected
    assert cfg.host_timeout_s == 20.0  # a default
    assert cfg.resources == (
        ResourceConfig("desktop", "Desktop", ResourceKind.DESKTOP),
        ResourceConfig("calc", "Calculator", ResourceKind.APPLICATION, hosts=("host1",)),
    )


def test_gateway_agent_client_files_load(tmp_path):
    gw = load(GatewayConfig, write(tmp_path / "gw" / "gateway.toml", GATEWAY))
    assert gw.public_cert_file == tmp_path / "gw" / "pki" / "public.pem"
    assert (gw.plain_port, gw.tls_port, gw.session_idle_timeout_s) == (8080, 8443, 900.5)
    assert gw.plain_enabled
    assert gw.tls_enabled

    agent = load(AgentConfig, write(tmp_path / "agent.toml", AGENT))
    assert agent.kind is HostKind.VDI
    assert agent.key_file == tmp_path / "pki" / "host1.key"
    assert (agent.rdp_host, agent.rdp_port, agent.max_sessions) == ("10.0.0.5", 3389, 20)

    client = load(ClientConfig, write(tmp_path / "profiles" / "work.toml", CLIENT))
    assert client.mode is Mode.GATEWAY_SSL
    assert client.tls
    assert client.ca_file == tmp_path / "profiles" / "gw.pem"


def test_home_directory_in_a_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(tmp_path / "agent.toml", {**AGENT, "cert_file": "~/certs/host1.pem"})
    assert load(AgentConfig, path).cert_file == tmp_path / "home" / "certs" / "host1.pem"


def test_plain_client_profile_needs_no_ca_file(tmp_path):
    data = {k: v for k, v in CLIENT.items() if k != "ca_file"} | {"mode": "gateway"}
    cfg = load(ClientConfig, write(tmp_path / "client.toml", data))
    assert cfg.ca_file is None
    assert not cfg.tls


def test_overrides_win_over_the_file_and_are_checked_too(tmp_path):
    path = write(tmp_path / "gateway.toml", GATEWAY)
    assert load(GatewayConfig, path, overrides={"tls_port": 0}).tls_port == 0
    with pytest.raises(ConfigError) as info:
        load(GatewayConfig, path, overrides={"tls_prot": 0})
    assert_names(str(info.value), path, "tls_prot")


# -- unknown keys -------------------------------------------------------------------------------


@pytest.mark.parametrize("which", sorted(CONFIGS))
def test_misspelt_top_level_key_is_refused(tmp_path, which):
    cls, good = CONFIGS[which]
    path = write(tmp_path / f"{which}.toml", {**good, "conect_timeout_s": 5})
    message = load_error(cls, path)
    assert_names(message, path, "conect_timeout_s")


def test_misspelt_key_lists_the_known_keys(tmp_path):
    path = write(tmp_path / "agent.toml", {**AGENT, "max_session": 5})
    message = load_error(AgentConfig, path)
    assert "max_sessions" in message.split("'max_session'", 1)[1]


def test_misspelt_key_inside_a_resource_is_refused_with_its_index(tmp_path):
    resources = [BROKER["resources"][0], {**BROKER["resources"][1], "hostz": ["host1"]}]
    path = write(tmp_path / "broker.toml", {**BROKER, "resources": resources})
    assert_names(load_error(BrokerConfig, path), path, "resources[1].hostz")


def test_a_section_that_is_not_a_config_key_is_refused(tmp_path):
    text = render(GATEWAY) + "\n[tls]\nport = 443\n"
    path = write(tmp_path / "gateway.toml", text)
    assert_names(load_error(GatewayConfig, path), path, "tls")


# -- wrong types --------------------------------------------------------------------------------

WRONG_TYPES = [
    # (config, key, TOML value, what the message says)
    ("broker", "gateway_port", '"20002"', "expected int, got str"),
    ("broker", "agent_port", "true", "expected int, got bool"),
    ("agent", "max_sessions", "5.0", "expected int, got float"),
    ("gateway", "name", "5", "expected str, got int"),
    ("gateway", "listen_host", '["0.0.0.0"]', "expected str, got list"),
    ("client", "username", "{ first = 'a' }", "expected str, got dict"),
    ("broker", "ticket_ttl_s", '"60"', "expected a number, got str"),
    ("broker", "ticket_ttl_s", "false", "expected a number, got bool"),
    ("gateway", "tls_enabled", '"yes"', "expected bool, got str"),
    ("gateway", "plain_enabled", "1", "expected bool, got int"),
    ("broker", "database", "3", "expected a path"),
    ("broker", "database", '""', "expected a path"),
    ("agent", "name", "1979-05-27", "expected str, got date"),
    ("broker", "resources", '"desktop"', "expected a list, got str"),
]


@pytest.mark.parametrize(("which", "key", "toml", "why"), WRONG_TYPES)
def test_wrong_type_is_refused(tmp_path, which, key, toml, why):
    cls, good = CONFIGS[which]
    rest = {k: v for k, v in good.items() if k != key}
    text = f"{key} = {toml}\n" + render(rest)
    path = write(tmp_path / f"{which}.toml", text)
    message = load_error(cls, path)
    assert_names(message, path, key)
    assert why in message


def test_wrong_types_inside_resources_name_the_index(tmp_path):
    text = render({k: v for k, v in BROKER.items() if k != "resources"})
    text += '\n[[resources]]\nid = "a"\nname = "A"\n'
    text += '\n[[resources]]\nid = "b"\nname = "B"\nusers = ["alice", 7]\n'
    path = write(tmp_path / "broker.toml", text)
    message = load_error(BrokerConfig, path)
    assert_names(message, path, "resources[1].users[1]")
    assert "expected str, got int" in message

    path = write(
        tmp_path / "b2.toml",
        render({k: v for k, v in BROKER.items() if k != "resources"}) + "resources = [1]\n",
    )
    assert_names(load_error(BrokerConfig, path), path, "resources[0]")


# -- bad values ---------------------------------------------------------------------------------

BAD_VALUES = [
    ("broker", "gateway_port", 70000, "not a TCP port"),
    ("broker", "agent_port", -1, "not a TCP port"),
    ("client", "server_port", 0, "not a TCP port"),
    ("agent", "rdp_port", 0, "not a TCP port"),
    ("broker", "ticket_ttl_s", -5, "greater than 0"),
    ("broker", "ticket_ttl_s", 0, "greater than 0"),
    ("broker", "ticket_ttl_s", 86400, "at most 3600"),
    ("gateway", "session_idle_timeout_s", -0.5, "greater than 0"),
    ("client", "keepalive_s", 0.0, "greater than 0"),
    ("agent", "max_sessions", 0, "between 1 and 100000"),
    ("broker", "listen_host", "not a host", "not an IP address or host name"),
    ("gateway", "broker_host", "", "not an IP address or host name"),
    ("client", "listen_host", "10.0.0.1/24", "not an IP address or host name"),
    ("gateway", "name", "", "must not be empty"),
]


@pytest.mark.parametrize(("which", "key", "value", "why"), BAD_VALUES)
def test_bad_value_is_refused(tmp_path, which, key, value, why):
    cls, good = CONFIGS[which]
    path = write(tmp_path / f"{which}.toml", {**good, key: value})
    message = load_error(cls, path)
    assert_names(message, path, key)
    assert why in message


def test_not_a_number_timeout_is_refused(tmp_path):
    path = write(tmp_path / "gateway.toml", render(GATEWAY) + "connect_timeout_s = nan\n")
    assert_names(load_error(GatewayConfig, path), path, "connect_timeout_s")


def test_host_timeout_must_outlast_the_report_interval(tmp_path):
    path = write(tmp_path / "b.toml", {**BROKER, "report_interval_s": 30, "host_timeout_s": 30})
    assert_names(load_error(BrokerConfig, path), path, "host_timeout_s")


def test_gateway_with_both_ports_disabled_is_refused(tmp_path):
    path = write(tmp_path / "g.toml", {**GATEWAY, "plain_enabled": False, "tls_enabled": False})
    message = load_error(GatewayConfig, path)
    assert str(path) in message
    assert "plain_enabled" in message
    assert "tls_enabled" in message


def test_tls_client_profile_without_ca_file_is_refused(tmp_path):
    data = {k: v for k, v in CLIENT.items() if k != "ca_file"}
    path = write(tmp_path / "client.toml", data)
    assert_names(load_error(ClientConfig, path), path, "ca_file")


def test_duplicate_resource_id_is_refused(tmp_path):
    resources = [*BROKER["resources"], {"id": "desktop", "name": "Another desktop"}]
    path = write(tmp_path / "broker.toml", {**BROKER, "resources": resources})
    message = load_error(BrokerConfig, path)
    assert_names(message, path, "resources")
    assert "'desktop'" in message
    assert "twice" in message


def test_bad_resource_id_names_the_resource(tmp_path):
    resources = [BROKER["resources"][0], {"id": "my desktop!", "name": "x"}]
    path = write(tmp_path / "broker.toml", {**BROKER, "resources": resources})
    assert_names(load_error(BrokerConfig, path), path, "resources[1].id")


@pytest.mark.parametrize(
    ("which", "key", "value", "allowed"),
    [
        ("client", "mode", "teleport", ["direct", "direct_ssl", "gateway", "gateway_ssl"]),
        ("agent", "kind", "mainframe", ["rdsh", "vdi", "remote_pc"]),
        ("client", "mode", "GATEWAY_SSL", ["gateway_ssl"]),  # values are case-sensitive
    ],
)
def test_bad_enum_value_lists_the_allowed_ones(tmp_path, which, key, value, allowed):
    cls, good = CONFIGS[which]
    path = write(tmp_path / f"{which}.toml", {**good, key: value})
    message = load_error(cls, path)
    assert_names(message, path, key)
    assert repr(value) in message
    for name in allowed:
        assert name in message


def test_bad_enum_inside_a_resource(tmp_path):
    resources = [{"id": "desktop", "name": "Desktop", "kind": "movie"}]
    path = write(tmp_path / "broker.toml", {**BROKER, "resources": resources})
    message = load_error(BrokerConfig, path)
    assert_names(message, path, "resources[0].kind")
    assert "application" in message


# -- missing keys, broken files -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "key"),
    [("broker", "database"), ("gateway", "public_cert_file"), ("agent", "name"),
     ("client", "server_host")],
)  # fmt: skip
def test_missing_required_key_is_named(tmp_path, which, key):
    cls, good = CONFIGS[which]
    path = write(tmp_path / f"{which}.toml", {k: v for k, v in good.items() if k != key})
    message = load_error(cls, path)
    assert_names(message, path, key)
    assert "missing" in message


def test_missing_key_inside_a_resource_is_named(tmp_path):
    path = write(tmp_path / "broker.toml", {**BROKER, "resources": [{"id": "desktop"}]})
    assert_names(load_error(BrokerConfig, path), path, "resources[0].name")


def test_invalid_toml_names_the_file_and_the_line(tmp_path):
    path = write(tmp_path / "agent.toml", 'name = "host1"\nkind = "rdsh"\nrdp_port = = 3389\n')
    message = load_error(AgentConfig, path)
    assert str(path) in message
    assert "TOML" in message
    assert "line 3" in message


def test_same_key_twice_in_a_file_is_refused(tmp_path):
    path = write(tmp_path / "agent.toml", render(AGENT) + "rdp_port = 3390\n")
    message = load_error(AgentConfig, path)
    # tomllib does not name the key, but the line of the second one points straight at it.
    assert str(path) in message
    assert f"line {len(render(AGENT).splitlines()) + 1}" in message


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere" / "broker.toml"
    message = load_error(BrokerConfig, path)
    assert str(path) in message
    assert "no such" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_named(tmp_path):
    path = write(tmp_path / "broker.toml", BROKER)
    path.chmod(0)
    message = load_error(BrokerConfig, path)
    assert str(path) in message
    assert "cannot read" in message


def test_a_directory_instead_of_a_file_is_a_config_error(tmp_path):
    (tmp_path / "broker.toml").mkdir()
    assert str(tmp_path / "broker.toml") in load_error(BrokerConfig, tmp_path / "broker.toml")


# -- the files the farm writes ------------------------------------------------------------------


def test_farm_example_configs_load_and_point_at_real_files(tmp_path):
    state = init_farm(tmp_path / "state")
    d = state.directory
    broker = load(BrokerConfig, d / "broker.toml")
    gateway = load(GatewayConfig, d / "gateway.toml")
    agent = load(AgentConfig, d / "agent.toml")
    client = load(ClientConfig, d / "client.toml")
    for path in (broker.cert_file, broker.key_file, broker.ca_file, broker.database,
                 gateway.public_cert_file, gateway.public_key_file, gateway.cert_file,
                 gateway.key_file, gateway.ca_file, agent.cert_file, agent.key_file,
                 agent.ca_file, client.ca_file):  # fmt: skip
        assert path is not None
        assert path.is_file(), path
        assert path.is_relative_to(d)
    assert [r.id for r in broker.resources] == ["desktop"]
    assert client.resource == "desktop"
    assert client.username == DEMO_USER
    assert client.server_port == gateway.tls_port == gateway.public_port
    assert gateway.broker_port == broker.gateway_port
    assert agent.broker_port == broker.agent_port


def test_farm_init_twice_keeps_every_file_and_the_demo_password(tmp_path):
    state = init_farm(tmp_path / "state")

    def snapshot() -> dict[str, bytes]:
        return {
            str(p.relative_to(state.directory)): p.read_bytes()
            for p in sorted(state.directory.rglob("*"))
            if p.is_file() and ".sqlite3" not in p.name
        }

    before = snapshot()
    assert "demo.password" in before
    assert "broker.toml" in before
    assert "pki/ca.pem" in before
    password = before["demo.password"].decode().strip()
    # A user edits a config; a second init must keep the edit.
    edited = state.broker_toml.read_text().replace("ticket_ttl_s = 60", "ticket_ttl_s = 30")
    state.broker_toml.write_text(edited)
    before["broker.toml"] = edited.encode()

    again = init_farm(tmp_path / "state")
    assert again.directory == state.directory
    assert snapshot() == before
    assert load(BrokerConfig, state.broker_toml).ticket_ttl_s == 30.0
    store = SQLiteStore(load(BrokerConfig, state.broker_toml).database)
    try:
        user = store.get_user(DEMO_USER)
        assert user is not None
        assert verify_password(password, user.password_hash)
    finally:
        store.close()
