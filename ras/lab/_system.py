"""What the lab stands on: commands, named namespaces, per-thread setns, processes, owners.

Shared by :mod:`ras.lab.netns`; nothing here knows about hosts or bridges.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import ParamSpec, TypeVar

from ras.errors import RasError

P = ParamSpec("P")
T = TypeVar("T")

# sbin is not on every PATH (sudo, CI runners), and ip, iptables and keepalived live there.
PATH = os.pathsep.join(
    [os.environ.get("PATH", "/usr/bin:/bin"), "/usr/local/sbin", "/usr/sbin", "/sbin"]
)
NETNS_DIR = Path("/run/netns")  # where `ip netns` keeps its named namespaces
_LOCK_DIR = Path("/run/ras-lab")
_CLONE_NEWNET = 0x40000000


class LabError(RasError):
    """A lab could not be built, a command in it failed, or it could not be torn down."""


class LabUnavailableError(LabError):
    """Labs cannot run here and the environment (CI) requires them."""


class CommandError(LabError):
    """A command run in a lab exited with a non-zero status."""

    def __init__(
        self, argv: Sequence[str], returncode: int, stdout: str, stderr: str, commands: str = ""
    ) -> None:
        output = (stderr or stdout).strip()
        message = f"{shlex.join(argv)} failed with status {returncode}: {output}"
        if commands:  # what an `ip -batch -` was given: its error names a line number
            message += "\n" + "".join(
                f"  {n}: {line}\n" for n, line in enumerate(commands.splitlines(), 1)
            )
        super().__init__(message)
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


# ---------------------------------------------------------------------------------------------
# Commands and namespaces


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PATH": PATH, **(extra or {})}


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; `CommandError` if `check` and it fails."""
    try:
        done = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            env=child_env({"LC_ALL": "C", **(env or {})}),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{shlex.join(argv)} did not finish within {timeout} s") from exc
    except OSError as exc:
        raise LabError(f"cannot run {argv[0]}: {exc.strerror}") from exc
    if check and done.returncode != 0:
        raise CommandError(argv, done.returncode, done.stdout, done.stderr, input or "")
    return done


def ip_batch(lines: Iterable[str], *, netns: str | None = None, force: bool = False) -> None:
    """Run `ip` commands (without the leading "ip") in one process, in `netns` if given."""
    argv = ["ip", *(["-n", netns] if netns else []), *(["-force"] if force else [])]
    run([*argv, "-batch", "-"], input="".join(f"{line}\n" for line in lines))


def ip_batches(batches: Mapping[str, Sequence[str]], timeout: float = 30.0) -> None:
    """Run one ``ip -n NETNS -batch -`` per namespace, all at the same time; raise the first
    failure once all have ended."""
    started: list[tuple[list[str], subprocess.Popen[str], str]] = []
    try:
        for netns, lines in batches.items():
            argv = ["ip", "-n", netns, "-batch", "-"]
            # The commands go into a pipe before the process starts: a few hundred bytes, far
            # below a pipe's capacity, so nothing waits on anything.
            commands = "".join(f"{line}\n" for line in lines)
            read_end, write_end = os.pipe()
            try:
                os.write(write_end, commands.encode())
                os.close(write_end)
                write_end = -1
                proc = subprocess.Popen(
                    argv,
                    stdin=read_end,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=child_env({"LC_ALL": "C"}),
                )
            finally:
                os.close(read_end)
                if write_end >= 0:
                    os.close(write_end)
            started.append((argv, proc, commands))
        deadline = time.monotonic() + timeout
        failures = []
        for argv, proc, commands in started:
            out, err = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
            if proc.returncode != 0:
                failures.append(CommandError(argv, proc.returncode, out, err, commands))
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"ip did not finish within {timeout} s") from exc
    except OSError as exc:
        raise LabError(f"cannot run ip: {exc.strerror}") from exc
    finally:
        for _, proc, _ in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failures:
        raise failures[0]


