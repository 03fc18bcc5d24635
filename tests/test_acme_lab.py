"""Let's Encrypt through the broker, against a real pebble, in a network-namespace lab
(tests/acmekit.py): the broker orders, pebble validates HTTP-01 by connecting to a gateway's
plain port and to the HALB's VIP, the certificate that comes back is what every gateway's TLS
port and the HALB's offload listener present (``openssl s_client`` against pebble's root);
renewal of a short-lived certificate replaces it under a tunnel that keeps carrying bytes; a
pebble stopped mid-order leaves the old certificate serving and a failure in the status; a
token nobody handed out is a 404 on every plain port.

One lab for the module (pebble, broker, two gateways, a HALB, an agent): the tests run in
order and each leaves the farm serving a valid certificate from the current pebble.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from acmekit import OFFLOAD_PORT, PORTS, AcmeLab, build, client_forwarder
from cryptography import x509
from labkit import require_lab

from ras.lab import Lab

pytestmark = pytest.mark.lab

GW1_NAME = "gw1.farm.test"
FARM_NAME = "farm.test"


@pytest.fixture(scope="module")
def acme(tmp_path_factory) -> Iterator[AcmeLab]:
    require_lab("pebble", "pebble-challtestsrv", "openssl", "curl")
    tmp = tmp_path_factory.mktemp("acme")
    with Lab(logdir=tmp / "logs") as lab:
        fl = build(lab, tmp)
        fl.resolve(GW1_NAME, str(fl.hosts["gw1"].address))
        fl.resolve(FARM_NAME, fl.vip)
        yield fl


def _serial(pem: str) -> int:
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


def _letsencrypt(fl: AcmeLab, name: str) -> dict[str, object]:
    out = fl.admin(
        "cert", "letsencrypt", "--name", name, "--email", "ops@farm.test", "--agree-tos",
        "--directory", fl.directory,
    )  # fmt: skip
    return json.loads(out)  # type: ignore[no-any-return]


def _presents(fl: AcmeLab, address: str, port: int, name: str, serial: int) -> bool:
    """Whether ``address:port`` presents ``serial`` for ``name`` now (not yet: False)."""
    try:
        return _serial(fl.served(address, port, name)) == serial
    except AssertionError:  # not listening yet, or still the previous certificate's chain
        return False


def _everywhere(fl: AcmeLab, name: str, serial: int, timeout: float = 20.0) -> None:
    """Every gateway's TLS port and the HALB's offload listener present ``serial`` for
    ``name``, verified against pebble's root."""
    places = [(str(fl.hosts[g].address), PORTS.tls) for g in ("gw1", "gw2")]
    places.append((fl.vip, OFFLOAD_PORT))
    for address, port in places:
        fl.wait(
            lambda a=address, p=port: _presents(fl, a, p, name, serial),
            f"{address}:{port} presents serial {serial:x}",
            timeout=timeout,
        )


def test_http_01_to_a_gateway_plain_port_and_served_everywhere(acme: AcmeLab):
    before = len(acme.log("gw1"))
    shown = _letsencrypt(acme, GW1_NAME)
    assert shown["source"] == "letsencrypt"
    assert shown["sans"] == [f"DNS:{GW1_NAME}"]
    assert "pebble" in str(shown["issuer"]).lower()
    chain = acme.certificate()
    assert chain["chain_length"] == 2  # leaf and pebble's intermediate
    # pebble's validator fetched the token from gw1's plain port (three fetches per token)
    assert "acme challenge token=" in acme.log("gw1")[before:]
    assert "LetsEncrypt-Pebble-VA" not in acme.log("broker")
    serial = int(str(shown["serial"]), 16)
    _everywhere(acme, GW1_NAME, serial)
    # the token was withdrawn once the authorization was valid
    assert "acme challenge withdrawn token=" in acme.log("gw1")[before:]


def test_http_01_to_the_halb_vip_in_front_of_two_gateways(acme: AcmeLab):
    halb_before = len(acme.log("h1"))
    shown = _letsencrypt(acme, FARM_NAME)
    assert shown["sans"] == [f"DNS:{FARM_NAME}"]
    log = acme.log("h1")[halb_before:]
    assert "acme challenge token=" in log  # the HALB answered on the VIP itself
    _everywhere(acme, FARM_NAME, int(str(shown["serial"]), 16))


def test_an_unknown_token_is_a_404_on_every_plain_port(acme: AcmeLab):
    places = [str(acme.hosts[g].address) for g in ("gw1", "gw2")] + [acme.vip]
    for address in places:
        for host in ("unknown.example.org", FARM_NAME):
            status = acme.http_status(address, "/.well-known/acme-challenge/nosuchtoken", host)
            assert status == 404, (address, host)
    # anything else on a gateway's plain port is the redirect to HTTPS, also through the VIP
    assert acme.http_status(acme.vip, "/", FARM_NAME) == 301


