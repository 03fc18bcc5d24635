"""The compose scenarios in containers, the way users run them: the image built from this
checkout (deploy/container/build), the farm's certificates and user made by
deploy/compose/setup, `docker-compose up` against podman's Docker API socket on user-defined
networks, and a real login from a client container: `ras client launch` and xfreerdp with NLA
to the demo RDP host (freerdp-shadow-cli) through the gateways, 0 with the right password and
147 with a wrong one, the RDP server's own log showing the refusal.

- HALB: three gateways behind two `ras halb` nodes holding a VIP by VRRP on the compose
  network; gateway SSL through the VIP, the RDP port (3389, routing token) through the VIP,
  and the next login after the master is stopped.
- DMZ: gateways on an internal network, forwarding gateways in a DMZ, the client on a third
  network that reaches only the forwarders.

Needs root, podman (runc), docker-compose and debootstrap (`./dev test` installs them). The
images are built once per machine and then reused from podman's cache (a rebuild with no code
change takes seconds); the first build (debootstrap, the demo RDP host's packages) takes a few
minutes. Skipped where these cannot run, a failure under CI. Containers and networks are
removed after each scenario, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from labkit import wait_until

pytestmark = pytest.mark.containers

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TOOLS = ("podman", "runc", "docker-compose", "debootstrap")
WRONG = "not the password"
START_S = 120.0  # a cold farm on a busy two-core machine: containers, TLS, registrations


def _unavailable() -> str | None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if os.geteuid() != 0:
        reason = "needs root (podman networks with fixed subnets, debootstrap)"
    elif missing:
        reason = f"missing {', '.join(missing)} (./dev test installs them)"
    else:
        return None
    if os.environ.get("CI"):
        pytest.fail(f"containers: {reason}; CI is set, so this is a failure, not a skip")
    return reason


def _run(
    argv: list[str], env: dict[str, str], *, timeout: float = 120, check: bool = True, **kw
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, check=False, **kw
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done


@pytest.fixture(scope="module")
def podman(tmp_path_factory) -> Iterator[dict[str, str]]:
    """The environment for podman and docker-compose: the project's containers.conf, and
    DOCKER_HOST on a podman API service this fixture runs (and stops)."""
    reason = _unavailable()
    if reason is not None:
        pytest.skip(reason)
    run_dir = tmp_path_factory.mktemp("podman")
    socket = run_dir / "podman.sock"
    env = {
        **os.environ,
        "CONTAINERS_CONF": str(DEPLOY / "container" / "containers.conf"),
        "DOCKER_HOST": f"unix://{socket}",
    }
    with open(run_dir / "service.log", "wb") as log:
        service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{socket}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: (
                _run(["docker-compose", "version"], env, check=False).returncode == 0
                and socket.exists()
            ),
            30,
            0.1,
            "podman's API socket",
        )
        yield env
    finally:
        service.terminate()
        try:
            service.wait(10)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


@pytest.fixture(scope="module")
def images(podman) -> None:
    """local/ras:dev and local/ras-demo:dev from this checkout (cached between runs)."""
    _run([str(DEPLOY / "container" / "build"), "--demo"], podman, timeout=1500)


@dataclass
class Farm:
    """A compose scenario that is up: its project, its state directory, and ways in."""

    scenario: str
    project: str
    state: Path
    env: dict[str, str]

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def compose(
        self, *args: str, timeout: float = 180, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = ["docker-compose", "-p", self.project, *args]
        cwd = DEPLOY / "compose" / self.scenario
        return _run(argv, self.env, timeout=timeout, check=check, cwd=cwd)

    def exec(self, service: str, *argv: str, check: bool = True, timeout: float = 120):
        cmd = ["podman", "exec", self.container(service), *argv]
        return _run(cmd, self.env, check=check, timeout=timeout)

    def logs(self, service: str) -> str:
        done = _run(["podman", "logs", self.container(service)], self.env, check=False)
        return done.stdout + done.stderr

    def wait_log(self, service: str, text: str, count: int = 1, timeout: float = START_S) -> None:
        wait_until(
            lambda: self.logs(service).count(text) >= count, timeout, 0.5, f"{service}: {text!r}"
        )

    @property
    def rdp_password(self) -> str:
        return (self.state / "rdsh1" / "demo-rdp.password").read_text().strip()

    def rdp_refusals(self) -> int:
        """The logins the RDP server itself refused (its NLA check), as its log says."""
        log = self.state / "rdsh1" / "demo-rdp.log"
        return log.read_text(errors="replace").count("client authentication failure")

    @contextlib.contextmanager
    def forwarder(self, port: int) -> Iterator[Forwarder]:
        """`ras client launch --listen 127.0.0.1:port` in the client container, logged in as
        alice; stopped at the end."""
        log = f"/tmp/forwarder-{port}.log"
        pid = self.exec(
            "client", "sh", "-c",
            "ras client --config /etc/ras/client.toml --password-file /etc/ras/alice.password "
            f"launch desktop --listen 127.0.0.1:{port} >{log} 2>&1 & echo $!",
        ).stdout.strip()  # fmt: skip
        forwarder = Forwarder(self, f"/v:127.0.0.1:{port}", log)
        try:
            wait_until(lambda: "point an RDP client at" in forwarder.log(), 60, 0.2, "forwarder")
            yield forwarder
        finally:
            self.exec("client", "kill", pid, check=False)

    def xfreerdp(self, *target: str, password: str) -> int:
        """xfreerdp in the client container, NLA and +auth-only; its exit code."""
        argv = ["xfreerdp", *target, "/u:demo", f"/p:{password}", "/cert:ignore", "+auth-only"]
        return self.exec("client", *argv, check=False).returncode

    def audit(self, gateways: tuple[str, ...]) -> list[str]:
        """The gateways' audit lines of alice's tunnels."""
        lines = "\n".join(self.logs(gw) for gw in gateways).splitlines()
        return [line for line in lines if "tunnel closed user=alice" in line]


@dataclass
class Forwarder:
    farm: Farm
    target: str  # xfreerdp's /v:
    logfile: str

    def log(self) -> str:
        return self.farm.exec("client", "cat", self.logfile, check=False).stdout


def _cleanup(farm: Farm) -> None:
    """Down, and whatever down left (a failed up, podman-compose's networks)."""
    farm.compose("down", "--timeout", "5", "--remove-orphans", check=False)
    label = f"label=com.docker.compose.project={farm.project}"
    for kind in ("container", "network"):
        listed = ["podman", kind, "ls", "--filter", label, "--format", "{{.Name}}"]
        if kind == "container":
            listed[2:3] = ["ls", "--all"]
        names = _run(listed, farm.env, check=False).stdout.split()
        if names:
            _run(["podman", kind, "rm", "--force", *names], farm.env, check=False)


@pytest.fixture(scope="class")
def farm(request, images, podman, tmp_path_factory) -> Iterator[Farm]:
    scenario: str = request.cls.scenario
    state = tmp_path_factory.mktemp(f"compose-{scenario}") / "state"
    farm = Farm(scenario, f"rastest_{scenario}", state, {**podman, "RAS_STATE": str(state)})
    _cleanup(farm)  # a crashed earlier run's
    _run([str(DEPLOY / "compose" / "setup"), scenario, str(state)], farm.env, timeout=300)
    try:
        farm.compose("up", "--detach")
        yield farm
    finally:
        _cleanup(farm)


class TestHalb:
    """Three gateways behind two `ras halb` nodes holding 10.213.51.100 on the compose network."""

    scenario = "halb"
    vip = "10.213.51.100"
    gateways = ("gw1", "gw2", "gw3")

    def _ready(self, farm: Farm) -> None:
        farm.wait_log("rdsh1", "demo RDP host listening")
        farm.wait_log("broker", "agent registered host=rdsh1")
        farm.wait_log("broker", "gateway online", 3)
        wait_until(lambda: self._master(farm) == "halb1", START_S, 0.5, "halb1 holds the VIP")
        wait_until(
            lambda: farm.exec("halb1", "ras", "halb", "status").stdout.count(" up ") == 3,
            START_S,
            0.5,
            "the three gateways up at halb1",
        )

    def _master(self, farm: Farm) -> str | None:
        for node in ("halb1", "halb2"):
            done = farm.exec(node, "ip", "-brief", "address", "show", "eth0", check=False)
            if f" {self.vip}/" in done.stdout:
                return node
        return None

    def test_login_through_the_vip(self, farm):
        self._ready(farm)
        refused = farm.rdp_refusals()
        with farm.forwarder(13389) as forwarder:
            assert "logged in as alice through 10.213.51.100:443 (gateway_ssl)" in forwarder.log()
            right = farm.xfreerdp(forwarder.target, password=farm.rdp_password)
            wrong = farm.xfreerdp(forwarder.target, password=WRONG)
        assert (right, wrong) == (0, 147)
        wait_until(lambda: farm.rdp_refusals() > refused, 30, 0.2, "the RDP server's refusal")
        # The gateways saw the client's own address, passed on by the VIP's master.
        audit = farm.audit(self.gateways)
        assert len(audit) == 2, audit
        assert all("client=10.213.51.50:" in line for line in audit), audit
        assert all("path=10.213.51.11>gw" in line for line in audit), audit

    def test_rdp_port_through_the_vip(self, farm):
        """An .rdp file with a routing token, to port 3389 of the VIP (no ras client running)."""
        self._ready(farm)
        farm.exec(
            "client", "ras", "client", "--config", "/etc/ras/client.toml", "--password-file",
            "/etc/ras/alice.password", "rdp-file", "desktop", "-o", "/tmp/desktop.rdp",
            "--rdp-address", f"{self.vip}:3389",
        )  # fmt: skip
        assert farm.xfreerdp("/tmp/desktop.rdp", password=farm.rdp_password) == 0
        assert farm.xfreerdp("/tmp/desktop.rdp", password=WRONG) == 147
        assert sum("via=token" in line for line in farm.audit(self.gateways)) == 2

    def test_the_next_login_after_the_master_stops(self, farm):
        """halb1 stops: halb2 takes the VIP (VRRP and gratuitous ARP between containers), the
        running forwarder's session is re-established through it, and the next RDP login
        lands."""
        self._ready(farm)
        with farm.forwarder(13390) as forwarder:
            assert farm.xfreerdp(forwarder.target, password=farm.rdp_password) == 0
            farm.compose("stop", "--timeout", "5", "halb1")
            wait_until(lambda: self._master(farm) == "halb2", 60, 0.2, "halb2 takes the VIP")
            # The forwarder saw its connection end with halb1 and logs in again by itself
            # (a try that met the VIP on its way waits out connect_timeout_s, 10 s: longer
            # than xfreerdp waits for an answer, so the login waits for this, as a user would).
            wait_until(
                lambda: "session re-established" in forwarder.log(), 60, 0.2, "re-established"
            )
            code = farm.xfreerdp(forwarder.target, password=farm.rdp_password)
            assert code == 0, forwarder.log()[-3000:]
        assert any("path=10.213.51.12>gw" in line for line in farm.audit(self.gateways))


class TestDmz:
    """Gateways inside, forwarding gateways in the DMZ, the client on its own network."""

    scenario = "dmz"
    gateways = ("gw1", "gw2")

    def _ready(self, farm: Farm) -> None:
        farm.wait_log("rdsh1", "demo RDP host listening")
        farm.wait_log("broker", "agent registered host=rdsh1")
        farm.wait_log("broker", "gateway online", 2)
        for forwarder in ("fw1", "fw2"):
            farm.wait_log(forwarder, "next hop up", 2)

    def test_login_through_the_forwarders(self, farm):
        self._ready(farm)
        refused = farm.rdp_refusals()
        with farm.forwarder(13389) as forwarder:
            assert "logged in as alice through 10.213.54.41:443 (gateway_ssl)" in forwarder.log()
            right = farm.xfreerdp(forwarder.target, password=farm.rdp_password)
            wrong = farm.xfreerdp(forwarder.target, password=WRONG)
        assert (right, wrong) == (0, 147)
        wait_until(lambda: farm.rdp_refusals() > refused, 30, 0.2, "the RDP server's refusal")
        audit = farm.audit(self.gateways)
        assert len(audit) == 2, audit
        assert all("client=10.213.54.50:" in line for line in audit), audit

    def test_rdp_port_through_a_forwarder(self, farm):
        self._ready(farm)
        farm.exec(
            "client", "ras", "client", "--config", "/etc/ras/client.toml", "--password-file",
            "/etc/ras/alice.password", "rdp-file", "desktop", "-o", "/tmp/desktop.rdp",
            "--rdp-address", "10.213.54.42:3389",
        )  # fmt: skip
        assert farm.xfreerdp("/tmp/desktop.rdp", password=farm.rdp_password) == 0

    def test_the_client_network_reaches_only_the_forwarders(self, farm):
        probe = (
            "import socket, sys\n"
            "try:\n"
            "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()\n"
            "except OSError as exc:\n"
            "    sys.exit(f'{exc.__class__.__name__}: {exc}')\n"
        )
        reach = {
            target: farm.exec("client", "python3", "-c", probe, *target, check=False)
            for target in [
                ("10.213.54.41", "443"),  # fw1 on the client network
                ("10.213.53.21", "443"),  # gw1 in the DMZ
                ("10.213.52.10", "20002"),  # the broker inside
                ("10.213.52.31", "3389"),  # the RDP host inside
            ]
        }
        outcome = {t: (d.returncode, d.stderr.strip()) for t, d in reach.items()}
        assert [d.returncode for d in reach.values()] == [0, 1, 1, 1], outcome
        # The internal network has no way out either: the broker cannot reach the client's.
        done = farm.exec("broker", "python3", "-c", probe, "10.213.54.50", "22", check=False)
        assert "unreachable" in done.stderr, done.stderr
