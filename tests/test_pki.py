"""The farm PKI, checked against an outside peer (the ``openssl`` command) and over real TLS.

Certificates we make must verify with ``openssl verify``, carry the extensions ``openssl x509``
reports, and pass mutual TLS with trio; files ``openssl`` makes (RSA keys, encrypted keys,
PFX) must import. Keys are EC P-256 except where ``openssl`` makes them, so the file is fast.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import ssl
import stat
import subprocess
import warnings
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ras.cli.pki import add_parser
from ras.errors import PKIError
from ras.pki import (
    FarmPKI,
    KeyPair,
    client_context,
    create_ca,
    describe,
    export_pfx,
    import_pem,
    import_pfx,
    issue_certificate,
    make_csr,
    peer_name,
    self_signed_certificate,
    server_context,
    split_chain,
)

DER = serialization.Encoding.DER
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


def openssl(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    proc = subprocess.run(
        [OPENSSL, *map(str, args)], capture_output=True, text=True, check=False, timeout=30
    )
    if check and proc.returncode != 0:
        pytest.fail(f"openssl {' '.join(map(str, args))} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def save(directory: Path, name: str, pair: KeyPair) -> tuple[Path, Path]:
    return write(directory / f"{name}.pem", pair.cert_pem), write(
        directory / f"{name}.key", pair.key_pem
    )


def cert_of(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def same_key(pair: KeyPair, key_pem: bytes) -> bool:
    def spki(pem: bytes) -> bytes:
        key = serialization.load_pem_private_key(pem, None)
        return key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    return spki(pair.key_pem) == spki(key_pem)


@pytest.fixture(scope="module")
def ca() -> KeyPair:
    return create_ca()


@pytest.fixture(scope="module")
def other_ca() -> KeyPair:
    return create_ca("Some Other CA")


@pytest.fixture(scope="module")
def rsa_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An RSA key and self-signed certificate made by openssl, as separate PEM files."""
    if OPENSSL is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("rsa")
    key, cert = d / "key.pem", d / "cert.pem"
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
        "-subj", "/CN=portal.example.com", "-days", "2",
    )  # fmt: skip
    return key, cert


# --- certificates checked by openssl ------------------------------------------------------


@pytest.mark.peers
@needs_openssl
def test_issued_certificate_verifies_for_server_and_client_use(
    tmp_path: Path, ca: KeyPair, other_ca: KeyPair
) -> None:
    ca_pem = write(tmp_path / "ca.pem", ca.cert_pem)
    leaf, _ = save(tmp_path, "gw1", issue_certificate(ca, "gw1", sans=["gw1.example.com"]))
    for purpose in ("sslserver", "sslclient"):
        out = openssl("verify", "-x509_strict", "-purpose", purpose, "-CAfile", ca_pem, leaf).stdout
        assert out.strip().endswith("OK")
    stranger, _ = save(tmp_path, "stranger", issue_certificate(other_ca, "gw1"))
    refused = openssl("verify", "-CAfile", ca_pem, stranger, check=False)
    assert refused.returncode != 0
    assert "unable to get local issuer certificate" in refused.stdout + refused.stderr


@pytest.mark.peers
@needs_openssl
def test_issued_certificate_extensions(tmp_path: Path, ca: KeyPair) -> None:
    pair = issue_certificate(ca, "gw1", sans=["gw1.example.com", "10.0.0.5", "::1", "gw1"])
    leaf, _ = save(tmp_path, "gw1", pair)
    out = openssl(
        "x509", "-in", leaf, "-noout", "-subject", "-ext",
        "subjectAltName,extendedKeyUsage,basicConstraints,keyUsage,"
        "subjectKeyIdentifier,authorityKeyIdentifier",
    ).stdout  # fmt: skip
    assert "CN = gw1" in out
    assert "DNS:gw1, DNS:gw1.example.com, IP Address:10.0.0.5, IP Address:0:0:0:0:0:0:0:1" in out
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in out
    assert "CA:FALSE" in out
    assert "Digital Signature" in out
    assert "Certificate Sign" not in out
    assert "Subject Key Identifier" in out
    assert "Authority Key Identifier" in out


