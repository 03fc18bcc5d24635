"""An ACME lab: a farm in network namespaces with a real pebble as its ACME CA.

Hosts: ``broker`` (admin API, the ACME client), ``gw1`` and ``gw2`` (normal gateways, each
with its own public certificate files, plain port 8080, TLS port 8443), ``h1`` (a `ras halb`
holding the VIP, fronting the gateways' plain port 8080 with ``acme = true`` and a TLS offload
listener on 9443, connected to the broker), ``rdp`` (an echo server and its agent),
``client``, and ``acme``: pebble and pebble-challtestsrv (``../shared/notes/acme-pebble.md``).

Name resolution for pebble's validator is the challenge test server's DNS, set per name with
``add-a`` (``gw1.farm.test`` -> gw1, ``farm.test`` -> the VIP); no system file is touched.
pebble validates HTTP-01 on port 8080 (``httpPort``), the gateways' and the VIP's plain port.
Pebble makes a new root at each start; ``root`` holds the current one (``/roots/0``).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ras.lab import Host, Lab
from ras.lab.farmlab import start_echo_server
from ras.lab.roles import (
    RAS,
    LabFarm,
    Ports,
    Vip,
    agent_config,
    broker_config,
    normal_gateway_config,
)

PORTS = Ports(plain=8080, tls=8443, rdp=3389)
OFFLOAD_PORT = 9443
PEBBLE_PORT = 14000
PEBBLE_MGMT = 15000
DNS_PORT = 8053
CHALL_MGMT = 8055
VRID = 61
ECHO_PORT = 3389
USER, PASSWORD = "alice", "acme lab password"


@dataclass(kw_only=True)
class AcmeLab(LabFarm):
    vip: str
    validity_s: int = 3600
    root: Path = field(default=Path())
    pebble_log: Path = field(default=Path())

    def holders(self) -> list[str]:
        return self.holders_of("vip")

    @property
    def acme(self) -> Host:
        return self.hosts["acme"]

    @property
    def directory(self) -> str:
        return f"https://{self.acme.address}:{PEBBLE_PORT}/dir"

    # -- pebble ---------------------------------------------------------------------------

    def start_pebble(self, validity_s: int | None = None) -> None:
        """(Re)start pebble; a new root, fetched into ``root``."""
        if validity_s is not None:
            self.validity_s = validity_s
        if "pebble" in self.procs and self.procs["pebble"].poll() is None:
            self.kill("pebble")
        cert, key = self.pki.ensure("pebble", [str(self.acme.address), "localhost", "127.0.0.1"])
        conf = self.tmp / "pebble.json"
        conf.write_text(
            json.dumps(
                {
                    "pebble": {
                        "listenAddress": f"0.0.0.0:{PEBBLE_PORT}",
                        "managementListenAddress": f"127.0.0.1:{PEBBLE_MGMT}",
                        "certificate": str(cert),
                        "privateKey": str(key),
                        "httpPort": PORTS.plain,
                        "tlsPort": 5001,
                        "ocspResponderURL": "",
                        "externalAccountBindingRequired": False,
                        "certificateValidityPeriod": self.validity_s,
                    }
                }
            )
        )
        env = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
        self.procs["pebble"] = self.acme.popen(
            ["pebble", "-config", str(conf), "-dnsserver", f"127.0.0.1:{DNS_PORT}"], env=env
        )
        self.killed.discard("pebble")
        self.pebble_log = self.lab.log_of(self.procs["pebble"])
        self.wait(self._fetch_root, "pebble serves its root", timeout=20)

    def _fetch_root(self) -> bool:
        done = self.acme.run(
            ["curl", "-sf", "--cacert", str(self.pki.ca_path),
             f"https://127.0.0.1:{PEBBLE_MGMT}/roots/0"],
            check=False,
        )  # fmt: skip
        if done.returncode != 0 or "BEGIN CERTIFICATE" not in done.stdout:
            return False
        self.root = self.tmp / f"pebble-root-{time.monotonic_ns()}.pem"
        self.root.write_text(done.stdout)
        return True

    def resolve(self, name: str, address: str) -> None:
        """pebble's validator finds ``name`` at ``address``."""
        self.acme.run(
            ["curl", "-sf", "-X", "POST", "-d",
             json.dumps({"host": name, "addresses": [address]}),
             f"http://127.0.0.1:{CHALL_MGMT}/add-a"],
        )  # fmt: skip

    # -- the admin API --------------------------------------------------------------------

    def admin(self, *args: str, check: bool = True, timeout: float = 120.0) -> str:
        """``ras admin --json ARGS`` in the broker host, with the admin certificate."""
        cert, key = self.pki.ensure("admin")
        done = self.hosts["broker"].run(
            [*RAS, "admin", "--url", f"https://{self.hosts['broker'].address}:20443", "--ca-file",
             str(self.pki.ca_path), "--cert", str(cert), "--key", str(key), "--json", *args],
            check=False,
            timeout=timeout,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(
                f"ras admin {shlex.join(args)} exited {done.returncode}: {done.stderr}\n"
                + self.log("broker")[-3000:]
            )
        return done.stdout

    def certificate(self) -> dict[str, object]:
        return json.loads(self.admin("cert", "show"))  # type: ignore[no-any-return]

    # -- what clients see -----------------------------------------------------------------

    def served(self, address: str, port: int, name: str, *, root: Path | None = None) -> str:
        """The certificate ``address:port`` presents (``openssl s_client`` from the client
        host, verified against pebble's root for ``name``): its PEM; AssertionError if it
        does not verify."""
        done = self.hosts["client"].run(
            ["openssl", "s_client", "-connect", f"{address}:{port}", "-servername", name,
             "-verify_hostname", name, "-CAfile", str(root or self.root),
             "-verify_return_error", "-showcerts"],
            check=False,
            input="",
            timeout=20,
        )  # fmt: skip
        if done.returncode != 0 or "Verify return code: 0 (ok)" not in done.stdout:
            raise AssertionError(
                f"{address}:{port} for {name}: s_client exited {done.returncode}\n"
                + done.stdout[-1500:]
                + done.stderr[-1500:]
            )
        start = done.stdout.index("-----BEGIN CERTIFICATE-----")
        end = done.stdout.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
        return done.stdout[start:end] + "\n"

    def http_status(self, address: str, path: str, host: str) -> int:
        done = self.hosts["client"].run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Host: {host}",
             f"http://{address}:{PORTS.plain}{path}"],
            check=False,
        )  # fmt: skip
        return int(done.stdout or 0)


