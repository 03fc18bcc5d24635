"""Real RDP peers for integration tests: Xvfb, freerdp-shadow-cli, a private xrdp, xfreerdp.

Theory of operation
-------------------
Every helper here is synchronous and drives real programs with `subprocess`; tests call them
from fixtures (or from trio through `trio.to_thread.run_sync`). Each context manager records
what it started in an `ExitStack` as it goes, so a failure half-way through `__enter__`, a
failing test or a Ctrl-C all undo exactly what was done, in reverse. Every child process is also
kept in a module registry that an `atexit` hook empties, as a last resort.

- `Xvfb`: an X server for xfreerdp (which wants a display even for `/help`) and for the shadow
  server to mirror. Readiness comes from `-displayfd`, not from polling (which also means
  Xvfb writes no /tmp/.X{n}-lock; its socket in /tmp/.X11-unix marks the display as taken).
- `ShadowServer`: `freerdp-shadow-cli` with NLA against an NTLM SAM file: the light peer. NLA
  runs end to end between client and server, so a relay that changes one byte breaks it.
- `XrdpServer`: a full xrdp + xrdp-sesman with a real PAM login and an Xorg session. xrdp 0.9
  always reads `/etc/xrdp/sesman.ini`, so each instance runs under `unshare` in its own mount
  namespace with a private copy of `/etc/xrdp` and a private `/run/xrdp` bind-mounted over the
  real ones (nothing outside is touched), and in its own PID namespace, so that ending the
  namespace's first process ends every process of the instance, sessions included. Each
  instance has its own RDP and sesman ports, its own block of X display numbers and its own
  throw-away Linux users.
- X display numbers are reserved across processes (parallel test workers) by binding one
  abstract Unix socket per display: the kernel drops the reservation when its holder dies.
- `xfreerdp()` runs the real client to completion and returns its exit code and output with
  every password masked.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

__all__ = [
    "ClientResult",
    "PeerError",
    "PeersMissingError",
    "ShadowServer",
    "TestUser",
    "XrdpServer",
    "Xvfb",
    "free_port",
    "missing_peers",
    "peers_available",
    "wait_port",
    "xfreerdp",
]

MASK = "********"

# sbin is not on every PATH (sudo, CI runners), and xrdp, useradd and friends live there.
_PATH = os.pathsep.join(
    [os.environ.get("PATH", "/usr/bin:/bin"), "/usr/local/sbin", "/usr/sbin", "/sbin"]
)
_LIGHT_PROGRAMS = ("Xvfb", "xfreerdp", "freerdp-shadow-cli", "winpr-hash")
_XRDP_PROGRAMS = (
    *("xrdp", "xrdp-sesman", "xauth", "xsetroot", "xmessage"),
    *("unshare", "mount", "useradd", "userdel", "chpasswd"),
)
_XRDP_FILES = ("/usr/lib/xorg/Xorg", "/usr/lib/xorg/modules/libxorgxrdp.so", "/etc/xrdp")
_INSTALL_HINT = "run scripts/install-peers as root"

_FIRST_DISPLAY = 100  # clear of :0 and xrdp's usual :10 upwards
_LAST_DISPLAY = 1000
_USER_PREFIX = "rastest"
_USER_COMMENT = "ras test user, owner pid {pid}"


class PeerError(RuntimeError):
    """A real peer could not be started, did not become ready, or could not be cleaned up."""


class PeersMissingError(PeerError):
    """The peer programs are not installed and the environment (CI) requires them."""


# ---------------------------------------------------------------------------------------------
# Availability


def missing_peers(*, xrdp: bool = True) -> list[str]:
    """Name what is missing to run the peers (all of them, or only the light ones)."""
    missing = [p for p in _LIGHT_PROGRAMS if shutil.which(p, path=_PATH) is None]
    if xrdp:
        missing += [p for p in _XRDP_PROGRAMS if shutil.which(p, path=_PATH) is None]
        missing += [f for f in _XRDP_FILES if not os.path.exists(f)]
        if os.geteuid() != 0:
            missing.append("root (xrdp needs a mount namespace and Linux users)")
    return missing


def peers_available(*, xrdp: bool = True) -> str | None:
    """Return None if the peers can run, else the reason to skip the test.

    Under CI (the `CI` environment variable set) a missing peer is not a reason to skip but a
    failure: this raises `PeersMissingError` instead of returning a reason.
    """
    missing = missing_peers(xrdp=xrdp)
    if not missing:
        return None
    reason = f"real RDP peers missing: {', '.join(missing)} ({_INSTALL_HINT})"
    if os.environ.get("CI"):
        raise PeersMissingError(f"{reason}; CI is set, so this is a failure, not a skip")
    return reason


# ---------------------------------------------------------------------------------------------
# Ports


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on `host` a moment ago."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(
    host: str,
    port: int,
    timeout: float = 30.0,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | Sequence[Path] = (),
    what: str = "server",
) -> None:
    """Poll (10 ms steps) until `host:port` accepts a TCP connection.

    If `proc` is given and exits first, or the deadline passes, raise `PeerError` with the tail
    of the process's log file(s).
    """
    logs = [log] if isinstance(log, Path) else list(log)
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise PeerError(
                f"{what} exited with status {proc.returncode} before listening on "
                f"{host}:{port}\n{_tails(logs)}"
            )
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise PeerError(
                f"{what} not listening on {host}:{port} after {timeout:.0f} s\n{_tails(logs)}"
            )
        time.sleep(0.01)


def _is_listening(port: int) -> bool:
    """Whether some socket listens on TCP `port`, any address or family, without connecting."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            next(rows)
            for row in rows:
                local, state = row.split()[1], row.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