@pytest.mark.peers
@needs_openssl
def test_ca_extensions(tmp_path: Path, ca: KeyPair) -> None:
    ca_pem = write(tmp_path / "ca.pem", ca.cert_pem)
    out = openssl(
        "x509", "-in", ca_pem, "-noout", "-subject", "-ext",
        "basicConstraints,keyUsage,subjectKeyIdentifier",
    ).stdout  # fmt: skip
    assert "CN = RAS Farm CA" in out
    assert "X509v3 Basic Constraints: critical\n    CA:TRUE" in out
    assert "X509v3 Key Usage: critical\n    Certificate Sign, CRL Sign" in out
    assert "Subject Key Identifier" in out
    openssl("verify", "-CAfile", ca_pem, ca_pem)


@pytest.mark.peers
@needs_openssl
def test_self_signed_is_its_own_trust_anchor_for_openssl(tmp_path: Path) -> None:
    cert, _ = save(tmp_path, "gw", self_signed_certificate(["gw.example.com", "192.0.2.7"]))
    out = openssl("verify", "-purpose", "sslserver", "-CAfile", cert, cert).stdout
    assert out.strip().endswith("OK")
    ext = openssl("x509", "-in", cert, "-noout", "-ext", "subjectAltName,extendedKeyUsage").stdout
    assert "DNS:gw.example.com, IP Address:192.0.2.7" in ext
    assert "TLS Web Server Authentication" in ext


@pytest.mark.peers
@needs_openssl
def test_csr_verifies_and_signed_certificate_joins_its_key(tmp_path: Path, ca: KeyPair) -> None:
    csr_pem, key_pem = make_csr(["portal.example.com", "203.0.113.9"], organization="Lab")
    csr = write(tmp_path / "req.csr", csr_pem)
    out = openssl("req", "-verify", "-in", csr, "-noout", "-subject")
    assert "verify OK" in out.stdout + out.stderr
    assert "O = Lab, CN = portal.example.com" in out.stdout
    text = openssl("req", "-in", csr, "-noout", "-text").stdout
    assert "DNS:portal.example.com, IP Address:203.0.113.9" in text
    # An outside CA (openssl itself) signs it; the answer joins the key we kept.
    ca_pem, ca_key = save(tmp_path, "ca", ca)
    signed = tmp_path / "signed.pem"
    openssl(
        "x509", "-req", "-in", csr, "-CA", ca_pem, "-CAkey", ca_key, "-set_serial", "7",
        "-days", "2", "-copy_extensions", "copy", "-out", signed,
    )  # fmt: skip
    pair = import_pem(signed.read_bytes() + ca.cert_pem + key_pem)
    chain = split_chain(pair.cert_pem)
    assert [cert_of(c).serial_number for c in chain] == [7, cert_of(ca.cert_pem).serial_number]
    assert same_key(pair, key_pem)


@pytest.mark.peers
@needs_openssl
def test_an_outside_ca_without_key_identifier_can_issue(tmp_path: Path) -> None:
    ca_pem, ca_key = tmp_path / "outer.pem", tmp_path / "outer.key"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", ca_key, "-out", ca_pem, "-subj", "/CN=Outer CA", "-days", "2",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
        "-addext", "subjectKeyIdentifier=none", "-addext", "authorityKeyIdentifier=none",
    )  # fmt: skip
    outer = import_pem(ca_pem.read_bytes() + ca_key.read_bytes())
    leaf, _ = save(tmp_path, "gw1", issue_certificate(outer, "gw1"))
    openssl("verify", "-purpose", "sslserver", "-CAfile", ca_pem, leaf)
    assert (
        cert_of(leaf.read_bytes()).not_valid_after_utc
        == cert_of(ca_pem.read_bytes()).not_valid_after_utc
    )


# --- PKCS#12 both ways ----------------------------------------------------------------------


@pytest.mark.peers
@needs_openssl
@pytest.mark.parametrize("legacy", [False, True])
def test_export_pfx_is_read_by_openssl(tmp_path: Path, ca: KeyPair, legacy: bool) -> None:
    pair = issue_certificate(ca, "gw1")
    chained = KeyPair(cert_pem=pair.cert_pem + ca.cert_pem, key_pem=pair.key_pem)
    pfx = write(tmp_path / "out.pfx", export_pfx(chained, b"s3cret pw", legacy=legacy))
    out = openssl("pkcs12", "-in", pfx, "-passin", "pass:s3cret pw", "-nodes").stdout
    assert out.count("BEGIN CERTIFICATE") == 2
    assert "BEGIN PRIVATE KEY" in out
    assert "friendlyName: ras" in out
    back = import_pem(out.encode())
    assert split_chain(back.cert_pem) == split_chain(chained.cert_pem)
    assert same_key(back, pair.key_pem)
    wrong = openssl("pkcs12", "-in", pfx, "-passin", "pass:nope", "-nodes", check=False)
    assert wrong.returncode != 0


