"""Broker redundancy in the network-namespace lab, with real xfreerdp and NLA (issue 16).

Every daemon is a process in its own lab host, as on separate machines: three etcd members
(``etcd1..3``), three brokers on that cluster (``broker1..3``, priorities 0, 1, 2), two gateways
and an agent that know all three brokers, the RDP host (freerdp-shadow-cli with NLA on this
machine's loopback, reached through a bridge in the ``rdp`` host, as in test_farm_lab_rdp.py)
and a client host where ``ras client`` and xfreerdp run.

Clients log in, launch and connect xfreerdp (NLA, ``+auth-only``) in a loop, one through each
gateway, while a long xfreerdp session runs. broker1, the primary, is SIGKILLed: the loop goes
on through the other brokers, the long session is not cut, and the tickets redeemed in etcd
match the tunnels that reached the RDP host. Admin writes get ``no_primary`` until broker2 is
promoted, and are taken again by it. Then broker2 is cut off from etcd (iptables in its host)
while broker3 is promoted; after healing, broker2's late write is refused (fenced) and never
reaches etcd. Throughout, a sampler reads ``roles/primary`` ten times a second: it never names
two brokers at once, and a broker names itself primary only while it holds the key.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from conftest import SHADOW_PASSWORD, SHADOW_USER
from etcdkit import needs_etcd
from labkit import Bridge

from ras.broker.etcd import Etcd, EtcdConfig
from ras.broker.etcdstore import EtcdStore
from ras.broker.passwords import hash_password
from ras.broker.store import UserRecord
from ras.cli.admin import AdminApiError, AdminClient
from ras.lab import Host
from ras.lab.etcdcluster import ETCD
from ras.lab.roles import RAS, LabFarm, Ports, agent_config, normal_gateway_config

pytestmark = [pytest.mark.lab, pytest.mark.peers, needs_etcd]

PORTS = Ports(plain=8080, tls=8443, rdp=3389)
BROKERS = ("broker1", "broker2", "broker3")
ETCDS = ("etcd1", "etcd2", "etcd3")
GATEWAYS = ("gw1", "gw2")
ADMIN_PORT = 20443
USER, PASSWORD = "alice", "lab password 7"
PREFIX = "/ras/"
BRIDGE_PORT = 3390
HOSTS = ["client", "rdp", *ETCDS, *BROKERS, *GATEWAYS]


class Farm(LabFarm):
    last_error = ""  # the admin API's last refusal, for a wait that gives up

    def address(self, name: str) -> str:
        return str(self.hosts[name].address)

    @property
    def endpoints(self) -> list[str]:
        return [f"{self.address(e)}:2379" for e in ETCDS]

    def etcd_config(self) -> EtcdConfig:
        return EtcdConfig(endpoints=tuple(self.endpoints), prefix=PREFIX, timeout_s=2.0)

    def in_client(self, fn, *args):  # type: ignore[no-untyped-def]
        """Call ``fn`` in the client host's namespace (where etcd and the admin APIs are)."""
        return self.hosts["client"].call(fn, *args)

    def admin(self, broker: str, method: str, path: str, body: object = None) -> object:
        cert, key = self.pki.ensure("ops-admin")
        api = AdminClient(
            f"https://{self.address(broker)}:{ADMIN_PORT}", self.pki.ca_path,
            cert_file=cert, key_file=key, timeout_s=5,
        )  # fmt: skip
        return self.in_client(api.request, method, path, body)

    def primary_seen_by(self, broker: str) -> str:
        try:
            got = self.admin(broker, "GET", "brokers")
        except (AdminApiError, OSError) as exc:
            self.last_error = repr(exc)
            return "?"
        assert isinstance(got, dict)
        return str(got["primary"])


def _start_etcd(fl: Farm, name: str) -> None:
    initial = ",".join(f"{e}=http://{fl.address(e)}:2380" for e in ETCDS)
    me = fl.address(name)
    fl.start(name, [
        ETCD, "--name", name, "--data-dir", str(fl.tmp / f"{name}.etcd"),
        "--listen-client-urls", f"http://{me}:2379", "--advertise-client-urls", f"http://{me}:2379",
        "--listen-peer-urls", f"http://{me}:2380", "--initial-advertise-peer-urls", f"http://{me}:2380",
        "--initial-cluster", initial, "--initial-cluster-state", "new",
        "--initial-cluster-token", "ras-lab", "--heartbeat-interval", "100",
        "--election-timeout", "1000", "--log-level", "error", "--logger", "zap",
    ])  # fmt: skip


