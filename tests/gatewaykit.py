"""A real ``ras gateway`` process linked to the in-process farm (``farmkit.farm``), plain
port only, and a client's tunnel through it.

- `gateway_toml(f, tmp_path, drain_timeout_s=...)` writes the process's gateway.toml (name
  ``gwproc``, a free plain port, the farm's certificates and broker) and returns its path and
  port.
- `tunnel_through(f, port)` logs the demo user in through that port, launches ``desktop`` and
  opens the tunnel; `echo(tunnel, data)` sends ``data`` and reads as many bytes back.
"""

from __future__ import annotations

import socket
from pathlib import Path

import trio
from farmkit import PASSWORD, USER, Farm

from ras.client.config import ClientConfig
from ras.client.session import ClientSession
from ras.protocol import Mode

__all__ = ["echo", "gateway_toml", "tunnel_through"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_toml(f: Farm, tmp_path: Path, *, drain_timeout_s: float) -> tuple[str, int]:
    cert, key = f.pki.ensure("gwproc", ("localhost", "127.0.0.1"))
    pub_cert, pub_key = f.pki.ensure_self_signed("gwproc-public", ("localhost", "127.0.0.1"))
    port = _free_port()
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'name = "gwproc"\nlisten_host = "127.0.0.1"\nplain_port = {port}\n'
        "tls_enabled = false\n"
        f'cert_file = "{cert}"\nkey_file = "{key}"\nca_file = "{f.pki.ca_path}"\n'
        f'public_cert_file = "{pub_cert}"\npublic_key_file = "{pub_key}"\n'
        f"broker_port = {f.broker_addrs['gateways'][1]}\nlink_ping_interval_s = 0.5\n"
        f"drain_timeout_s = {drain_timeout_s}\n"
    )
    return str(path), port


async def tunnel_through(f: Farm, port: int) -> trio.abc.Stream:
    cfg = ClientConfig(server_host="127.0.0.1", server_port=port, mode=Mode.GATEWAY)
    async with await ClientSession.connect(cfg) as session:
        await session.authenticate(USER, PASSWORD)
        ticket = (await session.launch("desktop")).ticket
        return await session.open_tunnel(ticket)


async def echo(tunnel: trio.abc.Stream, data: bytes) -> bytes:
    await tunnel.send_all(data)
    got = b""
    while len(got) < len(data):
        got += await tunnel.receive_some()
    return got