@pytest.mark.peers
@needs_openssl
def test_unencrypted_pfx_roundtrip(tmp_path: Path, ca: KeyPair) -> None:
    pair = issue_certificate(ca, "gw1")
    pfx = write(tmp_path / "out.pfx", export_pfx(pair, None))
    out = openssl("pkcs12", "-in", pfx, "-passin", "pass:", "-nodes").stdout
    assert "BEGIN PRIVATE KEY" in out
    assert import_pfx(pfx.read_bytes(), None) == pair


@pytest.mark.peers
@needs_openssl
def test_pfx_made_by_openssl_imports(tmp_path: Path, ca: KeyPair) -> None:
    pair = issue_certificate(ca, "gw1", sans=["gw1.example.com"])
    leaf, key = save(tmp_path, "gw1", pair)
    ca_pem = write(tmp_path / "ca.pem", ca.cert_pem)
    pfx = tmp_path / "gw1.pfx"
    openssl(
        "pkcs12", "-export", "-in", leaf, "-inkey", key, "-certfile", ca_pem,
        "-passout", "pass:pw", "-out", pfx, "-name", "gateway",
    )  # fmt: skip
    imported = import_pfx(pfx.read_bytes(), b"pw")
    assert split_chain(imported.cert_pem) == [pair.cert_pem, ca.cert_pem]
    assert same_key(imported, pair.key_pem)
    with pytest.raises(PKIError, match="wrong password"):
        import_pfx(pfx.read_bytes(), b"not the password")
    with pytest.raises(PKIError, match="needs a password"):
        import_pfx(pfx.read_bytes(), None)
    with pytest.raises(PKIError, match="not PKCS#12"):
        import_pfx(b"hello", b"pw")


# --- PEM bundles made by openssl --------------------------------------------------------------


@pytest.mark.peers
@needs_openssl
def test_import_pem_rsa_from_openssl_either_order(rsa_files: tuple[Path, Path]) -> None:
    key_path, cert_path = rsa_files
    key, cert = key_path.read_bytes(), cert_path.read_bytes()
    for bundle in (key + cert, cert + key):
        pair = import_pem(bundle)
        assert pair.cert_pem == cert_of(cert).public_bytes(serialization.Encoding.PEM)
        assert pair.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
        assert same_key(pair, key)
    assert describe(pair.cert_pem)["key"] == "RSA 2048"


@pytest.mark.peers
@needs_openssl
@pytest.mark.parametrize(
    ("how", "label"),
    [
        (["pkey", "-aes256"], b"ENCRYPTED PRIVATE KEY"),
        (["rsa", "-aes256", "-traditional"], b"RSA PRIVATE KEY"),
    ],
)
def test_import_pem_encrypted_key(
    tmp_path: Path, rsa_files: tuple[Path, Path], how: list[str], label: bytes
) -> None:
    key_path, cert_path = rsa_files
    enc = tmp_path / "enc.pem"
    openssl(*how, "-in", key_path, "-passout", "pass:hunter2", "-out", enc)
    assert b"-----BEGIN " + label in enc.read_bytes()
    bundle = cert_path.read_bytes() + enc.read_bytes()
    pair = import_pem(bundle, password=b"hunter2")
    assert same_key(pair, key_path.read_bytes())
    assert b"ENCRYPTED" not in pair.key_pem
    with pytest.raises(PKIError, match="encrypted and no password"):
        import_pem(bundle)
    with pytest.raises(PKIError, match="wrong password"):
        import_pem(bundle, password=b"hunter3")


@pytest.mark.peers
@needs_openssl
def test_import_pem_traditional_ec_key_with_parameters(tmp_path: Path, ca: KeyPair) -> None:
    key = tmp_path / "ec.key"
    openssl("ecparam", "-genkey", "-name", "prime256v1", "-out", key)
    assert b"BEGIN EC PARAMETERS" in key.read_bytes()
    assert b"BEGIN EC PRIVATE KEY" in key.read_bytes()
    cert = tmp_path / "ec.pem"
    openssl("req", "-new", "-x509", "-key", key, "-subj", "/CN=ec", "-days", "1", "-out", cert)
    pair = import_pem(key.read_bytes() + cert.read_bytes())
    assert describe(pair.cert_pem)["subject"] == "CN=ec"


