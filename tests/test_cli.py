"""The ``ras`` command, run for real: ``python -m ras ...`` in a subprocess.

What an operator sees: help texts that list the options, exit code 2 with the file and the key
named for a bad config, user management that never echoes a password, ``farm init`` that
makes a working state directory.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ras.agents.config import AgentConfig
from ras.broker.config import BrokerConfig
from ras.broker.passwords import verify_password
from ras.broker.store import SQLiteStore
from ras.cli.farm import _next_steps
from ras.client.config import ClientConfig
from ras.config import load
from ras.farm import init_farm
from ras.gateway.config import GatewayConfig


def ras(
    *args: str | Path, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "100"}
    env.pop("RAS_PASSWORD", None)
    return subprocess.run(
        [sys.executable, "-m", "ras", *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env=env,
        timeout=timeout,
        check=False,
    )


# -- help ---------------------------------------------------------------------------------------

HELP = [
    ((), ["broker", "gateway", "agent", "client", "pki", "farm", "--log-level", "--version",
          "exit codes"]),
    (("broker",), ["--config", "user-add", "user-del", "user-list", "/etc/ras/broker.toml"]),
    (("broker", "user-add"), ["--password-file", "--group", "--totp", "name"]),
    (("gateway",), ["--config", "/etc/ras/gateway.toml"]),
    (("agent",), ["--config", "/etc/ras/agent.toml"]),
    (("client",), ["--config", "--server", "--mode", "gateway_ssl", "--ca-file", "--user",
                   "--password-file", "list", "launch"]),
    (("client", "list"), ["usage: ras client list"]),
    (("client", "launch"), ["--listen", "--rdp-command", "xfreerdp", "resource", "RDP_ARG"]),
    (("pki",), ["init", "issue", "self-signed", "csr", "import", "export", "show"]),
    (("farm",), ["up", "init"]),
    (("farm",), ["User Portal", ".rdp", "--gateway-rdp-port"]),
    (("farm", "up"), ["--state-dir", "--rdp", "HOST:PORT", "--gateway-port",
                      "--gateway-tls-port", "--gateway-rdp-port"]),
    (("farm", "init"), ["--state-dir", "--rdp"]),
    (("agent",), ["--simulate", "--profile", "--seed", "--pki-dir", "--cert-cache", "--ramp-s"]),
    (("admin",), ["--url", "--ca-file", "--cert", "--key", "--user", "--password-file", "--json",
                  "user", "group", "host", "pool", "resource", "rule", "session", "gateway",
                  "explain", "status", "exit codes"]),
    (("admin", "resource", "add"), ["--users", "--groups", "--clients", "--gateways", "--command",
                                    "--args", "--workdir", "--target", "--hosts", "--pools"]),
    (("admin", "user", "add"), ["--group", "--user-password-file", "--totp", "--disabled"]),
    (("admin", "cert"), ["show", "self-signed", "import", "csr", "letsencrypt", "renew", "assign"]),
    (("admin", "cert", "letsencrypt"), ["--name", "--email", "--directory", "--agree-tos",
                                        "--no-wait", "--wait-s"]),
]  # fmt: skip


@pytest.mark.parametrize(("command", "words"), HELP, ids=[" ".join(c) or "ras" for c, _ in HELP])
def test_help(command, words):
    result = ras(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ras")
    for word in words:
        assert word in result.stdout, f"{word!r} missing from `ras {' '.join(command)} --help`"
    assert result.stderr == ""


def test_version():
    result = ras("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("ras ")


def test_unknown_subcommand_is_a_usage_error():
    result = ras("brokr")
    assert result.returncode == 2
    assert "brokr" in result.stderr


# -- bad configs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def farm_state(tmp_path_factory):
    return init_farm(tmp_path_factory.mktemp("farm") / "state")


DAEMONS = {
    "broker": ("broker.toml", ("broker",)),
    "gateway": ("gateway.toml", ("gateway",)),
    "agent": ("agent.toml", ("agent",)),
    "client": ("client.toml", ("client",)),
}


def command_for(which: str, config: Path) -> list[str | Path]:
    _, words = DAEMONS[which]
    cmd: list[str | Path] = [*words, "--config", config]
    if which == "client":
        cmd.append("list")
    return cmd


@pytest.mark.parametrize("which", sorted(DAEMONS))
def test_misspelt_key_exits_2_naming_file_and_key(tmp_path, farm_state, which):
    name, _ = DAEMONS[which]
    text = (farm_state.directory / name).read_text()
    config = tmp_path / name
    config.write_text(text + "conect_timeout_sec = 5\n")
    result = ras(*command_for(which, config))
    assert result.returncode == 2, result.stderr
    assert str(config) in result.stderr
    assert "conect_timeout_sec" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("which", sorted(DAEMONS))
def test_bad_value_exits_2_naming_file_and_key(tmp_path, farm_state, which):
    name, _ = DAEMONS[which]
    lines = (farm_state.directory / name).read_text().splitlines()
    key = {"broker": "gateway_port", "gateway": "tls_port", "agent": "rdp_port",
           "client": "server_port"}[which]  # fmt: skip
    lines = [f"{key} = 70000" if ln.startswith(f"{key} ") else ln for ln in lines]
    config = tmp_path / name
    config.write_text("\n".join(lines) + "\n")
    result = ras(*command_for(which, config))
    assert result.returncode == 2, result.stderr
    assert str(config) in result.stderr
    assert key in result.stderr
    assert "70000" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("which", sorted(DAEMONS))
def test_missing_config_exits_2_naming_the_file(tmp_path, which):
    config = tmp_path / "nowhere" / DAEMONS[which][0]
    result = ras(*command_for(which, config))
    assert result.returncode == 2, result.stderr
    assert str(config) in result.stderr
    assert "Traceback" not in result.stderr


# -- built-in users -----------------------------------------------------------------------------

PASSWORD = "Tr0ub4dor&3-horse"


@pytest.fixture
def broker_toml(tmp_path):
    config = tmp_path / "etc" / "broker.toml"
    config.parent.mkdir()
    config.write_text(
        'database = "state/broker.sqlite3"\n'
        'cert_file = "pki/broker.pem"\nkey_file = "pki/broker.key"\nca_file = "pki/ca.pem"\n'
    )
    return config


def assert_secret_kept(result: subprocess.CompletedProcess[str]) -> None:
    assert PASSWORD not in result.stdout
    assert PASSWORD not in result.stderr
    assert "scrypt$" not in result.stdout
    assert "scrypt$" not in result.stderr


def test_user_add_list_delete(tmp_path, broker_toml):
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\nsecond line is ignored\n")
    added = ras("broker", "--config", broker_toml, "user-add", "bob", "--group", "users",
                "--group", "admins", "--password-file", pw, cwd=tmp_path)  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "bob" in added.stdout
    assert_secret_kept(added)

    listed = ras("broker", "--config", broker_toml, "user-list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    assert line.split("\t")[0] == "bob"
    assert "users" in line
    assert "admins" in line
    assert "enabled=yes" in line
    assert_secret_kept(listed)

    # The database sits next to the config (relative path), and the password works.
    store = SQLiteStore(broker_toml.parent / "state" / "broker.sqlite3")
    try:
        user = store.get_user("bob")
        assert user is not None
        assert user.groups == ("users", "admins")
        assert verify_password(PASSWORD, user.password_hash)
        assert not verify_password(PASSWORD + "\n", user.password_hash)
    finally:
        store.close()

    deleted = ras("broker", "--config", broker_toml, "user-del", "bob", cwd=tmp_path)
    assert deleted.returncode == 0, deleted.stderr
    listed = ras("broker", "--config", broker_toml, "user-list", cwd=tmp_path)
    assert listed.returncode == 0
    assert "bob" not in listed.stdout
    again = ras("broker", "--config", broker_toml, "user-del", "bob", cwd=tmp_path)
    assert again.returncode == 2
    assert "bob" in again.stderr


def test_user_add_refuses_a_missing_or_empty_password_file(tmp_path, broker_toml):
    missing = tmp_path / "no-such-pw"
    result = ras("broker", "--config", broker_toml, "user-add", "bob", "--password-file", missing)
    assert result.returncode == 2
    assert str(missing) in result.stderr
    empty = tmp_path / "empty-pw"
    empty.write_text("")
    result = ras("broker", "--config", broker_toml, "user-add", "bob", "--password-file", empty)
    assert result.returncode == 2
    assert "empty" in result.stderr
    listed = ras("broker", "--config", broker_toml, "user-list")
    assert listed.returncode == 0
    assert listed.stdout == ""


def test_user_add_without_a_password_and_without_a_terminal_does_not_hang(broker_toml):
    result = ras("broker", "--config", broker_toml, "user-add", "bob")
    assert result.returncode == 2
    assert "--password-file" in result.stderr


def test_user_commands_with_a_misspelt_config_key_exit_2(tmp_path, broker_toml):
    broker_toml.write_text(broker_toml.read_text() + "databse = 'x'\n")
    result = ras("broker", "--config", broker_toml, "user-list")
    assert result.returncode == 2
    assert str(broker_toml) in result.stderr
    assert "databse" in result.stderr


# -- farm init ----------------------------------------------------------------------------------


def test_farm_init_makes_a_state_directory_that_loads(tmp_path):
    result = ras("farm", "init", "--state-dir", "state", "--rdp", "10.0.0.5:3390", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    state = tmp_path / "state"
    assert str(state.resolve()) in result.stdout
    for name in (
        "broker.toml",
        "gateway.toml",
        "agent.toml",
        "client.toml",
        "demo.password",
        "broker.sqlite3",
        "pki/ca.pem",
        "pki/gateway-public.pem",
        "pki/host1.key",
    ):
        assert (state / name).is_file(), name  # fmt: skip
    agent = load(AgentConfig, state / "agent.toml")
    assert (agent.rdp_host, agent.rdp_port) == ("10.0.0.5", 3390)
    load(BrokerConfig, state / "broker.toml")
    gateway = load(GatewayConfig, state / "gateway.toml")
    assert (gateway.rdp_lb_enabled, gateway.rdp_port) == (True, 18389)  # the portal's .rdp files
    load(ClientConfig, state / "client.toml")
    password = (state / "demo.password").read_text()
    assert len(password.strip()) >= 12
    assert password.strip() not in result.stdout + result.stderr

    again = ras("farm", "init", "--state-dir", state)
    assert again.returncode == 0, again.stderr
    assert (state / "demo.password").read_text() == password


def test_a_farm_made_before_its_gateway_had_an_rdp_port(tmp_path):
    """Its gateway.toml is the user's: kept as it is, and what it lacks is said."""
    state = init_farm(tmp_path / "state")
    old = [ln for ln in state.gateway_toml.read_text().splitlines() if "rdp" not in ln]
    state.gateway_toml.write_text("\n".join(old) + "\n")
    refused = ras("farm", "init", "--state-dir", state.directory, "--gateway-rdp-port", "18389")
    assert refused.returncode == 2
    assert "--gateway-rdp-port 18389: gateway.toml has no RDP port (rdp_lb_enabled)" in (
        refused.stderr
    )
    assert ras("farm", "init", "--state-dir", state.directory).returncode == 0
    assert "rdp" not in state.gateway_toml.read_text()
    addrs = {"gateway_tls": ("127.0.0.1", 18443)}
    told = _next_steps(state, addrs)
    assert "no RDP port: the portal offers no .rdp files (to add one, put rdp_lb_enabled = " in (
        told
    )
    assert "Download .rdp file" not in told
    told = _next_steps(state, addrs | {"gateway_rdp": ("127.0.0.1", 18389)})
    assert "127.0.0.1:18389 (RDP: the portal's .rdp files name it)" in told
    assert "(Open in browser, or Download .rdp file for your RDP client)" in told


