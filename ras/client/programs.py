"""What a launch starts in the RDP session, in the words of the RDP client and of .rdp files.

The broker's ``launch_ok`` names the program of a published application (``command``,
``arguments``, ``working_dir``), the file of a document (``target``, opened with its
application's program) or the folder of a folder resource (``target``, opened with the
host's file manager), and how the chosen host starts it (``start``):

- ``shell`` (Linux hosts with xrdp): the *alternate shell* of the RDP Info PDU, the session's
  only program in place of a desktop: ``xfreerdp /shell:CMDLINE /shell-dir:DIR``, or the
  ``alternate shell:s:`` and ``shell working directory:s:`` lines of an .rdp file. xrdp's
  sesman runs a command line with blanks through ``/bin/sh -c``, so the file is quoted as a
  POSIX shell word.
- ``remoteapp`` (Windows RD Session Hosts): RemoteApp, ``xfreerdp /app:PROGRAM /app-cmd:ARGS``
  or the ``remoteapplication*`` lines; the file is one argument, quoted the Windows way.

A desktop (no program) adds nothing.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from ras.protocol import AppStart, LaunchOk, RdpTokenOk

__all__ = ["DEFAULT_OPENER", "Program"]

# What opens a document or folder on a Linux host when its resource names no program.
DEFAULT_OPENER = "xdg-open"


def _windows_quote(word: str) -> str:
    return f'"{word}"' if any(c in word for c in ' \t"') else word


@dataclass(frozen=True, slots=True)
class Program:
    """The program a launch starts (``command`` empty: a desktop)."""

    command: str = ""
    arguments: str = ""
    working_dir: str = ""
    target: str = ""
    start: str = ""  # an AppStart value, or "" for a desktop
    name: str = ""  # shown by RemoteApp clients

    @classmethod
    def from_launch(cls, launched: LaunchOk | RdpTokenOk, name: str = "") -> Program:
        """From a ``launch_ok`` (or an ``rdp_token_ok``, for an .rdp file)."""
        command = launched.command
        if not command and launched.target:  # a document or folder with no program named
            command = DEFAULT_OPENER if launched.start != AppStart.REMOTEAPP else "explorer.exe"
        return cls(
            command, launched.arguments, launched.working_dir, launched.target,
            launched.start if command else "", name,
        )  # fmt: skip

    @property
    def desktop(self) -> bool:
        return not self.command

    @property
    def remoteapp(self) -> bool:
        return self.start == AppStart.REMOTEAPP

    def command_line(self) -> str:
        """The alternate shell: the program, its arguments, then the file (one shell word)."""
        words = [self.command]
        if self.arguments:
            words.append(self.arguments)
        if self.target:
            words.append(shlex.quote(self.target))
        return " ".join(words)

    def remote_arguments(self) -> str:
        """RemoteApp's command line: the arguments, then the file (quoted the Windows way)."""
        words = [self.arguments] if self.arguments else []
        if self.target:
            words.append(_windows_quote(self.target))
        return " ".join(words)

    def xfreerdp_options(self) -> list[str]:
        """xfreerdp's options that start this program instead of a desktop."""
        if self.desktop:
            return []
        if self.remoteapp:
            options = [f"/app:{self.command}"]
            if cmd := self.remote_arguments():
                options.append(f"/app-cmd:{cmd}")
            if self.working_dir:
                options.append(f"/app-workdir:{self.working_dir}")
            if self.name:
                options.append(f"/app-name:{self.name}")
            return options
        options = [f"/shell:{self.command_line()}"]
        if self.working_dir:
            options.append(f"/shell-dir:{self.working_dir}")
        return options

    def rdp_file_lines(self) -> list[str]:
        """The lines of an .rdp file that start this program (mstsc and xfreerdp read them)."""
        if self.desktop:
            return []
        if self.remoteapp:
            lines = [
                "remoteapplicationmode:i:1",
                f"remoteapplicationprogram:s:{self.command}",
                f"remoteapplicationname:s:{self.name or self.command}",
            ]
            if cmd := self.remote_arguments():
                lines.append(f"remoteapplicationcmdline:s:{cmd}")
            if self.working_dir:
                lines.append(f"remoteapplicationexpandworkingdir:s:{self.working_dir}")
            return lines
        lines = [f"alternate shell:s:{self.command_line()}"]
        if self.working_dir:
            lines.append(f"shell working directory:s:{self.working_dir}")
        return lines