def test_import_pem_orders_the_chain(ca: KeyPair) -> None:
    pair = issue_certificate(ca, "gw1")
    other = self_signed_certificate(["unrelated"])
    bundle = other.cert_pem + ca.cert_pem + pair.key_pem + pair.cert_pem + ca.cert_pem
    imported = import_pem(bundle)
    assert split_chain(imported.cert_pem) == [pair.cert_pem, ca.cert_pem, other.cert_pem]
    assert imported.key_pem == pair.key_pem


def test_import_pem_errors(ca: KeyPair) -> None:
    pair = issue_certificate(ca, "gw1")
    stranger = issue_certificate(ca, "gw2")
    with pytest.raises(PKIError, match="no private key found"):
        import_pem(pair.cert_pem + ca.cert_pem)
    with pytest.raises(PKIError, match="no certificate found"):
        import_pem(pair.key_pem)
    with pytest.raises(PKIError, match="matches none of the 2 certificates"):
        import_pem(stranger.key_pem + pair.cert_pem + ca.cert_pem)
    with pytest.raises(PKIError, match="2 private keys"):
        import_pem(pair.key_pem + stranger.key_pem + pair.cert_pem)
    with pytest.raises(PKIError, match="not a PEM file"):
        import_pem(b"\x30\x82\x01\x00garbage")
    broken = pair.cert_pem.replace(b"\n", b"\nAAAA", 2)
    with pytest.raises(PKIError, match="malformed"):
        import_pem(pair.key_pem + broken)


def test_key_is_not_in_repr(ca: KeyPair) -> None:
    assert b"PRIVATE" not in repr(ca).encode()
    assert "key_pem" not in repr(ca)


# --- describe, peer_name, bad input --------------------------------------------------------


def test_describe(ca: KeyPair) -> None:
    pair = issue_certificate(ca, "agent7", sans=["10.1.2.3"], valid_days=30)
    info = describe(pair.cert_pem)
    cert = cert_of(pair.cert_pem)
    assert info["subject"] == "CN=agent7"
    assert info["issuer"] == "CN=RAS Farm CA"
    assert info["sans"] == ["DNS:agent7", "IP:10.1.2.3"]
    assert info["is_ca"] is False
    assert describe(ca.cert_pem)["is_ca"] is True
    assert info["serial"] == format(cert.serial_number, "x")
    assert info["not_after"] == cert.not_valid_after_utc.isoformat()
    assert str(info["not_before"]).endswith("+00:00")
    assert info["extended_key_usage"] == ["serverAuth", "clientAuth"]
    fingerprint = str(info["sha256"])
    assert len(fingerprint.split(":")) == 32
    assert fingerprint.replace(":", "").lower() == cert.fingerprint(hashes.SHA256()).hex()


def test_leaf_never_outlives_its_ca() -> None:
    short_ca = create_ca(valid_days=10)
    leaf = cert_of(issue_certificate(short_ca, "gw1").cert_pem)
    assert leaf.not_valid_after_utc == cert_of(short_ca.cert_pem).not_valid_after_utc


def test_peer_name(ca: KeyPair) -> None:
    der = cert_of(issue_certificate(ca, "gateway-2").cert_pem).public_bytes(
        serialization.Encoding.DER
    )
    assert peer_name(der) == "gateway-2"
    with pytest.raises(PKIError, match="malformed"):
        peer_name(b"not a certificate")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda ca: issue_certificate(ca, ""), "common name is empty"),
        (lambda ca: issue_certificate(ca, "x" * 65), "longer than 64"),
        (lambda ca: issue_certificate(ca, "gw", sans=["bad name"]), "not a valid DNS name"),
        (lambda ca: issue_certificate(ca, "gw", valid_days=0), "at least 1"),
        (lambda ca: issue_certificate(issue_certificate(ca, "gw"), "x"), "not a CA"),
        (lambda ca: self_signed_certificate([]), "at least one name"),
        (lambda ca: self_signed_certificate("gw"), "list of at least one name"),
        (lambda ca: make_csr([]), "at least one name"),
        (lambda ca: export_pfx(ca, b""), "password is empty"),
    ],
)
def test_bad_input_is_pki_error(ca: KeyPair, call: object, match: str) -> None:
    with pytest.raises(PKIError, match=match):
        call(ca)  # type: ignore[operator]


def test_international_names_become_a_labels(ca: KeyPair) -> None:
    info = describe(issue_certificate(ca, "gw", sans=["bücher.example"]).cert_pem)
    assert info["sans"] == ["DNS:gw", "DNS:xn--bcher-kva.example"]


