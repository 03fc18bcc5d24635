"""Fixtures shared by the test modules: the real RDP peers (see tests/rdp_peers.py) and a
stand-in RDP host (``host``)."""

from __future__ import annotations

import logging

import pytest
import rdp_peers
import trio
from farmkit import Listener
from rdp_peers import ShadowServer, Xvfb

# the network-namespace lab fixtures (make_lab, lab); the fast level's (inline_threads); a real
# etcd cluster (cluster)
pytest_plugins = ("labkit", "memkit", "etcdkit")

SHADOW_USER = "rdpuser"
SHADOW_PASSWORD = "correct horse 7"


def require_peers(*, xrdp: bool) -> None:
    """Skip where the peers cannot run (outside CI); in CI a missing peer fails instead."""
    reason = rdp_peers.peers_available(xrdp=xrdp)
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def display():
    """An X display (Xvfb) for xfreerdp and the shadow server."""
    require_peers(xrdp=False)
    with Xvfb() as xvfb:
        yield xvfb.display


@pytest.fixture(scope="session")
def shadow(display):
    """freerdp-shadow-cli with NLA, user SHADOW_USER / SHADOW_PASSWORD."""
    with ShadowServer(SHADOW_USER, SHADOW_PASSWORD, display) as server:
        yield server


@pytest.fixture
def xrdp_peers():
    require_peers(xrdp=True)


@pytest.fixture
async def host(nursery: trio.Nursery) -> Listener:
    """A stand-in RDP host on 127.0.0.1 that echoes and counts connections (``host.port``)."""
    listener = Listener()
    await nursery.start(listener.serve)
    return listener


@pytest.fixture(autouse=True)
def _logging_as_it_was():
    """A test that runs a ``ras`` command in-process (its ``main``) configures logging as the
    command does: a handler on the stderr pytest captured for that test, the level, no
    propagation. Put it back, or later tests log to a closed file ("Logging error") and see
    INFO lines in caplog they did not ask for."""
    saved = [
        (log, log.level, list(log.handlers), log.propagate)
        for log in (logging.getLogger(), logging.getLogger("ras"))
    ]
    yield
    for log, level, handlers, propagate in saved:
        log.setLevel(level)
        log.handlers[:] = handlers
        log.propagate = propagate