def _broker_toml(fl: Farm, name: str, priority: int) -> Path:
    address = fl.address(name)
    cert, key = fl.pki.ensure(name, [address])
    endpoints = ", ".join(f'"{e}"' for e in fl.endpoints)
    path = fl.tmp / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\nlisten_host = "0.0.0.0"\ngateway_port = {PORTS.broker_gateways}\n'
        f"agent_port = {PORTS.broker_agents}\nadmin_port = {ADMIN_PORT}\n"
        'admin_listen_host = "0.0.0.0"\n'
        f'admin_cert_names = ["ops-admin"]\ndatabase = "{fl.tmp / name}.sqlite3"\n'
        f'cert_file = "{cert}"\nkey_file = "{key}"\nca_file = "{fl.pki.ca_path}"\n'
        "report_interval_s = 1\nhost_timeout_s = 10\n"
        '[[resources]]\nid = "desktop"\nname = "Desktop"\nkind = "desktop"\n'
        f'[etcd]\nendpoints = [{endpoints}]\nprefix = "{PREFIX}"\ntimeout_s = 2\n'
        f"[roles]\npriority = {priority}\nprimary_lease_s = 3\n"
        f'admin_url = "https://{address}:{ADMIN_PORT}"\n'
    )
    return path


def _with_brokers(path: Path, addresses: list[str]) -> None:
    """Add the list of every broker to a gateway's or agent's config (it wins over the single
    ``broker_host``)."""
    text = path.read_text()
    path.write_text(f"brokers = [{', '.join(repr(a) for a in addresses)}]\n" + text)


