"""xrdp's sessions on a Linux host, read from /proc: whose, on which display, connected or not.

Theory of operation. xrdp's session manager (sesman) starts one X server per session:
``Xorg :N ... -config xrdp/xorg.conf``, running as the session's user, and the session lives
as long as its window manager (or the published program that replaced it) runs, whether an
RDP client is connected or not. While a client is connected, xrdp's process for that
connection holds a connection to the session's Unix socket ``xrdp_display_N`` (in sesman's
socket directory, ``/run/xrdp/sockdir``); when the client goes away the X server keeps only its
listening socket. So:

- a session is an Xorg process with xrdp's ``-config xrdp/xorg.conf``; its id is the display
  number N, its user the owner of the process;
- it is *active* when ``/proc/net/unix`` lists a connected (state 03) socket bound to a path
  ending in ``/xrdp_display_N``, else *disconnected* (reconnecting lands in it again: sesman
  gives a user back their session on the same display).

Disconnecting a session from the host: xrdp listens on a datagram socket
``xrdp_disconnect_display_N`` in the same directory, and ends the RDP connection (keeping
the session) when a datagram arrives, which is what ``xrdp-dis`` does from inside the session.

The session's program: sesman forks once per session; that process starts the X server, the
channel server (``xrdp-chansrv``) and the session's program: the client's alternate shell (run
as ``sh -c LINE`` when the line holds a blank, else directly) or the desktop (the window
manager script). :func:`session_program` finds it as the X server's sibling, and
:func:`allowed` says whether its command line is one the host allows (the agent's guard ends
the session if not: xrdp 0.9 itself runs any alternate shell a client sends).
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ras.protocol import SessionState

__all__ = ["XrdpSession", "allowed", "disconnect", "session_program", "xrdp_sessions"]

_DISPLAY_SOCKET = re.compile(r"/xrdp_display_(\d+)$")
_CONNECTED = "03"


@dataclass(frozen=True, slots=True)
class XrdpSession:
    display: int
    user: str
    pid: int  # the session's X server
    state: SessionState


def _xorg_sessions(proc: Path) -> list[tuple[int, str, int]]:
    """(display, user, pid) of every X server xrdp's sesman started."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            uid = entry.stat().st_uid
        except OSError:
            continue  # gone meanwhile
        if not argv or not argv[0].endswith(b"Xorg") or b"xrdp/xorg.conf" not in argv:
            continue
        display = next((a[1:] for a in argv[1:] if a.startswith(b":") and a[1:].isdigit()), None)
        if display is None:
            continue
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        found.append((int(display), user, int(entry.name)))
    return sorted(found)


def _connected_displays(proc: Path) -> set[int]:
    """Displays whose xrdp socket has a connected client (an RDP connection is attached)."""
    connected: set[int] = set()
    try:
        lines = (proc / "net" / "unix").read_text().splitlines()[1:]
    except OSError:
        return connected
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or fields[5] != _CONNECTED:
            continue
        match = _DISPLAY_SOCKET.search(fields[7])
        if match:
            connected.add(int(match.group(1)))
    return connected


def xrdp_sessions(proc: Path = Path("/proc")) -> list[XrdpSession]:
    """The xrdp sessions on this host, by display."""
    connected = _connected_displays(proc)
    return [
        XrdpSession(
            display,
            user,
            pid,
            SessionState.ACTIVE if display in connected else SessionState.DISCONNECTED,
        )
        for display, user, pid in _xorg_sessions(proc)
    ]


def disconnect(display: int, sockdir: Path = Path("/run/xrdp/sockdir")) -> None:
    """Ask xrdp to drop the RDP connection of the session on ``display`` (the session stays).
    OSError if there is no such socket (no session, or no client connected)."""
    path = sockdir / f"xrdp_disconnect_display_{display}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"disconnect", os.fspath(path))


def _ppid(proc: Path, pid: int) -> int | None:
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def session_program(session: XrdpSession, proc: Path = Path("/proc")) -> str | None:
    """The command line of the session's program (None while sesman has not started it: the
    child that will run it is a copy of sesman until the X server is up)."""
    parent = _ppid(proc, session.pid)
    if parent is None:
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == session.pid:
            continue
        if _ppid(proc, int(entry.name)) != parent:
            continue
        try:
            argv = [
                a.decode("utf-8", "replace") for a in (entry / "cmdline").read_bytes().split(b"\0")
            ]
        except OSError:
            continue
        argv = argv[:-1] if argv and argv[-1] == "" else argv
        if not argv or Path(argv[0]).name == "xrdp-chansrv":
            continue
        if Path(argv[0]).name == "xrdp-sesman":  # forked, waiting for the X server to exec it
            return None
        if len(argv) >= 3 and Path(argv[0]).name == "sh" and argv[1] == "-c":
            return argv[2]
        return " ".join(argv)
    return None


def allowed(line: str, programs: Iterable[str]) -> bool:
    """Whether ``line`` is one of ``programs``, or one of them followed by one file as the
    client writes it (a single POSIX-shell-quoted word: nothing else the shell would run)."""
    for program in programs:
        if line == program:
            return True
        if line.startswith(program + " "):
            rest = line[len(program) + 1 :]
            try:
                words = shlex.split(rest)
            except ValueError:
                continue
            if len(words) == 1 and rest == shlex.quote(words[0]):
                return True
    return False