# ---------------------------------------------------------------------------------------------
# Processes


# Every process started here and not yet reaped, with the signal that stops it.
_live: dict[int, tuple[subprocess.Popen[bytes], int]] = {}


def _spawn(
    argv: Sequence[str],
    *,
    log: Path,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    stop_signal: int = signal.SIGTERM,
) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout and stderr appended to `log`, and register it for cleanup."""
    full_env = {**os.environ, "PATH": _PATH, **(env or {})}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            pass_fds=pass_fds,
            # Out of pytest's process group, so a terminal's Ctrl-C reaches pytest only, and
            # pytest's teardown stops the peer in order.
            start_new_session=True,
        )
    _live[proc.pid] = (proc, stop_signal)
    return proc


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Send the process its stop signal (SIGTERM), then SIGKILL after `grace` s; reap it."""
    try:
        if proc.poll() is None:
            proc.send_signal(_live.get(proc.pid, (proc, signal.SIGTERM))[1])
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        _live.pop(proc.pid, None)


@atexit.register
def _stop_leftovers() -> None:
    # Peers entered and never exited (no `with`, or the interpreter is leaving in a hurry): undo
    # everything, newest first; then stop any process still registered.
    while _open_peers:
        _open_peers[-1].__exit__(None, None, None)
    for proc, _ in list(_live.values()):
        _stop(proc, grace=2.0)