def listed(prefix: str) -> list[str]:
    """Names of the namespaces with `prefix` in /run/netns (cheap, no subprocess)."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name.startswith(f"{prefix}-"))


def lab_namespaces(prefix: str) -> list[str]:
    """The namespaces whose name starts with ``prefix + "-"``, as ``ip netns list`` has them."""
    out = run(["ip", "netns", "list"]).stdout
    names = (line.split()[0] for line in out.splitlines() if line.strip())
    return sorted(name for name in names if name.startswith(f"{prefix}-"))


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.setns.restype = ctypes.c_int
    return libc


def _enter_netns(netns: str) -> None:
    """Move the calling thread (only it) into the named network namespace."""
    try:
        fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LabError(f"no network namespace {netns}: {exc.strerror}") from exc
    try:
        if _libc().setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"setns into {netns} failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def _in_thread(fn: Callable[[], T]) -> T:
    """Call `fn` in a new thread and return its result or raise its exception. The thread may
    move to other network namespaces: it ends there, and no thread is ever moved back."""
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="ras.lab netns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def call_in_netns(netns: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call `fn` in a short-lived thread inside `netns`."""

    def inside() -> T:
        _enter_netns(netns)
        return fn(*args, **kwargs)

    return _in_thread(inside)


def in_each_netns(names: Iterable[str], fn: Callable[[], object]) -> None:
    """Call `fn` once inside each named namespace, in turn, from one short-lived thread."""

    def each() -> None:
        for name in names:
            _enter_netns(name)
            fn()

    _in_thread(each)


def sysctl_path(key: str) -> Path:
    # Only net.* is per network namespace: anything else would change the whole machine.
    parts = key.split("/") if "/" in key else key.split(".")
    if parts[0] != "net" or len(parts) < 3 or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a per-namespace sysctl (net.*): {key!r}")
    return Path("/proc/sys", *parts)


def write_sysctls(values: Mapping[str, str], *, missing_ok: bool = False) -> None:
    for key, value in values.items():
        try:
            sysctl_path(key).write_text(f"{value}\n")
        except FileNotFoundError:
            if not missing_ok:
                raise


_NO_IPV6 = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}


def disable_ipv6() -> None:
    write_sysctls(_NO_IPV6, missing_ok=True)  # missing: IPv6 is off in the kernel already


# ---------------------------------------------------------------------------------------------
# Processes


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def pids_in(names: Iterable[str]) -> list[int]:
    """Live processes in the named namespaces (what `ip netns pids` lists), this one excepted."""
    ids = set()
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(NETNS_DIR / name)
            ids.add((st.st_dev, st.st_ino))
    if not ids:
        return []
    me = os.getpid()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in ids and _alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def kill_all_in(names: Sequence[str], timeout: float = 5.0) -> None:
    """SIGKILL every process in the named namespaces until none is left (forks race us)."""
    deadline = time.monotonic() + timeout
    while pids := pids_in(names):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() >= deadline:
            raise LabError(f"processes {pids} in {', '.join(names)} survive SIGKILL")
        time.sleep(0.01)


def remove(names: Sequence[str]) -> None:
    """Kill what runs in the named namespaces and delete them; report nothing."""
    with contextlib.suppress(LabError):
        kill_all_in(names)
    with contextlib.suppress(LabError):
        ip_batch((f"netns del {name}" for name in names), force=True)


# ---------------------------------------------------------------------------------------------
# Owners: a lock file per prefix, held while the lab lives


def lock(prefix: str) -> tuple[int, bool] | None:
    """Lock `prefix`'s file: (fd, whether the file was there before), or None if held."""
    path = _LOCK_DIR / f"{prefix}.lock"
    try:
        _LOCK_DIR.mkdir(mode=0o755, exist_ok=True)
        existed = path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise LabError(f"cannot make the lab's lock file {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd, existed


def unlock(prefix: str, fd: int, *, remove: bool) -> None:
    if remove:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_LOCK_DIR / f"{prefix}.lock")
    os.close(fd)


def sweep_stale() -> None:
    """Remove the labs whose owner died: namespaces whose prefix has a lock file nobody holds."""
    try:
        prefixes = {name.split("-", 1)[0] for name in os.listdir(NETNS_DIR) if "-" in name}
    except FileNotFoundError:
        return
    for prefix in sorted(prefixes):
        if not (_LOCK_DIR / f"{prefix}.lock").exists():
            continue  # not a lab's, or a lab of another /run: not ours to judge
        held = lock(prefix)
        if held is not None:
            remove(listed(prefix))
            unlock(prefix, held[0], remove=not listed(prefix))