def test_pebble_stopped_mid_order_leaves_the_old_certificate_and_a_visible_failure(
    acme: AcmeLab,
):
    name = FARM_NAME
    if acme.certificate().get("sans") != [f"DNS:{name}"]:
        _letsencrypt(acme, name)
    root = acme.root
    serial = _serial(acme.served(acme.vip, OFFLOAD_PORT, name))
    # Hold pebble's validation: the HALB drops pebble's connections to the VIP's port 80.
    h1 = acme.hosts["h1"]
    rule = ["INPUT", "-p", "tcp", "--dport", str(PORTS.plain), "-s", str(acme.acme.address),
            "-j", "DROP"]  # fmt: skip
    h1.iptables("-I", *rule)
    try:
        answer = json.loads(acme.admin("cert", "renew", "--no-wait"))
        attempt = answer["attempt"]
        acme.wait(
            lambda: (
                _renewal(acme).get("stage") == "validating"
                and _renewal(acme).get("attempts") == attempt
            ),
            "the order waits for validation",
        )
        acme.kill("pebble")  # mid-order
        acme.wait(lambda: _renewal(acme).get("state") == "failed", "the attempt failed", 90)
    finally:
        h1.iptables("-D", *rule)
    renewal = _renewal(acme)
    assert "cannot reach the ACME CA" in str(renewal["last_error"])
    status = json.loads(acme.admin("status"))
    assert any("renewal failed" in w for w in status["warnings"]), status["warnings"]
    assert "acme order failed" in acme.log("broker")
    # the old certificate keeps serving, everywhere
    for address, port in [(str(acme.hosts["gw1"].address), PORTS.tls), (acme.vip, OFFLOAD_PORT)]:
        assert _serial(acme.served(address, port, name, root=root)) == serial
    # pebble back (a new root): the retry (2 s, then 4 s) gets a certificate without asking
    acme.start_pebble()
    acme.wait(lambda: _renewal(acme).get("state") == "idle", "a retry succeeded", 60)
    _everywhere(acme, name, int(str(acme.certificate()["serial"]), 16))
    assert json.loads(acme.admin("status"))["warnings"] == []


def test_gateways_and_the_halb_keep_the_last_certificate_while_the_broker_is_away(
    acme: AcmeLab,
):
    name = str(acme.certificate()["sans"][0]).removeprefix("DNS:")  # type: ignore[index]
    serial = int(str(acme.certificate()["serial"]), 16)
    acme.kill("broker")
    acme.kill("gw2")  # and a gateway restarts meanwhile: it has the certificate in its files
    acme.start_ras("gw2", "gateway", acme.tmp / "gw2.toml")
    gw2 = str(acme.hosts["gw2"].address)
    acme.wait(lambda: _presents(acme, gw2, PORTS.tls, name, serial), "gw2 serves", 20)
    assert _serial(acme.served(acme.vip, OFFLOAD_PORT, name)) == serial
    acme.start_ras("broker", "broker", acme.tmp / "broker.toml")
    acme.wait(
        lambda: (
            all(f"gateway online name={g} " in acme.log("broker") for g in ("gw1", "gw2"))
            and "halb connected name=h1" in acme.log("broker")
        ),
        "the gateways and the HALB back on the broker",
    )
    assert int(str(acme.certificate()["serial"]), 16) == serial  # from the broker's store


def _renewal(fl: AcmeLab) -> dict[str, object]:
    return fl.certificate().get("renewal") or {}  # type: ignore[return-value]


def test_a_short_lived_certificate_is_renewed_under_an_open_tunnel(acme: AcmeLab, tmp_path: Path):
    acme.start_pebble(validity_s=24)  # renewed every 16 s
    shown = _letsencrypt(acme, GW1_NAME)
    first = int(str(shown["serial"]), 16)
    _everywhere(acme, GW1_NAME, first)
    forwarder = client_forwarder(acme, GW1_NAME, 13389)
    client = acme.hosts["client"]
    acme.wait(lambda: _connects(client, 13389), "the client's forwarder listens")
    with contextlib.closing(client.socket()) as tunnel:
        tunnel.settimeout(10)
        tunnel.connect(("127.0.0.1", 13389))  # a tunnel through gw1's TLS port, to the echo
        assert _echo(tunnel, b"before renewal\n")
        deadline = time.monotonic() + 60
        while _serial(acme.served(str(acme.hosts["gw1"].address), PORTS.tls, GW1_NAME)) == first:
            assert time.monotonic() < deadline, "no renewal within 60 s"
            assert _echo(tunnel, b"while waiting\n")
            time.sleep(0.5)
        renewed = _serial(acme.served(str(acme.hosts["gw1"].address), PORTS.tls, GW1_NAME))
        assert _echo(tunnel, b"after renewal\n")  # the tunnel opened before carries on
    _everywhere(acme, GW1_NAME, renewed)
    assert acme.certificate()["renewal"]["attempts"] >= 2  # type: ignore[index]
    forwarder.kill()
    acme.start_pebble(validity_s=3600)
    _letsencrypt(acme, GW1_NAME)


def _connects(host, port: int) -> bool:
    try:
        with contextlib.closing(host.socket()) as sock:
            sock.settimeout(1)
            sock.connect(("127.0.0.1", port))
    except OSError:
        return False
    return True


def _echo(sock, data: bytes) -> bool:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            return False
        got += chunk
    return got == data