def _build(lab, tmp: Path) -> Farm:  # type: ignore[no-untyped-def]
    fl = Farm(lab=lab, tmp=tmp, hosts=dict(lab.hosts))
    fl.pki.init_ca()
    for name in ETCDS:
        _start_etcd(fl, name)
    etcd = Etcd(fl.etcd_config())
    fl.wait(partial(_answers, fl, etcd), "the etcd cluster answers", 60)
    store = EtcdStore(fl.etcd_config())
    fl.in_client(store.put_user, UserRecord(USER, hash_password(PASSWORD), ("users",)))
    for priority, name in enumerate(BROKERS):
        fl.start_ras(name, "broker", _broker_toml(fl, name, priority))
        # one after the other: the first to start is the primary (and the designated one)
        try:
            fl.wait(lambda n=name: fl.primary_seen_by(n) == "broker1", f"{name} serves", 60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {fl.last_error}\n{fl.log(name)[-2000:]}") from None
    for name in GATEWAYS:
        conf = normal_gateway_config(
            tmp / f"{name}.toml", name=name, pki=fl.pki, address=fl.address(name),
            public=fl.pki.ensure_self_signed("farm-public", ["farm.lab"]), public_name="farm.lab",
            broker=fl.address("broker1"), ports=PORTS, trusted=[],
        )  # fmt: skip
        _with_brokers(conf, [f"{fl.address(b)}:{PORTS.broker_gateways}" for b in BROKERS])
        conf.write_text(conf.read_text() + "broker_failover_s = 2\n")
        fl.start_ras(name, "gateway", conf)
    conf = agent_config(
        tmp / "agent.toml", name="rdp1", pki=fl.pki, rdp=(fl.address("rdp"), BRIDGE_PORT),
        broker=fl.address("broker1"), ports=PORTS,
    )  # fmt: skip
    _with_brokers(conf, [f"{fl.address(b)}:{PORTS.broker_agents}" for b in BROKERS])
    fl.start_ras("agent", "agent", conf, host="rdp")
    for b in BROKERS:
        fl.wait(lambda b=b: "agent registered host=rdp1 " in fl.log(b), f"rdp1 on {b}", 60)
        for g in GATEWAYS:
            fl.wait(lambda b=b, g=g: f"gateway online name={g} " in fl.log(b), f"{g} on {b}", 60)
    return fl


def _answers(fl: Farm, etcd: Etcd) -> bool:
    try:
        fl.in_client(etcd.revision)
    except Exception:  # not up yet: the wait says when it gives up
        return False
    return True


@pytest.fixture
def farm(make_lab, tmp_path, shadow) -> Iterator[tuple[Farm, Bridge]]:  # type: ignore[no-untyped-def]
    lab = make_lab(*HOSTS)
    bridge = Bridge(lab.hosts["rdp"], BRIDGE_PORT, (shadow.host, shadow.port))
    try:
        yield _build(lab, tmp_path), bridge
    finally:
        bridge.close()


# ---------------------------------------------------------------------------------------------
# The client side: ras client + xfreerdp in the client host


def _client_toml(fl: Farm, gateway: str) -> Path:
    path = fl.tmp / f"client-{gateway}.toml"
    path.write_text(
        f'server_host = "{fl.address(gateway)}"\nserver_port = {PORTS.plain}\nmode = "gateway"\n'
        f'username = "{USER}"\nresource = "desktop"\nkeepalive_s = 1\n'
        "connect_timeout_s = 2\nrequest_timeout_s = 5\n"
    )
    return path


def _password_file(fl: Farm) -> Path:
    path = fl.tmp / "user.password"
    if not path.exists():
        path.write_text(PASSWORD + "\n")
        path.chmod(0o600)
    return path


def _forwarder(fl: Farm, gateway: str, port: int) -> subprocess.Popen[bytes]:
    """``ras client launch --listen``: logs in through ``gateway``; every RDP connection to
    ``port`` is a launch, a ticket and a tunnel."""
    return fl.hosts["client"].popen(
        [*RAS, "client", "--config", str(_client_toml(fl, gateway)), "--password-file",
         str(_password_file(fl)), "launch", "desktop", "--listen", f"127.0.0.1:{port}"]
    )  # fmt: skip


def _xfreerdp(fl: Farm, display: str, port: int, *, auth_only: bool = True):  # type: ignore[no-untyped-def]
    home = fl.tmp / "home"
    home.mkdir(exist_ok=True)
    argv = [
        "xfreerdp", f"/v:127.0.0.1:{port}", f"/u:{SHADOW_USER}", f"/p:{SHADOW_PASSWORD}",
        "/cert:ignore", *(["+auth-only"] if auth_only else []),
    ]  # fmt: skip
    env = {"DISPLAY": display, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    return fl.hosts["client"].popen(argv, env=env)


class Loop:
    """Workers that log in, launch and connect xfreerdp with NLA, round after round."""

    def __init__(self, fl: Farm, display: str) -> None:
        self.fl, self.display = fl, display
        self.ok: list[float] = []  # when each good round logged in
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._worker, args=(g, 14000 + i), daemon=True)
            for i, g in enumerate(GATEWAYS)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def _worker(self, gateway: str, port: int) -> None:
        while not self.stop.is_set():
            error = self._round(gateway, port)
            if error:
                self.failed.append(f"{gateway}: {error}")
                time.sleep(0.2)

    def _round(self, gateway: str, port: int) -> str:
        fwd = _forwarder(self.fl, gateway, port)
        log = self.fl.lab.log_of(fwd)
        try:
            deadline = time.monotonic() + 60
            while "point an RDP client at" not in log.read_text(errors="replace"):
                if fwd.poll() is not None or time.monotonic() > deadline:
                    return "login: " + log.read_text(errors="replace")[-300:]
                time.sleep(0.05)
            logged_in = time.monotonic()
            rdp = _xfreerdp(self.fl, self.display, port)
            code = rdp.wait(60)
            if code != 0:
                return f"xfreerdp exited {code}"
            self.ok.append(logged_in)
            return ""
        finally:
            if fwd.poll() is None:
                fwd.kill()
            fwd.wait(10)

    def wait_ok(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ok) < n:
            assert time.monotonic() < deadline, f"{len(self.ok)} rounds of {n}: {self.failed}"
            time.sleep(0.1)


class Sampler:
    """Reads ``roles/primary`` (name and the lease it is on) ten times a second."""

    def __init__(self, fl: Farm) -> None:
        self.etcd = Etcd(fl.etcd_config())
        self.key = (PREFIX + "roles/primary").encode()
        self.samples: list[tuple[float, str, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=fl.in_client, args=(self._run,), daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                kv = self.etcd.get(self.key)
            except Exception:  # a member moving: the next sample
                continue
            name = kv.value.decode() if kv is not None else ""
            self.samples.append((time.monotonic(), name, kv.create_revision if kv else 0))
            time.sleep(0.1)

    def holders(self) -> list[str]:
        """The successive holders of the key ("" for none), each change once."""
        seen: list[str] = []
        for _, name, _ in self.samples:
            if not seen or seen[-1] != name:
                seen.append(name)
        return seen


def _partition(host: Host, etcd_addresses: list[str], *, heal: bool = False) -> None:
    op = "-D" if heal else "-A"
    for address in etcd_addresses:
        host.iptables(op, "OUTPUT", "-d", address, "-j", "DROP")
        host.iptables(op, "INPUT", "-s", address, "-j", "DROP")


def _pool_keys(fl: Farm) -> list[str]:
    store = EtcdStore(fl.etcd_config())
    kvs = fl.in_client(
        partial(store.etcd.get_prefix, keys_only=True), (PREFIX + "objects/").encode()
    )
    return [kv.key.decode() for kv in kvs]


def test_primary_sigkilled_then_partitioned_in_the_lab(farm, display):  # type: ignore[no-untyped-def]
    fl, bridge = farm
    sampler = Sampler(fl)
    sampler.thread.start()
    fl.wait(lambda: len(sampler.samples) > 0, "the first sample")

    long_fwd = _forwarder(fl, "gw1", 13389)
    fl.wait(lambda: "point an RDP client at" in fl.lab.log_of(long_fwd).read_text(), "forwarder")
    long_rdp = _xfreerdp(fl, display, 13389, auth_only=False)  # a whole session, kept open
    fl.wait(lambda: bridge.connections >= 1, "the long session reaches the RDP host", 60)

    loop = Loop(fl, display)
    loop.start()
    try:
        loop.wait_ok(4)
        killed_at = time.monotonic()
        fl.kill("broker1")  # SIGKILL the primary while clients log in and launch
        failed_before = len(loop.failed)
        loop.wait_ok(len(loop.ok) + 4)
    finally:
        loop.join()
    after = [t - killed_at for t in loop.ok if t > killed_at]
    since = len(loop.failed) - failed_before
    print(f"first login after the SIGKILL: {after[0]:.2f} s; rounds {len(loop.ok)}, failed "
          f"{len(loop.failed)} ({since} after the kill)")  # fmt: skip
    assert len(loop.failed) <= len(GATEWAYS), loop.failed  # at most the rounds in flight
    assert long_rdp.poll() is None, fl.lab.log_tail(long_rdp)  # the long session runs on
    assert long_fwd.poll() is None, fl.lab.log_tail(long_fwd)

    # every ticket redeemed exactly once: one key in etcd per tunnel that reached the RDP host
    store = EtcdStore(fl.etcd_config())
    tickets = fl.in_client(
        partial(store.etcd.get_prefix, keys_only=True), (PREFIX + "tickets/").encode()
    )
    assert bridge.connections <= len(tickets) <= bridge.connections + len(loop.failed)
    assert len(tickets) >= len(loop.ok) + 1

    # admin writes: none while there is no primary, then back once broker2 is promoted
    fl.wait(lambda: fl.primary_seen_by("broker2") == "", "broker1's lease ends", 30)
    with pytest.raises(AdminApiError) as info:
        fl.admin("broker2", "POST", "pools", {"name": "p1"})
    assert info.value.code == "no_primary"
    fl.admin("broker3", "POST", "brokers/broker2/promote")
    fl.wait(lambda: fl.primary_seen_by("broker3") == "broker2", "broker2 promoted", 30)
    fl.admin("broker2", "POST", "pools", {"name": "p1"})
    assert any(k.endswith("/p1") for k in _pool_keys(fl))

    # partition broker2, the primary now, from etcd; promote broker3; heal
    etcd_addresses = [fl.address(e) for e in ETCDS]
    _partition(fl.hosts["broker2"], etcd_addresses)
    try:
        fl.wait(lambda: fl.primary_seen_by("broker3") == "", "broker2's lease ends", 30)
        fl.admin("broker3", "POST", "brokers/broker3/promote")
        fl.wait(lambda: fl.primary_seen_by("broker3") == "broker3", "broker3 promoted", 30)
        with pytest.raises(
            (AdminApiError, OSError)
        ):  # cut off: broker2 cannot write, whatever it believes
            fl.admin("broker2", "POST", "pools", {"name": "p-cut-off"})
    finally:
        _partition(fl.hosts["broker2"], etcd_addresses, heal=True)
    with pytest.raises(AdminApiError) as info:  # healed: its late write is refused too
        fl.admin("broker2", "POST", "pools", {"name": "p-late"})
    print(f"broker2's write right after healing: {info.value.code} ({info.value})")
    stepped_down = ("lost the primary role name=broker2", "broker role=secondary name=broker2")
    fl.wait(lambda: any(s in fl.log("broker2") for s in stepped_down), "broker2 steps down")
    keys = _pool_keys(fl)
    assert not [k for k in keys if k.endswith(("/p-cut-off", "/p-late"))], keys
    fl.admin("broker3", "POST", "pools", {"name": "p3"})
    fl.wait(lambda: any(k.endswith("/p3") for k in _pool_keys(fl)), "broker3 writes")

    sampler.stop.set()
    sampler.thread.join(10)
    # one primary at every instant: the key held by broker1, nobody, broker2, nobody, broker3,
    # each holding on its own create revision (a new lease: never two holders on one)
    assert sampler.holders() == ["broker1", "", "broker2", "", "broker3"], sampler.holders()
    revisions = {(name, rev) for _, name, rev in sampler.samples if name}
    assert len(revisions) == 3, revisions
    assert long_rdp.poll() is None, fl.lab.log_tail(long_rdp)  # still not cut
    long_rdp.kill()
    long_fwd.kill()