def _broker_extra(fl: AcmeLab) -> str:
    return f"""admin_enabled = true
admin_listen_host = "0.0.0.0"
admin_cert_names = ["admin"]
acme_directory = "{fl.directory}"
acme_ca_file = "{fl.pki.ca_path}"
acme_retry_min_s = 2
acme_retry_max_s = 4
acme_order_timeout_s = 60
"""


def _halb_config(fl: AcmeLab) -> Path:
    cert, key = fl.pki.ensure_self_signed("h1-offload", [fl.vip])
    cert_h, key_h = fl.pki.ensure("h1")
    gateways = "".join(
        f'\n[[gateways]]\nname = "{g}"\nhost = "{fl.hosts[g].address}"\n' for g in ("gw1", "gw2")
    )
    path = fl.tmp / "h1.toml"
    path.write_text(f"""
name = "h1"
interface = "eth0"
vips = ["{fl.vip}/{fl.lab.subnet.prefixlen}"]
vrid = {VRID}
priority = 150
advert_interval_s = 0.1
health_port = {PORTS.plain}
health_interval_s = 0.2
health_timeout_s = 0.5
rise = 2
fall = 2
connect_timeout_s = 2
broker_host = "{fl.hosts["broker"].address}"
broker_port = {PORTS.broker_gateways}
broker_poll_interval_s = 1
cert_file = "{cert_h}"
key_file = "{key_h}"
ca_file = "{fl.pki.ca_path}"

[[services]]
listen_port = {PORTS.plain}
backend_port = {PORTS.plain}
acme = true

[[services]]
listen_port = {PORTS.tls}
backend_port = {PORTS.tls}

[[services]]
listen_port = {OFFLOAD_PORT}
backend_port = {PORTS.plain}
tls_cert_file = "{cert}"
tls_key_file = "{key}"
{gateways}""")
    return path


