"""The RDP client's command line for a launch, and single sign-on to the host.

Single sign-on: where the resource's host trusts the farm's directory (``launch_ok`` says
``single_sign_on``), the user's farm credentials log them in to the host too, so they type
their password once. xfreerdp gets the user name on its command line and the password on its
standard input (``/from-stdin:force``: it reads the password from stdin before connecting and
gives it to NLA), so the password is never in an argument (``ps``), an environment, a file or a
log. Single sign-on is off when the user gives the RDP client credentials of their own
(``/u:``, ``/p:``, ``/from-stdin``, an .rdp file), or when the RDP client is not xfreerdp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ras.client.programs import Program

__all__ = ["RdpCommand", "rdp_command"]

# Options by which the user speaks for themselves: their credentials win over the farm's.
_OWN_CREDENTIALS = ("/u:", "/p:", "/from-stdin", "/pth:", "/d:")


@dataclass(frozen=True, slots=True)
class RdpCommand:
    argv: list[str]
    stdin: bytes | None  # what to write to the RDP client's standard input (then close it)

    @property
    def single_sign_on(self) -> bool:
        return self.stdin is not None


def _is_freerdp(command: str) -> bool:
    return "freerdp" in Path(command).name


def rdp_command(
    rdp: str,
    target: str,
    program: Program,
    passthrough: Sequence[str] = (),
    *,
    sso: tuple[str, str] | None = None,
) -> RdpCommand:
    """xfreerdp's command for a launch: ``/v:TARGET``, the program's options, then
    ``passthrough`` as the user gave it. ``sso``: (user, password) to log in to the host with,
    or None."""
    argv = [rdp, f"/v:{target}"]
    if _is_freerdp(rdp):
        argv += program.xfreerdp_options()
    own = any(a.startswith(_OWN_CREDENTIALS) or a.endswith(".rdp") for a in passthrough)
    stdin = None
    if sso is not None and _is_freerdp(rdp) and not own:
        user, password = sso
        argv += [f"/u:{user}", "/from-stdin:force"]
        stdin = (password + "\n").encode()
    argv += passthrough
    return RdpCommand(argv, stdin)