# --- FarmPKI: the directory ------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_farm_pki_creates_ca_once(tmp_path: Path) -> None:
    pki = FarmPKI(tmp_path / "pki")
    first = pki.init_ca("Lab CA")
    assert pki.ca_path == tmp_path / "pki" / "ca.pem"
    assert pki.ca_path.read_bytes() == first.cert_pem
    assert mode(pki.ca_key_path) == 0o600
    assert mode(tmp_path / "pki") == 0o700
    again = FarmPKI(tmp_path / "pki").init_ca("Another name")
    assert again == first
    assert describe(again.cert_pem)["subject"] == "CN=Lab CA"
    assert [p.name for p in (tmp_path / "pki").iterdir() if p.name.startswith(".")] == []


def test_farm_pki_refuses_a_half_ca(tmp_path: Path) -> None:
    pki = FarmPKI(tmp_path)
    pki.init_ca()
    pki.ca_path.unlink()
    key = pki.ca_key_path.read_bytes()
    with pytest.raises(PKIError, match=r"ca\.pem: missing.*not overwriting"):
        pki.init_ca()
    assert pki.ca_key_path.read_bytes() == key


def test_farm_pki_ensure_issues_keeps_and_reissues(tmp_path: Path) -> None:
    pki = FarmPKI(tmp_path)
    ca = pki.init_ca()
    cert_path, key_path = pki.ensure("agent1", ["10.0.0.8"])
    assert (cert_path, key_path) == (tmp_path / "agent1.pem", tmp_path / "agent1.key")
    assert mode(key_path) == 0o600
    first = cert_path.read_bytes()
    cert_of(first).verify_directly_issued_by(cert_of(ca.cert_pem))
    assert pki.ensure("agent1", ["10.0.0.8"]) == (cert_path, key_path)
    assert cert_path.read_bytes() == first  # fits: kept
    assert pki.ensure("agent1") == (cert_path, key_path)
    assert cert_path.read_bytes() == first  # fewer names still fit
    pki.ensure("agent1", ["10.0.0.9"])  # a new name: issued again
    assert describe(cert_path.read_bytes())["sans"] == ["DNS:agent1", "IP:10.0.0.9"]
    import_pem(key_path.read_bytes() + cert_path.read_bytes())  # pair matches
    # A certificate from another CA, or one whose key was lost, is replaced.
    save(tmp_path, "agent1", issue_certificate(create_ca(), "agent1"))
    pki.ensure("agent1")
    cert_of(cert_path.read_bytes()).verify_directly_issued_by(cert_of(ca.cert_pem))
    key_path.write_bytes(issue_certificate(ca, "x").key_pem)
    pki.ensure("agent1")
    import_pem(key_path.read_bytes() + cert_path.read_bytes())
    # Another daemon's certificate, even one naming agent1 among its SANs, is not agent1's.
    save(tmp_path, "agent1", issue_certificate(ca, "agent2", sans=["agent1"]))
    pki.ensure("agent1")
    assert peer_name(cert_of(cert_path.read_bytes()).public_bytes(DER)) == "agent1"


def test_farm_pki_ensure_creates_the_ca_when_missing(tmp_path: Path) -> None:
    pki = FarmPKI(tmp_path / "new")
    cert_path, _ = pki.ensure("broker")
    assert pki.ca_path.exists()
    assert describe(cert_path.read_bytes())["issuer"] == "CN=RAS Farm CA"


@pytest.mark.parametrize("name", ["../evil", "ca", "a/b", "", ".hidden"])
def test_farm_pki_rejects_names_unfit_for_files(tmp_path: Path, name: str) -> None:
    with pytest.raises(PKIError, match="cannot name a certificate file"):
        FarmPKI(tmp_path).ensure(name)


