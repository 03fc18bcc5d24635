"""deploy/systemd: the units load (`systemd-analyze verify`), keep their hardening, give
capabilities only where a daemon needs them (NET_ADMIN and NET_RAW to the HALB alone), run
commands the `ras` CLI accepts, and the sysusers.d file makes the `ras` user.

`systemd-analyze verify` checks that each ExecStart= program exists: the units' /opt/ras/bin/ras
(docs/deploy.md installs it there) is replaced by this checkout's ras for the check.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ras.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "deploy" / "systemd"
INSTALLED_RAS = "/opt/ras/bin/ras"
NAMES = ("ras-broker", "ras-gateway", "ras-gateway@", "ras-agent", "ras-halb")
NO_CAPS: frozenset[str] = frozenset()
CAPS = {
    "ras-broker": NO_CAPS,
    "ras-agent": NO_CAPS,
    "ras-gateway": frozenset({"CAP_NET_BIND_SERVICE"}),
    "ras-gateway@": frozenset({"CAP_NET_BIND_SERVICE"}),
    "ras-halb": frozenset({"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}),
}
HARDENING = {
    "User": "ras",
    "Group": "ras",
    "StateDirectory": "ras",
    "ConfigurationDirectory": "ras",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "NoNewPrivileges": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "SystemCallFilter": "@system-service",
    "SystemCallArchitectures": "native",
    "Restart": "on-failure",
    "RestartPreventExitStatus": "2",  # a configuration error (ras exit code 2)
}


def _parse(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}} (keys may repeat in systemd)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} before any section"
        assert "=" in line, f"{path}: {line!r} is not key=value"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _service(name: str) -> dict[str, list[str]]:
    return _parse(UNITS / f"{name}.service")["Service"]


def _one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        reason = f"{tool} is missing (Debian package systemd; ./dev test installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip")
        pytest.skip(reason)
    return path


def test_every_role_has_a_unit():
    assert sorted(p.stem for p in UNITS.glob("*.service")) == sorted(NAMES)


def test_systemd_analyze_verify(tmp_path):
    analyze = _require("systemd-analyze")
    ras = Path(sys.executable).with_name("ras")
    assert ras.exists(), ras
    for name in NAMES:
        text = (UNITS / f"{name}.service").read_text()
        assert INSTALLED_RAS in text
        (tmp_path / f"{name}.service").write_text(text.replace(INSTALLED_RAS, str(ras)))
    units = [f"./{name}.service" for name in NAMES]
    done = subprocess.run(
        [analyze, "verify", *units], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    if "Failed to initialize manager" in done.stderr or "Failed to setup" in done.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {done.stderr.strip()}")
    # Lines about other units of this machine (e.g. a package's deprecated setting) are theirs.
    ours = [line for line in done.stderr.splitlines() if "ras-" in line]
    assert done.returncode == 0, done.stderr
    assert not ours, done.stderr


def test_exposure_is_low():
    """`systemd-analyze security` rates each unit "OK" (exposure below 3.0 of 10)."""
    analyze = _require("systemd-analyze")
    for name in ("ras-broker", "ras-gateway", "ras-agent", "ras-halb"):
        done = subprocess.run(
            [analyze, "security", "--offline=true", "--threshold=30", f"./{name}.service"],
            cwd=UNITS,
            capture_output=True,
            text=True,
            check=False,
        )
        if "Unknown command verb" in done.stderr or "unrecognized option" in done.stderr:
            pytest.skip(f"this systemd-analyze has no offline security check: {done.stderr}")
        assert done.returncode == 0, f"{name}: {done.stdout[-2000:]}{done.stderr[-500:]}"


@pytest.mark.parametrize("name", NAMES)
def test_hardening(name):
    service = _service(name)
    for key, value in HARDENING.items():
        assert _one(service, key) == value, f"{name}: {key}"
    families = set(_one(service, "RestrictAddressFamilies").split())
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= families
    # raw frames and netlink only for the HALB (gratuitous ARP, `ip address`)
    assert ("AF_PACKET" in families) == (name == "ras-halb")
    assert ("AF_NETLINK" in families) == (name == "ras-halb")


@pytest.mark.parametrize("name", NAMES)
def test_capabilities(name):
    """Empty sets but CAP_NET_BIND_SERVICE for ports 80/443/3389; NET_ADMIN and NET_RAW for the
    HALB only. Bounding and ambient sets alike: the user ras has exactly these."""
    service = _service(name)
    bounding = frozenset(_one(service, "CapabilityBoundingSet").split())
    ambient = frozenset(_one(service, "AmbientCapabilities").split())
    assert bounding == ambient == CAPS[name]


@pytest.mark.parametrize("name", NAMES)
def test_commands_are_ones_ras_accepts(name):
    """ExecStart= and ExecReload= parse with the real CLI, each with its role's config file."""
    service = _service(name)
    parser = build_parser()
    role = name.removeprefix("ras-").rstrip("@")
    for key in ("ExecStart", "ExecReload"):
        for command in service.get(key, []):
            argv = shlex.split(command)
            if argv[0] != INSTALLED_RAS:
                continue
            args = parser.parse_args(argv[1:])
            assert args.command == role
            expected = "/etc/ras/%i.toml" if name.endswith("@") else f"/etc/ras/{role}.toml"
            assert str(args.config) == expected


def test_reload_where_the_daemon_supports_it():
    """SIGHUP for the gateways (they reread their public certificate), `ras halb reload`
    through the admin port for the HALB; none for broker and agent, which have no reload."""
    for name in ("ras-gateway", "ras-gateway@"):
        assert _service(name)["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert _service("ras-halb")["ExecReload"] == [
        f"{INSTALLED_RAS} halb --config /etc/ras/halb.toml reload"
    ]
    for name in ("ras-broker", "ras-agent"):
        assert "ExecReload" not in _service(name)


def test_sysusers_makes_the_ras_user(tmp_path):
    sysusers = _require("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    done = subprocess.run(
        [sysusers, f"--root={tmp_path}", "-"],
        input=(UNITS / "ras.conf").read_text(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    users = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
    }
    assert users["ras"][5:] == ["/var/lib/ras", "/usr/sbin/nologin"]
    assert int(users["ras"][2]) < 1000  # a system user
