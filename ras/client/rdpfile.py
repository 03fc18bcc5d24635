""".rdp files for mstsc (and xfreerdp, which reads them too) that reach a resource through a
gateway's RDP load balancer.

The file names the gateway's RDP port as the server (``full address:s:HOST:PORT``) and carries
the broker's routing token in ``loadbalanceinfo:s:Cookie: msts=TOKEN``: the RDP client sends
that line, plus CR LF, in its X.224 Connection Request, which is where the gateway reads it.
Lines are ``name:type:value`` (``s`` string, ``i`` integer), ended by CR LF.

A published application, document or folder adds the lines that start it instead of a desktop
(:class:`ras.client.programs.Program`): RemoteApp's ``remoteapplication*`` for Windows hosts,
``alternate shell`` and ``shell working directory`` for xrdp.
"""

from __future__ import annotations

from ras.client.programs import Program

__all__ = ["parse_rdp_file", "render_rdp_file"]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_rdp_file(
    *, host: str, port: int, token: str, username: str = "", program: Program | None = None
) -> str:
    """The text of an .rdp file for ``host:port`` (the gateway's RDP port) with ``token``;
    ``program``: what the session starts instead of a desktop."""
    program = program or Program()
    checked = [("host", host), ("token", token), ("username", username)]
    checked += [(f"program {key}", getattr(program, key)) for key in Program.__slots__]
    for what, value in checked:
        if not value:
            continue
        if any(c in value for c in "\r\n") or not value.isprintable():
            raise ValueError(f"the {what} cannot go into an .rdp file")
    settings = [
        f"full address:s:{_address(host, port)}",
        f"loadbalanceinfo:s:Cookie: msts={token}",
        # The RDP port of the gateway is the only way in: no RD Gateway, no redirection.
        "gatewayusagemethod:i:0",
        "use redirection server name:i:0",
        "prompt for credentials:i:1",
        "authentication level:i:2",
        "enablecredsspsupport:i:1",
    ]
    if username:
        settings.append(f"username:s:{username}")
    settings += program.rdp_file_lines()
    return "\r\n".join(settings) + "\r\n"


def parse_rdp_file(text: str) -> dict[str, str]:
    """``name -> value`` of an .rdp file's settings (types dropped; later lines win)."""
    out: dict[str, str] = {}
    for line in text.lstrip("\ufeff").splitlines():
        name, sep1, rest = line.partition(":")
        kind, sep2, value = rest.partition(":")
        if sep1 and sep2 and kind in ("s", "i", "b"):
            out[name.strip().lower()] = value
    return out
