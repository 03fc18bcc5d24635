"""Network-namespace labs for tests: fixtures, polling, and small TCP helpers.

A test module gets the fixtures with ``pytest_plugins = ["labkit"]`` and imports the helpers
(``from labkit import wait_until``); the library underneath is :mod:`ras.lab`
(``ras/lab/netns.py`` explains how a lab is built). PYTEST_DONT_REWRITE: a test module imports
this before pytest loads it as a plugin, so its assertions cannot be rewritten; it raises
`AssertionError` itself where it checks something.

- `make_lab` is a factory fixture: ``make_lab("a", "b")`` builds a lab with those hosts; every
  lab it made is closed at teardown, also when the test failed, and a lab that cannot be
  closed cleanly (a namespace left behind) makes the test error. `lab` is one empty lab.
- Both skip with the reason where labs cannot run (not root, no ``ip``, no namespaces); under
  CI (``CI`` set) with root and ``ip`` they fail instead (see `ras.lab.lab_unavailable`).
  A test that runs a further program in the lab says so: ``require_lab("ping")``.
- Wait by polling: `wait_until` / `await_until` (10 ms steps), never by fixed sleeps.
- TCP in the lab: an echo server (`start_echo_server`, `echo`), `connect`, `reachable`, and a
  `Bridge` that carries connections made to a lab host on to a server on this machine's
  loopback (the real RDP server of the lab tests).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from ras.lab import Host, Lab, lab_unavailable

__all__ = [
    "ECHO_SERVER",
    "Bridge",
    "WaitTimeout",
    "accepted_from",
    "await_until",
    "connect",
    "echo",
    "lab",
    "make_lab",
    "reachable",
    "require_lab",
    "start_echo_server",
    "wait_until",
]

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Fixtures


def require_lab(*needs: str) -> None:
    """Skip the test where labs (and the programs `needs`) cannot run; fail instead in CI."""
    reason = lab_unavailable(needs=needs)
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    """A factory: ``make_lab(*host_names, **Lab_options) -> Lab``, hosts added in order (auto
    addresses .10, .11, ...). Process logs go to ``tmp_path/lab-N``."""
    require_lab()
    with contextlib.ExitStack() as labs:
        count = 0

        def make(*hosts: str, **options: object) -> Lab:
            nonlocal count
            count += 1
            options.setdefault("logdir", tmp_path / f"lab-{count}")
            made = labs.enter_context(Lab(**options))
            made.add_hosts(*hosts)
            return made

        yield make


@pytest.fixture
def lab(make_lab: Callable[..., Lab]) -> Lab:
    """An empty lab on 10.213.0.0/24: ``lab.add_host("a")``."""
    return make_lab()


# ---------------------------------------------------------------------------------------------
# Polling


class WaitTimeout(AssertionError):
    """A condition polled for did not come true in time."""


def _describe(what: str, timeout: float, last: str) -> str:
    return f"{what}: still not true after {timeout} s (last check {last})"


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    step: float = 0.01,
    what: str = "condition",
    *,
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """Call `predicate` every `step` s until it returns something true, and return that.

    After `timeout` s raise `WaitTimeout` naming `what` and the last result. Exceptions of the
    types in `ignore` count as "not yet"; any other propagates at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last = f"raised {exc!r}"
        else:
            if value:
                return value
            last = f"returned {value!r}"
        if time.monotonic() >= deadline:
            raise WaitTimeout(_describe(what, timeout, last))
        time.sleep(step)


async def await_until(
    predicate: Callable[[], T],
    step: float = 0.01,
    what: str = "condition",
    *,
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """`wait_until` for trio tests, other tasks running meanwhile. The caller owns the
    timeout: ``with trio.fail_after(5): await await_until(...)``; on timeout the last check
    is attached to the cancellation as a note, which the test report shows."""
    last = "none yet"
    try:
        while True:
            try:
                value = predicate()
            except ignore as exc:
                last = f"raised {exc!r}"
            else:
                if value:
                    return value
                last = f"returned {value!r}"
            await trio.sleep(step)
    except trio.Cancelled as exc:
        exc.add_note(f"while waiting for {what} (last check {last})")
        raise


# ---------------------------------------------------------------------------------------------
# TCP in the lab

# Echoes every connection (one thread each) and logs "accepted <peer address>" per connection.
ECHO_SERVER = """\
import socket, sys, threading

def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)

server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
while True:
    conn, peer = server.accept()
    print("accepted", peer[0], flush=True)
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""


def start_echo_server(host: Host, port: int = 7000) -> subprocess.Popen[bytes]:
    """Start an echo server on `port` of every address of `host`; return once it listens."""
    proc = host.popen([sys.executable, "-c", ECHO_SERVER, str(port)])
    log = host.lab.log_of(proc)

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(
                f"echo server in {host.name} exited with status {proc.returncode}\n"
                f"{host.lab.log_tail(proc)}"
            )
        return "listening" in log.read_text()

    wait_until(listening, 10.0, what=f"echo server listening in {host.name}:{port}")
    return proc


def accepted_from(host: Host, server: subprocess.Popen[bytes]) -> list[str]:
    """The peer addresses an echo server has accepted connections from, in order."""
    lines = host.lab.log_of(server).read_text().splitlines()
    return [line.split()[1] for line in lines if line.startswith("accepted ")]


Address = str | ipaddress.IPv4Address


def connect(client: Host, address: Address, port: int, timeout: float = 2.0) -> socket.socket:
    """A TCP connection from inside `client` (made by this process) to `address:port`."""
    sock = client.socket()
    sock.settimeout(timeout)
    try:
        sock.connect((str(address), port))
    except BaseException:
        sock.close()
        raise
    return sock


def echo(client: Host, address: Address, port: int, payload: bytes = b"hello lab\n") -> bytes:
    """Send `payload` to the echo server at `address:port` from `client`; return the reply."""
    with connect(client, address, port) as sock:
        sock.sendall(payload)
        reply = b""
        while len(reply) < len(payload) and (chunk := sock.recv(65536)):
            reply += chunk
        return reply


def reachable(client: Host, address: Address, port: int, timeout: float = 0.3) -> bool:
    """Whether a TCP connection from `client` to `address:port` opens within `timeout` s."""
    try:
        connect(client, address, port, timeout).close()
    except OSError:
        return False
    return True


class Bridge:
    """Listens on ``port`` inside a lab host; carries each connection, unchanged both ways, to
    ``target`` on this machine's loopback (where the RDP server runs)."""

    def __init__(self, host: Host, port: int, target: tuple[str, int]) -> None:
        self.target = target
        self.connections = 0
        self._listener = host.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("0.0.0.0", port))
        self._listener.listen(16)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._carry, args=(conn,), daemon=True).start()

    def _carry(self, conn: socket.socket) -> None:
        with conn, socket.create_connection(self.target, timeout=10) as upstream:
            upstream.settimeout(None)
            back = threading.Thread(target=_pump, args=(upstream, conn), daemon=True)
            back.start()
            _pump(conn, upstream)
            back.join(60)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)