def build(lab: Lab, tmp: Path) -> AcmeLab:
    """Start everything and return once the VIP serves and the HALB is connected to the
    broker."""
    lab.add_hosts("client", "broker", "acme", "rdp", "gw1", "gw2", "h1")
    vip = str(lab.spare_address())
    fl = AcmeLab(lab=lab, tmp=tmp, vip=vip, hosts=dict(lab.hosts))
    fl.vips["vip"] = Vip(vip, lab.subnet.prefixlen, {"h1": "eth0"})
    fl.pki.init_ca()
    # pebble's DNS: the challenge test server, every name unknown until added
    fl.start(
        "challtestsrv",
        ["pebble-challtestsrv", "-management", f"127.0.0.1:{CHALL_MGMT}",
         "-dns01", f"127.0.0.1:{DNS_PORT}", "-http01", "", "-https01", "", "-tlsalpn01", "",
         "-defaultIPv4", "", "-defaultIPv6", ""],
        host="acme",
    )  # fmt: skip
    fl.start_pebble()
    broker = str(fl.hosts["broker"].address)
    conf = broker_config(
        tmp / "broker.toml", name="broker", pki=fl.pki, address=broker, ports=PORTS,
        users={USER: PASSWORD},
    )  # fmt: skip
    text = conf.read_text().replace("admin_enabled = false\n", _broker_extra(fl))
    conf.write_text(text)
    fl.start_ras("broker", "broker", conf)
    start_echo_server(fl.hosts["rdp"], ECHO_PORT)
    agent = agent_config(
        tmp / "agent.toml", name="rdp1", pki=fl.pki, rdp=(str(fl.hosts["rdp"].address),
        ECHO_PORT), broker=broker, ports=PORTS,
    )  # fmt: skip
    fl.start_ras("agent", "agent", agent, host="rdp")
    for name in ("gw1", "gw2"):
        conf = normal_gateway_config(
            tmp / f"{name}.toml", name=name, pki=fl.pki, address=str(fl.hosts[name].address),
            public=fl.pki.ensure_self_signed(f"{name}-public", ["farm.test"]),
            public_name="farm.test", broker=broker, ports=PORTS, trusted=[str(lab.subnet)],
            rdp_lb=False,
        )  # fmt: skip
        fl.start_ras(name, "gateway", conf)
    fl.wait(lambda: all(f"gateway online name={g} " in fl.log("broker") for g in ("gw1", "gw2")),
            "both gateways registered")  # fmt: skip
    fl.start_ras("h1", "halb", _halb_config(fl))
    fl.wait(lambda: fl.holders() == ["h1"], "h1 holds the VIP")
    fl.wait(lambda: "halb connected name=h1" in fl.log("broker"), "the HALB's broker link")
    fl.wait(lambda: "agent registered host=rdp1 " in fl.log("broker"), "the agent registered")
    return fl


def client_forwarder(fl: AcmeLab, name: str, listen_port: int) -> subprocess.Popen[bytes]:
    """``ras client launch desktop --listen`` in the client host, gateway SSL to gw1's TLS
    port trusting pebble's root for ``name``: each local connection is a tunnel."""
    conf = fl.tmp / "client.toml"
    password = fl.tmp / "user.password"
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)
    conf.write_text(f"""
server_host = "{fl.hosts["gw1"].address}"
server_port = {PORTS.tls}
server_name = "{name}"
mode = "gateway_ssl"
ca_file = "{fl.root}"
username = "{USER}"
resource = "desktop"
""")
    return fl.hosts["client"].popen(
        [*RAS, "client", "--config", str(conf), "--password-file", str(password), "launch",
         "desktop", "--listen", f"127.0.0.1:{listen_port}"],
    )  # fmt: skip
