"""The real-peer harness (tests/rdp_peers.py) against the real servers, with nothing between.

These prove the harness itself: the exit codes later tests rely on (0 and 147 from NLA against
freerdp-shadow-cli, 12 from a real xrdp login that ends in a logoff) come from the peers, and
the private xrdp instances coexist and leave nothing behind.
"""

import hashlib
import os
import pwd
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import rdp_peers
from conftest import SHADOW_PASSWORD, SHADOW_USER
from rdp_peers import ShadowServer, XrdpServer, xfreerdp

pytestmark = pytest.mark.peers


def test_shadow_nla_accepts_the_right_password(shadow, display):
    result = xfreerdp(
        shadow.host,
        shadow.port,
        SHADOW_USER,
        SHADOW_PASSWORD,
        display=display,
        extra=["+auth-only"],
    )
    assert result.returncode == 0, f"{result.summary()}\n{shadow.log_tail()}"


def test_shadow_nla_refuses_a_wrong_password(shadow, display):
    result = xfreerdp(
        shadow.host,
        shadow.port,
        SHADOW_USER,
        "not " + SHADOW_PASSWORD,
        display=display,
        extra=["+auth-only"],
    )
    assert result.returncode == 147, f"{result.summary()}\n{shadow.log_tail()}"


def test_client_result_never_shows_the_password(shadow, display):
    result = xfreerdp(
        shadow.host,
        shadow.port,
        SHADOW_USER,
        SHADOW_PASSWORD,
        display=display,
        extra=["+auth-only", f"/gp:{SHADOW_PASSWORD}x"],
    )
    shown = result.summary(lines=10_000) + repr(result) + repr(shadow) + " ".join(result.args)
    assert SHADOW_PASSWORD not in shown
    assert f"/p:{rdp_peers.MASK}" in result.args
    assert f"/gp:{rdp_peers.MASK}" in result.args


def _etc_xrdp_digest() -> str:
    """Names, modes, link targets and contents of everything under the real /etc/xrdp."""
    digest = hashlib.sha256()
    for path in sorted(Path("/etc/xrdp").rglob("*")):
        digest.update(f"{path}\0{path.lstat().st_mode:o}\0".encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_xrdp_real_login_then_logoff_exits_12(xrdp_peers, display):
    etc_before = _etc_xrdp_digest()
    with XrdpServer(desktop_seconds=1) as server:
        uid = pwd.getpwnam(server.user).pw_uid
        result = xfreerdp(
            server.host, server.port, server.user, server.password, display=display, timeout=90.0
        )
        assert result.returncode == 12, f"{result.summary()}\n{server.log_tail()}"
        # The logoff came from the desktop ending, which cannot happen before it ran 1 s.
        assert result.duration_s >= 1.0, result.summary()

    with pytest.raises(KeyError):
        pwd.getpwnam(server.user)
    assert not os.path.exists(f"/home/{server.user}")
    assert not rdp_peers._uid_pids(uid), "processes of the test user survived the server"
    assert not any(os.path.exists(f"/tmp/.X{n}-lock") for n in server.displays)
    assert _etc_xrdp_digest() == etc_before, "the real /etc/xrdp was modified"


def test_two_xrdp_servers_coexist(xrdp_peers, display):
    with XrdpServer(desktop_seconds=1) as one, XrdpServer(desktop_seconds=1) as two:
        assert len({one.port, one.sesman_port, two.port, two.sesman_port}) == 4
        assert not set(one.displays) & set(two.displays)
        with ThreadPoolExecutor(2) as pool:
            runs = [
                pool.submit(
                    xfreerdp, s.host, s.port, s.user, s.password, display=display, timeout=90.0
                )
                for s in (one, two)
            ]
            results = [run.result() for run in runs]
        for server, result in zip((one, two), results, strict=True):
            assert result.returncode == 12, f"{result.summary()}\n{server.log_tail()}"


def test_xfreerdp_is_terminated_at_its_timeout(display):
    # A server that accepts the TCP connection and never answers the X.224 request.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        result = xfreerdp(
            "127.0.0.1",
            silent.getsockname()[1],
            "nobody",
            "secret",
            display=display,
            timeout=1.0,
        )
    assert result.timed_out, result.summary()
    assert 1.0 <= result.duration_s < 10.0, result.summary()


def test_a_peer_that_dies_at_start_says_why(display):
    no_x_server = ":65534"
    with (
        pytest.raises(rdp_peers.PeerError, match="failed to open display") as failure,
        ShadowServer(SHADOW_USER, SHADOW_PASSWORD, no_x_server),
    ):
        pass
    assert SHADOW_PASSWORD not in str(failure.value)