def test_farm_pki_self_signed_is_kept_and_imported_never_replaced(
    tmp_path: Path, ca: KeyPair
) -> None:
    pki = FarmPKI(tmp_path)
    cert_path, key_path = pki.ensure_self_signed("gateway", ["gw.example.com"])
    first = cert_path.read_bytes()
    assert describe(first)["issuer"] == describe(first)["subject"] == "CN=gw.example.com"
    assert mode(key_path) == 0o600
    pki.ensure_self_signed("gateway", ["gw.example.com"])
    assert cert_path.read_bytes() == first
    pki.ensure_self_signed("gateway", ["gw.example.com", "gw2.example.com"])
    assert describe(cert_path.read_bytes())["sans"] == ["DNS:gw.example.com", "DNS:gw2.example.com"]
    imported = issue_certificate(ca, "portal.example.com")
    save(tmp_path, "gateway", imported)
    pki.ensure_self_signed("gateway", ["gw.example.com"])
    assert cert_path.read_bytes() == imported.cert_pem
    key_path.unlink()
    with pytest.raises(PKIError, match=r"not self-signed.*not replacing"):
        pki.ensure_self_signed("gateway", ["gw.example.com"])
    assert cert_path.read_bytes() == imported.cert_pem


# --- TLS: contexts and mutual TLS over trio ---------------------------------------------------


@pytest.fixture
def farm(tmp_path: Path) -> FarmPKI:
    pki = FarmPKI(tmp_path / "farm")
    pki.init_ca()
    pki.ensure("broker", ["127.0.0.1"])
    pki.ensure("agent1")
    return pki


def files(pki: FarmPKI, name: str) -> tuple[Path, Path]:
    return pki.paths(name)


def broker_server_context(farm: FarmPKI) -> ssl.SSLContext:
    cert, key = files(farm, "broker")
    return server_context(cert, key, client_ca_file=farm.ca_path)


Memory = trio.StapledStream[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]
TLS = trio.SSLStream[Memory]


async def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str = "broker"
) -> dict[str, TLS | Exception]:
    """Both sides of a TLS handshake over memory streams: each side's stream or its error."""
    client_raw, server_raw = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_raw, server_ctx, server_side=True)
    client = trio.SSLStream(client_raw, client_ctx, server_hostname=hostname)
    results: dict[str, TLS | Exception] = {}

    async def side(name: str, stream: TLS) -> None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            results[name] = exc
            await stream.transport_stream.aclose()  # the other side sees EOF, never hangs
        else:
            results[name] = stream

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, "server", server)
            nursery.start_soon(side, "client", client)
    return results


def ssl_reason(result: object) -> str | None:
    assert isinstance(result, trio.BrokenResourceError), result
    assert isinstance(result.__cause__, ssl.SSLError)
    return result.__cause__.reason


async def test_mutual_tls_accepts_a_farm_client_and_names_it(farm: FarmPKI) -> None:
    cert, key = files(farm, "agent1")
    client_ctx = client_context(farm.ca_path, cert_file=cert, key_file=key)
    results = await handshake(broker_server_context(farm), client_ctx)
    server, client = results["server"], results["client"]
    assert isinstance(server, trio.SSLStream)
    assert isinstance(client, trio.SSLStream)
    assert peer_name(server.getpeercert(binary_form=True)) == "agent1"
    assert peer_name(client.getpeercert(binary_form=True)) == "broker"
    await client.send_all(b"hello")
    assert await server.receive_some() == b"hello"


@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_negotiated_protocol_and_cipher(farm: FarmPKI, maximum: ssl.TLSVersion) -> None:
    cert, key = files(farm, "agent1")
    client_ctx = client_context(farm.ca_path, cert_file=cert, key_file=key)
    client_ctx.maximum_version = maximum
    server = (await handshake(broker_server_context(farm), client_ctx))["server"]
    assert isinstance(server, trio.SSLStream)
    cipher = server.cipher()
    assert cipher is not None
    if maximum == ssl.TLSVersion.TLSv1_2:
        assert server.version() == "TLSv1.2"
        assert cipher[0].startswith("ECDHE-")
        assert "GCM" in cipher[0] or "CHACHA20" in cipher[0]
    else:
        assert server.version() == "TLSv1.3"
    assert server.compression() is None


async def test_mutual_tls_refuses_a_client_without_certificate(farm: FarmPKI) -> None:
    results = await handshake(broker_server_context(farm), client_context(farm.ca_path))
    assert ssl_reason(results["server"]) == "PEER_DID_NOT_RETURN_A_CERTIFICATE"


async def test_mutual_tls_refuses_a_client_from_another_ca(farm: FarmPKI, tmp_path: Path) -> None:
    cert, key = save(tmp_path, "agent1", issue_certificate(create_ca(), "agent1"))
    client_ctx = client_context(farm.ca_path, cert_file=cert, key_file=key)
    results = await handshake(broker_server_context(farm), client_ctx)
    assert ssl_reason(results["server"]) == "CERTIFICATE_VERIFY_FAILED"