def _run(argv: Sequence[str], *, input: str | None = None, what: str = "") -> str:
    """Run a short command; raise `PeerError` with its output if it fails."""
    done = subprocess.run(
        argv,
        input=input,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": _PATH, "LC_ALL": "C"},
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise PeerError(
            f"{what or argv[0]} failed with status {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()}"
        )
    return done.stdout


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) for every process, read from /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and ")"
        table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def _descendants(pid: int) -> list[int]:
    """Live (not zombie) descendants of `pid`, parents before children."""
    children: dict[int, list[int]] = {}
    for child, (parent, state) in _proc_table().items():
        if state != "Z":
            children.setdefault(parent, []).append(child)
    found: list[int] = []
    todo = list(children.get(pid, ()))
    while todo:
        child = todo.pop(0)
        found.append(child)
        todo.extend(children.get(child, ()))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal_all(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _uid_pids(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid and _alive(int(entry.name)):
                    pids.append(int(entry.name))
    return pids


# ---------------------------------------------------------------------------------------------
# Logs and secrets


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"--- {path}: unreadable ({exc.strerror})"
    return f"--- last lines of {path}:\n" + "\n".join(text.splitlines()[-lines:])


def _tails(paths: Iterable[Path], lines: int = 25) -> str:
    return "\n".join(_tail(p, lines) for p in paths)


def _mask(text: str, hidden: Iterable[str]) -> str:
    """Replace each secret in `text` with MASK: everywhere if it has 6 characters or more,
    else only where it stands alone (masking every "p" of a log for the password "p" would
    leave nothing readable)."""
    for secret in sorted((s for s in hidden if s), key=len, reverse=True):
        if len(secret) >= 6:
            text = text.replace(secret, MASK)
        else:
            text = re.sub(rf"(?<![\w.-]){re.escape(secret)}(?![\w.-])", MASK, text)
    return text


# Client options whose value is a secret (password, gateway password, gateway token).
_SECRET_OPTIONS = ("/p:", "/gp:", "/gat:")


def _mask_argv(argv: Sequence[str], hidden: Iterable[str]) -> list[str]:
    return [
        arg.split(":", 1)[0] + ":" + MASK if arg.startswith(_SECRET_OPTIONS) else _mask(arg, hidden)
        for arg in argv
    ]


# ---------------------------------------------------------------------------------------------
# X display numbers


def _display_in_use(n: int) -> bool:
    return os.path.lexists(f"/tmp/.X{n}-lock") or os.path.lexists(f"/tmp/.X11-unix/X{n}")


class _Displays:
    """A block of `count` consecutive X display numbers, reserved until `release()`.

    One abstract Unix socket per display ("@ras-test-display-N") marks it ours; the kernel
    frees the name when the socket closes, even if this process is killed.
    """

    def __init__(self, count: int) -> None:
        start = _FIRST_DISPLAY
        while start + count <= _LAST_DISPLAY:
            held = self._try(start, count)
            if held is not None:
                self.first = start
                self.count = count
                self._held = held
                return
            start += 1
        raise PeerError(
            f"no {count} free X displays between :{_FIRST_DISPLAY} and :{_LAST_DISPLAY}"
        )

    @staticmethod
    def _try(start: int, count: int) -> list[socket.socket] | None:
        held: list[socket.socket] = []
        for n in range(start, start + count):
            if _display_in_use(n):
                break
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(f"\0ras-test-display-{n}")
            except OSError:
                sock.close()
                break
            held.append(sock)
        else:
            return held
        for sock in held:
            sock.close()
        return None

    def numbers(self) -> range:
        return range(self.first, self.first + self.count)

    def remove_stale_locks(self) -> None:
        """Remove X lock files left in our block by an X server that was killed (ours)."""
        for n in self.numbers():
            for path in (f"/tmp/.X{n}-lock", f"/tmp/.X11-unix/X{n}"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def release(self) -> None:
        for sock in self._held:
            sock.close()
        self._held = []


# ---------------------------------------------------------------------------------------------
# The context managers


_open_peers: list[_Peer] = []


class _Peer:
    """Base of the context managers: `_start` registers the undoing of each step it takes on
    `stack` as it goes; `__exit__` (or a failure inside `_start`) undoes them in reverse."""

    _stack: contextlib.ExitStack

    def __enter__(self) -> Self:
        with contextlib.ExitStack() as stack:
            self._start(stack)
            self._stack = stack.pop_all()
        _open_peers.append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(ValueError):
            _open_peers.remove(self)
        self._stack.close()

    def _start(self, stack: contextlib.ExitStack) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Xvfb


class Xvfb(_Peer):
    """A headless X server on a free display; `.display` is ":N"."""

    def __init__(self, *, screen: str = "1280x800x24", timeout: float = 30.0) -> None:
        self.screen = screen
        self.timeout = timeout
        self.display = ""
        self.log = Path()

    def _start(self, stack: contextlib.ExitStack) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="ras-xvfb-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        self.log = tmp / "xvfb.log"
        for _attempt in range(5):
            # A display another X server took after our check stays reserved, so is not retried.
            displays = _Displays(1)
            stack.callback(displays.release)
            if self._start_on(displays.first, stack):
                self.display = f":{displays.first}"
                return
        raise PeerError(f"Xvfb would not start\n{_tail(self.log)}")

    def _start_on(self, n: int, stack: contextlib.ExitStack) -> bool:
        ready_r, ready_w = os.pipe()
        try:
            argv = ["Xvfb", f":{n}", "-screen", "0", self.screen, "-nolisten", "tcp"]
            proc = _spawn(
                # -noreset: by default the server resets when its last client leaves, and
                # refuses connections meanwhile: freerdp-shadow-cli opens the display, closes
                # it, and opens it again at once, and lost that race now and then.
                [*argv, "-noreset", "-displayfd", str(ready_w)],
                log=self.log,
                pass_fds=(ready_w,),
            )
            os.close(ready_w)
            ready_w = -1
            stack.callback(_stop, proc)
            return self._wait_ready(proc, ready_r)
        finally:
            os.close(ready_r)
            if ready_w >= 0:
                os.close(ready_w)

    def _wait_ready(self, proc: subprocess.Popen[bytes], ready: int) -> bool:
        # Xvfb writes the display number to -displayfd once it accepts clients.
        deadline = time.monotonic() + self.timeout
        got = b""
        while not got.endswith(b"\n"):
            if proc.poll() is not None:
                return False
            if time.monotonic() >= deadline:
                raise PeerError(f"Xvfb not ready after {self.timeout:.0f} s\n{_tail(self.log)}")
            if select.select([ready], [], [], 0.05)[0]:
                chunk = os.read(ready, 16)
                if not chunk:  # closed without a number: it is exiting
                    proc.wait(self.timeout)
                    return False
                got += chunk
        return True


# ---------------------------------------------------------------------------------------------
# freerdp-shadow-cli


class ShadowServer(_Peer):
    """freerdp-shadow-cli on 127.0.0.1, NLA only, knowing one user (an NTLM SAM file).

    `display` is the X display it mirrors (an `Xvfb().display`). `.port` once entered.
    """

    def __init__(self, user: str, password: str, display: str, *, timeout: float = 30.0) -> None:
        self.user = user
        self.password = password
        self.display = display
        self.timeout = timeout
        self.host = "127.0.0.1"
        self.port = 0
        self.log = Path()

    def __repr__(self) -> str:
        return f"ShadowServer(user={self.user!r}, password={MASK!r}, port={self.port})"

    def _start(self, stack: contextlib.ExitStack) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="ras-shadow-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        self.log = tmp / "shadow.log"
        sam = tmp / "shadow.sam"
        hash_argv = ["winpr-hash", "-u", self.user, "-p", self.password, "-f", "sam"]
        sam.write_text(_run(hash_argv, what="winpr-hash"))
        self.port = free_port(self.host)
        argv = ["freerdp-shadow-cli", f"/port:{self.port}", f"/bind-address:{self.host}"]
        proc = _spawn(
            [*argv, "/sec:nla", f"/sam-file:{sam}"],
            log=self.log,
            # HOME: the server writes its generated certificate under ~/.config/freerdp.
            env={"DISPLAY": self.display, "HOME": str(tmp)},
        )
        stack.callback(_stop, proc)
        wait_port(self.host, self.port, self.timeout, proc=proc, log=self.log, what="shadow")

    def log_tail(self, lines: int = 25) -> str:
        return _mask(_tail(self.log, lines), [self.password])


# ---------------------------------------------------------------------------------------------
# xrdp


@dataclass(frozen=True, slots=True)
class TestUser:
    """A throw-away Linux user that can log in to an `XrdpServer`."""

    __test__ = False  # not a pytest test class

    name: str
    password: str

    def __repr__(self) -> str:
        return f"TestUser(name={self.name!r}, password={MASK!r})"


# Runs as the first process of the new PID namespace, inside the private mount namespace.
_XRDP_NS_SCRIPT = """\
set -e
mount --bind "$1" /etc/xrdp
mount --bind "$2" /run/xrdp
xrdp-sesman --nodaemon &
exec xrdp --nodaemon
"""

_DESKTOP_SCRIPT = """\
#!/bin/sh
# The whole "desktop" of a ras test session: paint the root window, then log off after {n} s.
xsetroot -solid '{colour}'
{repaint}exec xmessage -timeout {n} 'ras test session: logging off after {n} s'
"""

# With `repaint_seconds`: the whole root window repainted in turn in two colours, in the
# background, so that the session sends screen updates all along. Stops with the X server.
_REPAINT_LOOP = """\
(while sleep {s} && xsetroot -solid '{other}' && sleep {s} && xsetroot -solid '{colour}'; do
  :
done) &
"""


class XrdpServer(_Peer):
    """A private xrdp + xrdp-sesman on 127.0.0.1 with throw-away Linux users.

    The session's "desktop" paints the root window `COLOUR` and ends after `desktop_seconds`,
    so xrdp logs the user off and a connected xfreerdp exits 12. (xrdp has no NLA: a wrong
    password leaves the client on xrdp's login screen until its timeout.) With
    `repaint_seconds`, the desktop repaints the whole root window every `repaint_seconds`,
    `REPAINT_COLOUR` and `COLOUR` in turn, so that a long session carries traffic all along
    (0, the default: painted once, then still). `users` users are created, one per parallel
    client: a user's second connection takes over the first's session. `.port`, `.user`,
    `.password`, `.users` once entered. Needs root.
    """

    COLOUR = "#206020"
    REPAINT_COLOUR = "#602020"

    def __init__(
        self,
        *,
        desktop_seconds: int = 1,
        repaint_seconds: float = 0.0,
        users: int = 1,
        timeout: float = 60.0,
    ) -> None:
        if desktop_seconds < 1 or users < 1:
            raise ValueError("desktop_seconds and users must be at least 1")
        if repaint_seconds < 0:
            raise ValueError("repaint_seconds must not be negative (0: no repaint)")
        self.desktop_seconds = desktop_seconds
        self.repaint_seconds = repaint_seconds
        self.timeout = timeout
        self.host = "127.0.0.1"
        self.port = 0
        self.sesman_port = 0
        self.users: list[TestUser] = []
        self._user_count = users
        self.logs: list[Path] = []
        self.displays = range(0)

    @property
    def user(self) -> str:
        return self.users[0].name

    @property
    def password(self) -> str:
        return self.users[0].password

    def __repr__(self) -> str:
        return f"XrdpServer(port={self.port}, users={self.users!r})"

    def _start(self, stack: contextlib.ExitStack) -> None:
        if os.geteuid() != 0:
            raise PeerError("XrdpServer needs root (mount namespace, useradd)")
        _sweep_stale_users()
        tmp = Path(tempfile.mkdtemp(prefix="ras-xrdp-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        displays = _Displays(2 * self._user_count + 2)
        stack.callback(displays.release)
        self.displays = displays.numbers()
        self.users = []  # left readable after exit, for checks that they are gone
        for _ in range(self._user_count):
            user = _create_user()
            stack.callback(_remove_user, user.name)
            self.users.append(user)

        self.port = free_port(self.host)
        while (sesman_port := free_port(self.host)) == self.port:
            pass
        self.sesman_port = sesman_port
        etc, run = self._write_config(tmp, displays)
        self.logs = [tmp / "xrdp.log", tmp / "xrdp-sesman.log", tmp / "namespace.log"]
        # The mount point for our private copy; the package's service makes it at start.
        os.makedirs("/run/xrdp", exist_ok=True)
        unshare = ["unshare", "--mount", "--propagation", "private", "--mount-proc"]
        unshare += ["--pid", "--fork", "--kill-child"]
        proc = _spawn(
            [*unshare, "sh", "-c", _XRDP_NS_SCRIPT, "ras-xrdp", str(etc), str(run)],
            log=tmp / "namespace.log",
            # unshare ignores SIGTERM while it waits; its SIGKILL ends the whole namespace.
            stop_signal=signal.SIGKILL,
        )
        stack.callback(self._stop_namespace, proc, displays)  # runs before the users go
        wait_port(self.host, self.port, self.timeout, proc=proc, log=self.logs, what="xrdp")
        self._wait_sesman(proc)

    def _write_config(self, tmp: Path, displays: _Displays) -> tuple[Path, Path]:
        etc = tmp / "etc-xrdp"
        shutil.copytree("/etc/xrdp", etc, symlinks=True)
        etc.chmod(0o755)  # the session (as the test user) runs the desktop script from here
        desktop = etc / "ras-desktop.sh"
        repaint = ""
        if self.repaint_seconds:
            repaint = _REPAINT_LOOP.format(
                s=f"{self.repaint_seconds:g}", other=self.REPAINT_COLOUR, colour=self.COLOUR
            )
        desktop.write_text(
            _DESKTOP_SCRIPT.format(n=self.desktop_seconds, colour=self.COLOUR, repaint=repaint)
        )
        desktop.chmod(0o755)
        _set_ini(
            etc / "xrdp.ini",
            {
                "Globals": {"port": f"tcp://{self.host}:{self.port}", "autorun": "Xorg"},
                "Logging": {"LogFile": str(tmp / "xrdp.log"), "EnableSyslog": "false"},
            },
        )
        _set_ini(
            etc / "sesman.ini",
            {
                "Globals": {
                    "ListenAddress": self.host,
                    "ListenPort": str(self.sesman_port),
                    "EnableUserWindowManager": "false",
                    "DefaultWindowManager": "/etc/xrdp/ras-desktop.sh",
                },
                "Security": {"AllowRootLogin": "false"},
                "Sessions": {
                    "X11DisplayOffset": str(displays.first),
                    "MaxSessions": str(self._user_count + 1),
                },
                "Logging": {"LogFile": str(tmp / "xrdp-sesman.log"), "EnableSyslog": "false"},
                "ChansrvLogging": {"EnableSyslog": "false"},
            },
        )
        run = tmp / "run-xrdp"
        (run / "sockdir").mkdir(parents=True)
        run.chmod(0o755)
        (run / "sockdir").chmod(0o3777)
        return etc, run

    def _wait_sesman(self, proc: subprocess.Popen[bytes]) -> None:
        # Not a connection: sesman would log it as a failed login. (It listens on ::1 even when
        # told 127.0.0.1, where IPv6 is on.)
        deadline = time.monotonic() + self.timeout
        while not _is_listening(self.sesman_port):
            if proc.poll() is not None or time.monotonic() >= deadline:
                raise PeerError(
                    f"xrdp-sesman not listening on port {self.sesman_port}\n{self.log_tail()}"
                )
            time.sleep(0.01)

    def _stop_namespace(self, proc: subprocess.Popen[bytes], displays: _Displays) -> None:
        try:
            if proc.poll() is None:
                # The namespace's first process is xrdp. Stop everything under it first (sesman,
                # sessions, Xorg, so that they clean up), then xrdp; its exit makes the kernel
                # SIGKILL whatever is left in the namespace.
                init = _descendants(proc.pid)[:1]  # unshare's only child
                rest = [pid for top in init for pid in _descendants(top)]
                _signal_all(rest, signal.SIGTERM)
                _wait_gone(rest, 5.0)
                _signal_all(init, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5.0)
        finally:
            _stop(proc)  # if still there: SIGKILL to unshare, which ends the namespace
            displays.remove_stale_locks()

    def log_tail(self, lines: int = 25) -> str:
        return _mask(_tails(self.logs, lines), [u.password for u in self.users])


def _set_ini(path: Path, changes: Mapping[str, Mapping[str, str]]) -> None:
    """Set keys in an xrdp ini file, keeping its comments and layout; add what is missing."""
    pending = {section: dict(keys) for section, keys in changes.items()}
    out: list[str] = []
    section: str | None = None

    def flush() -> None:
        if section is not None and section in pending:
            out.extend(f"{key}={value}" for key, value in pending.pop(section).items())

    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            flush()
            section = stripped[1:-1]
        elif (
            section is not None
            and section in pending
            and "=" in stripped
            and stripped[0] not in ";#"
        ):
            key = stripped.split("=", 1)[0].strip()
            if key in pending[section]:
                out.append(f"{key}={pending[section].pop(key)}")
                continue
        out.append(line)
    flush()
    for section, keys in pending.items():
        out.append(f"[{section}]")
        out.extend(f"{key}={value}" for key, value in keys.items())
    path.write_text("\n".join(out) + "\n")


def _create_user() -> TestUser:
    name = f"{_USER_PREFIX}{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    comment = _USER_COMMENT.format(pid=os.getpid())
    useradd = ["useradd", "--create-home", "--shell", "/bin/sh", "--comment", comment, name]
    _retry_locked(useradd, what=f"useradd {name}")
    try:
        _retry_locked(["chpasswd"], input=f"{name}:{password}\n", what=f"chpasswd {name}")
    except BaseException:
        _remove_user(name)
        raise
    return TestUser(name, password)


def _remove_user(name: str) -> None:
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    # Its processes all lived in the xrdp namespace, gone by now; make sure before userdel.
    pids = _uid_pids(uid)
    if pids and not _wait_gone(pids, 5.0):
        _signal_all(_uid_pids(uid), signal.SIGKILL)
        _wait_gone(_uid_pids(uid), 5.0)
    _retry_locked(["userdel", "--remove", name], what=f"userdel {name}")


def _retry_locked(argv: Sequence[str], *, input: str | None = None, what: str) -> None:
    """Run a shadow-utils command, retrying while another one holds /etc/passwd's lock."""
    deadline = time.monotonic() + 30.0
    while True:
        try:
            _run(argv, input=input, what=what)
            return
        except PeerError as exc:
            if "lock" not in str(exc).lower() or time.monotonic() >= deadline:
                raise
        time.sleep(0.05)


def _sweep_stale_users() -> None:
    """Remove test users whose owning process died without cleaning up (e.g. SIGKILL)."""
    for entry in pwd.getpwall():
        if not entry.pw_name.startswith(_USER_PREFIX):
            continue
        prefix = _USER_COMMENT.format(pid="")
        if not entry.pw_gecos.startswith(prefix):
            continue
        owner = entry.pw_gecos[len(prefix) :]
        if owner.isdigit() and not _alive(int(owner)) and not _uid_pids(entry.pw_uid):
            with contextlib.suppress(PeerError):
                _retry_locked(["userdel", "--remove", entry.pw_name], what="userdel")


# ---------------------------------------------------------------------------------------------
# xfreerdp


class ClientResult(subprocess.CompletedProcess[str]):
    """A finished xfreerdp: `returncode`, `stdout` (stdout and stderr merged, passwords
    masked), `args` (masked), `duration_s`, `timed_out`."""

    def __init__(
        self, args: list[str], returncode: int, output: str, duration_s: float, timed_out: bool
    ) -> None:
        super().__init__(args, returncode, stdout=output, stderr=None)
        self.duration_s = duration_s
        self.timed_out = timed_out

    @property
    def output(self) -> str:
        return self.stdout

    def summary(self, lines: int = 20) -> str:
        """A paragraph for an assertion message: command, outcome, last lines of output."""
        how = "timed out and was terminated" if self.timed_out else "exited"
        tail = "\n".join(self.stdout.splitlines()[-lines:])
        return (
            f"{shlex.join(self.args)} {how} with status {self.returncode} after "
            f"{self.duration_s:.1f} s; last lines of its output:\n{tail}"
        )

    def __repr__(self) -> str:
        return (
            f"ClientResult(returncode={self.returncode}, duration_s={self.duration_s:.2f}, "
            f"timed_out={self.timed_out})"
        )


def xfreerdp(
    host: str,
    port: int,
    user: str,
    password: str,
    *,
    display: str,
    extra: Sequence[str] = (),
    timeout: float = 60.0,
) -> ClientResult:
    """Run `xfreerdp /v:HOST:PORT /u:USER /p:PASS /cert:ignore *extra` on X `display` to the
    end, or SIGTERM it after `timeout` seconds. Passwords are masked in the result.

    Exit codes seen here: 0 (`+auth-only` accepted), 147 (NLA refused the credentials), 12
    (the server logged the user off), 131/155 (gateway refused), negative (killed by signal).
    """
    target = f"[{host}]" if ":" in host else host
    argv = ["xfreerdp", f"/v:{target}:{port}", f"/u:{user}", f"/p:{password}", "/cert:ignore"]
    argv += extra
    hidden = [password] + [arg.split(":", 1)[1] for arg in extra if arg.startswith(_SECRET_OPTIONS)]
    with tempfile.TemporaryDirectory(prefix="ras-xfreerdp-") as tmp:
        log = Path(tmp) / "xfreerdp.log"
        started = time.monotonic()
        # HOME: the client keeps known hosts and certificates under ~/.config/freerdp.
        proc = _spawn(
            argv,
            log=log,
            env={"DISPLAY": display, "HOME": tmp, "XDG_CONFIG_HOME": f"{tmp}/.config"},
        )
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _stop(proc)  # SIGTERM: xfreerdp ignores SIGINT
        duration_s = time.monotonic() - started
        output = log.read_text(errors="replace")
    return ClientResult(
        _mask_argv(argv, hidden), proc.returncode, _mask(output, hidden), duration_s, timed_out
    )