def test_farm_init_with_a_bad_rdp_address_exits_2(tmp_path):
    result = ras("farm", "init", "--state-dir", tmp_path / "state", "--rdp", "xrdp-host")
    assert result.returncode == 2
    assert "--rdp" in result.stderr
    assert "xrdp-host" in result.stderr


# -- the gateway's and the agent's identity, and one prefix for errors ----------------------------


def _edited(state_dir: Path, name: str, new_name: str, changes: dict[str, object]) -> Path:
    """A copy of the farm's ``name`` config beside it (relative paths still resolve), with
    ``changes`` made."""
    lines = (state_dir / name).read_text().splitlines()
    lines = [ln for ln in lines if ln.split(" = ")[0] not in changes]
    lines += [f"{key} = {value!r}".replace("'", '"') for key, value in changes.items()]
    config = state_dir / new_name
    config.write_text("\n".join(lines) + "\n")
    return config


@pytest.mark.parametrize(
    ("which", "cert_name", "wrong"), [("gateway", "gateway", "gw2"), ("agent", "host1", "host9")]
)
def test_a_name_its_certificate_does_not_carry_exits_2_at_start(
    farm_state, which, cert_name, wrong
):
    name, _ = DAEMONS[which]
    ports = {"plain_port": 0, "tls_port": 0, "rdp_port": 0} if which == "gateway" else {}
    config = _edited(farm_state.directory, name, f"{which}-{wrong}.toml", {"name": wrong, **ports})
    # It logged "ready" and retried forever (FORBIDDEN: certificate is for ...).
    result = ras(*command_for(which, config), timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"ras {which}: {config}: key 'name': ")
    assert f"'{wrong}'" in result.stderr
    assert f"'{cert_name}'" in result.stderr
    assert f"pki/{cert_name}.pem" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_errors_start_with_the_command_before_and_after_the_daemon_starts(farm_state):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _edited(
            farm_state.directory, "gateway.toml", "gateway-taken.toml",
            {"plain_port": port, "tls_port": 0, "rdp_port": 0},
        )  # fmt: skip
        running = ras("gateway", "--config", config, timeout=60)
    # Once trio ran, it said "ras: plain: cannot listen ..."; before, "ras gateway: ...".
    assert running.returncode == 1, running.stderr
    assert f"ras gateway: plain: cannot listen on 127.0.0.1:{port}" in running.stderr
    starting = ras("gateway", "--config", farm_state.directory / "nowhere.toml")
    assert starting.returncode == 2
    assert starting.stderr.startswith("ras gateway: ")
