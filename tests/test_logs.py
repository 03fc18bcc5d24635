"""Log lines no value can break: the formatter the ``ras`` command installs, and a real
``ras broker`` whose admin API is sent a user name made to forge a line.

What an operator notices: one line per event, whatever a client put in a field; a CR LF, NUL,
ESC or C1 character shows as an escape, never raw.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import ssl
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
from farmkit import LOOPBACK, farm

from ras.cli.common import setup_logging
from ras.logs import escape
from ras.pki import FarmPKI

LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ras(\.[a-z.]+)? [A-Z]+ ")
FORGED = "x\r\n2026-11-21T07:05:52.495Z ras.broker INFO FORGED auth ok user=admin client=127.0.0.1"
RAW = ["\r", "\n", "\x00", "\x1b", "\x85", "\x9b", "\u2028", "\ud800"]


@pytest.fixture
def ras_logging() -> Iterator[io.StringIO]:
    """What the ``ras`` command's logging writes (to stderr there, to a buffer here); the
    logger is put back after."""
    root = logging.getLogger("ras")
    saved = root.handlers[:], root.level, root.propagate
    setup_logging("debug")
    [handler] = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    buffer = io.StringIO()
    handler.setStream(buffer)
    try:
        yield buffer
    finally:
        root.handlers[:], root.level, root.propagate = saved


def test_escape():
    assert escape("a\r\nb") == "a\\r\\nb"
    assert escape("\x00\x1b[31m\x7f\x85\u2028\ud800") == "\\x00\\x1b[31m\\x7f\\x85\\u2028\\ud800"
    assert escape("C:\\Temp\\n") == "C:\\\\Temp\\\\n"  # a backslash in the value: doubled
    assert escape("naïve ünïcode ✓") == "naïve ünïcode ✓"


def test_every_field_stays_on_its_line(ras_logging):
    log = logging.getLogger("ras.broker")
    log.warning("auth failed user=%s client=%s", FORGED, "127.0.0.1")
    log.info("ldap auth refused user=%r reason=%s", "a\nb", ValueError("bad\r\nthing"))
    log.info("retry_in=%.0fs count=%d", 12.4, 3)  # numbers keep their formats
    log.info("preformatted " + FORGED)  # a message with no arguments: escaped whole
    for char in RAW:
        log.info("user=%s", f"a{char}b")
    try:
        raise RuntimeError(FORGED)
    except RuntimeError:
        log.exception("bug user=%s", FORGED)
    err = ras_logging.getvalue()
    lines = err.splitlines()
    starts = [line for line in lines if LINE.match(line)]
    assert len(starts) == 5 + len(RAW), err
    # Only a traceback continues an event, and every line of it is indented.
    assert all(LINE.match(line) or line.startswith("    ") for line in lines), err
    assert not any(char in err for char in RAW if char != "\n"), err
    assert "user=x\\r\\n2026-11-21T07:05:52.495Z ras.broker INFO FORGED" in err
    assert "user='a\\nb' reason=bad\\r\\nthing" in err
    assert "retry_in=12s count=3" in err
    assert "user=a\\x85b" in err
    assert "user=a\\ud800b" in err


# -- a real broker --------------------------------------------------------------------------------


async def _post(port: int, ca: Path, path: str, body: bytes) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    stream = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="localhost"
    )
    head = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n\r\n"
    async with stream:
        await stream.send_all(head.encode() + body)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return int(data.split()[1])


async def test_a_forged_user_name_stays_one_line_in_the_brokers_log(tmp_path):
    pki = FarmPKI(tmp_path / "pki")
    pki.init_ca()
    cert, key = pki.ensure("broker", LOOPBACK)
    config = tmp_path / "broker.toml"
    config.write_text(
        f'listen_host = "127.0.0.1"\ngateway_port = 0\nagent_port = 0\nadmin_port = 0\n'
        f'database = "broker.sqlite3"\ncert_file = "{cert}"\nkey_file = "{key}"\n'
        f'ca_file = "{pki.ca_path}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAS_")}
    async with trio.open_nursery() as nursery:
        run = partial(
            trio.run_process,
            [sys.executable, "-m", "ras", "broker", "--config", str(config)],
            stdin=b"", stderr=subprocess.PIPE, env=env, check=False,
        )  # fmt: skip
        broker = await nursery.start(run)
        assert broker.stderr is not None
        seen = b""
        with trio.fail_after(60):
            while (found := re.search(rb"what=admin on=127\.0\.0\.1:(\d+)", seen)) is None:
                chunk = await broker.stderr.receive_some(65536)
                assert chunk, seen.decode()
                seen += chunk
            port = int(found.group(1))
            for name in (FORGED, "\x00\x1b[2J\x1b]0;pwned\x07\x85\u2028"):
                body = json.dumps({"username": name, "password": "wrong"}).encode()
                assert await _post(port, pki.ca_path, "/api/session/logon", body) == 401
            broker.terminate()
            while chunk := await broker.stderr.receive_some(65536):
                seen += chunk
    err = seen.decode("utf-8", "surrogateescape")
    lines = err.splitlines()
    assert all(LINE.match(line) for line in lines), err
    assert not any(line.split(" ", 1)[1].startswith("ras.broker INFO FORGED") for line in lines)
    assert "user=x\\r\\n2026-11-21T07:05:52.495Z ras.broker INFO FORGED auth ok" in err
    assert "user=\\x00\\x1b[2J\\x1b]0;pwned\\x07\\x85\\u2028 client=" in err
    assert not any(char in err for char in ("\r", "\x00", "\x1b", "\x07", "\x85", "\u2028"))


async def test_the_gateway_says_its_tls_port_is_tls(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ras")
    async with farm(tmp_path) as f:
        tls_port = f.gateway_addrs["gateway"]["tls"][1]
        plain_port = f.gateway_addrs["gateway"]["plain"][1]
    lines = [r.getMessage() for r in caplog.records if r.name == "ras.gateway"]
    # It said tls=False: the front door, not the listener, does the TLS.
    assert f"listening what=tls on=127.0.0.1:{tls_port} tls=True" in lines
    assert f"listening what=plain on=127.0.0.1:{plain_port} tls=False" in lines