async def test_a_client_refuses_a_server_from_another_ca(farm: FarmPKI, tmp_path: Path) -> None:
    cert, key = save(tmp_path, "broker", issue_certificate(create_ca(), "broker"))
    results = await handshake(server_context(cert, key), client_context(farm.ca_path))
    assert ssl_reason(results["client"]) == "CERTIFICATE_VERIFY_FAILED"


def old_client(farm: FarmPKI, version: ssl.TLSVersion, ciphers: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(farm.ca_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is, rightly
        ctx.minimum_version = version
        ctx.maximum_version = version
    ctx.set_ciphers(ciphers)
    return ctx


async def test_tls_1_1_client_is_refused(farm: FarmPKI) -> None:
    client_ctx = old_client(farm, ssl.TLSVersion.TLSv1_1, "DEFAULT:@SECLEVEL=0")
    results = await handshake(broker_server_context(farm), client_ctx)
    assert ssl_reason(results["server"]) == "UNSUPPORTED_PROTOCOL"


async def test_tls_1_2_cbc_cipher_is_refused(farm: FarmPKI) -> None:
    client_ctx = old_client(farm, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA")
    results = await handshake(broker_server_context(farm), client_ctx)
    assert ssl_reason(results["server"]) == "NO_SHARED_CIPHER"


@pytest.mark.parametrize("strict", [False, True])
async def test_self_signed_certificate_is_its_own_trust_anchor(
    tmp_path: Path, strict: bool
) -> None:
    cert, key = save(tmp_path, "gw", self_signed_certificate(["gw.example.com", "192.0.2.7"]))
    client_ctx = client_context(cert)
    if strict:  # Python 3.13's default contexts verify this way
        client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    for hostname in ("gw.example.com", "192.0.2.7"):
        results = await handshake(server_context(cert, key), client_ctx, hostname)
        assert isinstance(results["client"], trio.SSLStream), results
    results = await handshake(server_context(cert, key), client_ctx, "other.example.com")
    assert ssl_reason(results["client"]) == "CERTIFICATE_VERIFY_FAILED"
    loose = client_context(cert, check_hostname=False)
    results = await handshake(server_context(cert, key), loose, "other.example.com")
    assert isinstance(results["client"], trio.SSLStream), results


async def test_mutual_tls_over_tcp(farm: FarmPKI) -> None:
    names: list[str] = []

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.do_handshake()
        names.append(peer_name(stream.getpeercert(binary_form=True)))
        await stream.send_all(names[-1].encode())
        await stream.aclose()

    cert, key = files(farm, "agent1")
    client_ctx = client_context(farm.ca_path, cert_file=cert, key_file=key)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_ssl_over_tcp, host="127.0.0.1")
            listeners = await nursery.start(serve, handler, 0, broker_server_context(farm))
            port = listeners[0].transport_listener.socket.getsockname()[1]
            stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=client_ctx)
            assert await stream.receive_some() == b"agent1"
            await stream.aclose()
            nursery.cancel_scope.cancel()
    assert names == ["agent1"]


def test_contexts_report_bad_files_as_pki_error(tmp_path: Path, ca: KeyPair) -> None:
    cert, key = save(tmp_path, "gw", issue_certificate(ca, "gw"))
    _, other_key = save(tmp_path, "other", issue_certificate(ca, "other"))
    with pytest.raises(PKIError, match="no such file"):
        server_context(tmp_path / "missing.pem", key)
    with pytest.raises(PKIError, match="do not match"):
        server_context(cert, other_key)
    with pytest.raises(PKIError, match="no such file"):
        client_context(tmp_path / "missing-ca.pem")
    with pytest.raises(PKIError, match="cannot load the CA"):
        client_context(write(tmp_path / "junk.pem", b"junk"))
    ctx = server_context(cert, key)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.verify_mode == ssl.CERT_NONE
    assert server_context(cert, key, client_ca_file=cert).verify_mode == ssl.CERT_REQUIRED


# --- the CLI handlers -----------------------------------------------------------------------


def run_cli(*argv: str | Path) -> int:
    parser = argparse.ArgumentParser(prog="ras")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    result = args.func(args)
    assert isinstance(result, int)
    return result


def test_cli_init_issue_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "pki"
    assert run_cli("pki", "issue", "gw1", "--dir", d) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no farm CA" in err
    assert str(d) in err
    assert run_cli("pki", "init", "--dir", d, "--cn", "Lab CA") == 0
    assert "created" in capsys.readouterr().out
    assert run_cli("pki", "init", "--dir", d) == 0
    assert "existing" in capsys.readouterr().out
    assert run_cli("pki", "issue", "gw1", "--dir", d, "--san", "10.0.0.1", "--san", "gw1.lab") == 0
    out = capsys.readouterr().out
    assert "DNS:gw1, IP:10.0.0.1, DNS:gw1.lab" in out
    assert "PRIVATE" not in out
    assert run_cli("pki", "show", d / "gw1.pem") == 0
    out = capsys.readouterr().out
    assert "subject: CN=gw1" in out
    assert "issuer: CN=Lab CA" in out
    assert "is ca: False" in out
    assert "extended key usage: serverAuth, clientAuth" in out


def test_cli_default_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli("pki", "init") == 0
    assert (tmp_path / "state" / "pki" / "ca.pem").exists()


def test_cli_self_signed_csr_export_import(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = tmp_path / "gw.pem", tmp_path / "gw.key"
    assert run_cli("pki", "self-signed", "gw.example.com", "192.0.2.1", "--out-cert", cert,
                   "--out-key", key) == 0  # fmt: skip
    assert mode(key) == 0o600
    assert describe(cert.read_bytes())["sans"] == ["DNS:gw.example.com", "IP:192.0.2.1"]
    # An existing output is not replaced without --force.
    assert run_cli("pki", "self-signed", "x", "--out-cert", cert, "--out-key", key) == 2
    assert "--force" in capsys.readouterr().err
    assert run_cli("pki", "csr", "portal.example.com", "--org", "Lab", "--out-csr",
                   tmp_path / "req.csr", "--out-key", tmp_path / "req.key") == 0  # fmt: skip
    csr = x509.load_pem_x509_csr((tmp_path / "req.csr").read_bytes())
    assert csr.is_signature_valid
    assert mode(tmp_path / "req.key") == 0o600

    password = write(tmp_path / "pw.txt", b"correct horse\n")
    pfx = tmp_path / "gw.pfx"
    assert run_cli("pki", "export", "--cert", cert, "--key", key, "--out", pfx,
                   "--password-file", password) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "encrypted" in out
    assert "correct horse" not in out
    assert import_pfx(pfx.read_bytes(), b"correct horse").cert_pem == cert.read_bytes()

    out_cert, out_key = tmp_path / "in.pem", tmp_path / "in.key"
    assert run_cli("pki", "import", pfx, "--password-file", password, "--out-cert", out_cert,
                   "--out-key", out_key) == 0  # fmt: skip
    assert out_cert.read_bytes() == cert.read_bytes()
    assert out_key.read_bytes() == key.read_bytes()
    assert mode(out_key) == 0o600

    wrong = write(tmp_path / "wrong.txt", b"battery staple\n")
    assert run_cli("pki", "import", pfx, "--pfx", "--password-file", wrong, "--out-cert",
                   tmp_path / "x.pem", "--out-key", tmp_path / "x.key") == 2  # fmt: skip
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert str(pfx) in captured.err
    assert "wrong password" in captured.err
    assert "battery" not in captured.err + captured.out
    assert not (tmp_path / "x.key").exists()

    bundle = write(tmp_path / "bundle.pem", cert.read_bytes() + key.read_bytes())
    assert run_cli("pki", "import", bundle, "--out-cert", tmp_path / "b.pem", "--out-key",
                   tmp_path / "b.key") == 0  # fmt: skip
    assert (tmp_path / "b.key").read_bytes() == key.read_bytes()
    captured = capsys.readouterr()
    assert "PRIVATE" not in captured.out + captured.err


def test_cli_bad_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.pem"
    assert run_cli("pki", "show", missing) == 2
    err = capsys.readouterr().err
    assert err.startswith("ras pki show: ")
    assert str(missing) in err
    junk = write(tmp_path / "junk.pem", b"not a certificate")
    assert run_cli("pki", "show", junk) == 2
    assert "no certificate found" in capsys.readouterr().err
    assert run_cli("pki", "import", junk, "--out-cert", tmp_path / "c", "--out-key",
                   tmp_path / "k") == 2  # fmt: skip
    assert str(junk) in capsys.readouterr().err
    key_only = write(tmp_path / "key.pem", self_signed_certificate(["x"]).key_pem)
    assert run_cli("pki", "export", "--cert", key_only, "--key", key_only, "--out",
                   tmp_path / "o.pfx") == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "no certificate found" in err
    assert "PRIVATE" not in err
