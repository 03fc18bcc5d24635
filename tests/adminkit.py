"""The broker's admin API in tests: an administrator's calls on the in-process farm
(``farmkit.farm``), the real ``ras admin`` command, and what the gateway's TLS port presents.

- `with_admin(f)` adds the administrator `ADMIN` (password `ADMIN_PASSWORD`);
  `logged_on(f)` is an `AdminClient` logged on as them, `admin_client(f)` one not logged on.
- `call` makes a request off the trio thread; `refused` expects an `AdminApiError`.
- `ras_admin(f, tmp_path, *args)` runs ``python -m ras admin`` as the administrator.
- `presented(addr)` is the certificate a TLS port presents to a new connection, `presents`
  waits until the farm's gateway presents the one with a serial number, `serial_of` reads one.
"""

from __future__ import annotations

import os
import ssl
import sys
from pathlib import Path

import pytest
import trio
from cryptography import x509
from farmkit import Farm

from ras.broker.passwords import hash_password
from ras.broker.store import UserRecord
from ras.cli.admin import AdminApiError, AdminClient

__all__ = [
    "ADMIN",
    "ADMIN_PASSWORD",
    "admin_client",
    "call",
    "logged_on",
    "presented",
    "presents",
    "ras_admin",
    "refused",
    "serial_of",
    "with_admin",
]

ADMIN, ADMIN_PASSWORD = "root", "admin password 1"


def admin_client(f: Farm, **kw: object) -> AdminClient:
    host, port = f.broker_addrs["admin"]
    return AdminClient(f"https://{host}:{port}", f.pki.ca_path, **kw)  # type: ignore[arg-type]


async def call(api: AdminClient, method: str, path: str, body: object = None, **kw: object):
    return await trio.to_thread.run_sync(lambda: api.request(method, path, body, **kw))


async def refused(api: AdminClient, method: str, path: str, body: object = None, **kw: object):
    with pytest.raises(AdminApiError) as info:
        await call(api, method, path, body, **kw)
    return info.value


async def logged_on(f: Farm) -> AdminClient:
    api = admin_client(f)
    await trio.to_thread.run_sync(api.logon, ADMIN, ADMIN_PASSWORD)
    return api


def with_admin(f: Farm) -> Farm:
    f.store.put_user(UserRecord(ADMIN, hash_password(ADMIN_PASSWORD), ("ras-admins",)))
    return f


async def ras_admin(f: Farm, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    host, port = f.broker_addrs["admin"]
    pw = tmp_path / "admin.password"
    pw.write_text(ADMIN_PASSWORD + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAS_")}
    env["RAS_NEW_PASSWORD"] = "new user pw"
    result = await trio.run_process(
        [sys.executable, "-m", "ras", "admin", "--url", f"https://{host}:{port}",
         "--ca-file", str(f.pki.ca_path), "--user", ADMIN, "--password-file", str(pw), *args],
        capture_stdout=True, capture_stderr=True, check=False, env=env,
        stdin=b"",
    )  # fmt: skip
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def presented(addr: tuple[str, int]) -> x509.Certificate:
    """The certificate the gateway's TLS port presents to a new connection."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    stream = trio.SSLStream(await trio.open_tcp_stream(*addr), ctx, server_hostname="localhost")
    async with stream:
        with trio.fail_after(10):
            await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def serial_of(pem: bytes | str) -> int:
    data = pem.encode() if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificate(data).serial_number


async def presents(f: Farm, serial: int) -> None:
    addr = f.gateway_addrs["gateway"]["tls"]
    with trio.fail_after(20):
        while (await presented(addr)).serial_number != serial:  # noqa: ASYNC110 (a port)
            await trio.sleep(0.05)
