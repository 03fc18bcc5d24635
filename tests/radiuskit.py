"""A private FreeRADIUS for tests: its own config directory, its own UDP port on 127.0.0.1.

The configuration is written from scratch (no copy of /etc/freeradius): one client
(127.0.0.1, the test secret, Message-Authenticator required), a ``users`` file read by the
``files`` module, and a small unlang policy after FreeRADIUS's own ``sites-available/challenge``
example:

- ``PAP_USER`` is accepted with ``PAP_PASSWORD`` (one round);
- ``CHALLENGE_USER`` with ``CHALLENGE_PASSWORD`` gets an Access-Challenge with the Reply-Message
  ``PROMPT`` and a State; the next request carrying that State is accepted if its password is
  ``CODE`` and rejected otherwise;
- everything else is rejected.

``radiusd`` runs in the foreground (``-f``), logging to a file in the directory; the server is
ready when its log says so. :meth:`FreeRadius.stop` and :meth:`FreeRadius.start` can be called
in the middle of a test (the port stays the same); the context manager always stops it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
from farmkit import USER

from ras.broker.config import FactorRuleConfig
from ras.broker.model import Factor
from ras.broker.radius import RadiusConfig

RADIUSD = shutil.which("freeradius") or shutil.which("radiusd") or "/usr/sbin/freeradius"
SECRET = "testing-secret-42"
PAP_USER = "ruth"
PAP_PASSWORD = "pap-password-1"
CHALLENGE_USER = "carol"
CHALLENGE_PASSWORD = "first-factor-2"
CODE = "314159"
GUARD_S = 30  # a hang guard for a test with FreeRADIUS, not a timing assertion
PROMPT = "Enter code"
WELCOME = "Welcome"
DENIED = "Access denied"
READY = "Ready to process requests"
START_TIMEOUT_S = 30.0


def require_freeradius() -> None:
    """Skip where FreeRADIUS is not installed; under CI (``CI`` set) fail instead."""
    if Path(RADIUSD).exists():
        return
    reason = "FreeRADIUS is missing (apt-get install freeradius freeradius-utils)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip")
    pytest.skip(reason)


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _radiusd_conf(directory: Path, port: int, secret: str, sign: bool) -> str:
    # FreeRADIUS signs replies by itself only from 3.2.5 on; a Message-Authenticator in the
    # reply list is signed when the reply is encoded.
    signature = "&Message-Authenticator := 0x00" if sign else ""
    return f"""
prefix = /usr
exec_prefix = /usr
sysconfdir = /etc
localstatedir = /var
sbindir = /usr/sbin
libdir = /usr/lib/freeradius
dictdir = /usr/share/freeradius
logdir = {directory}
raddbdir = {directory}
confdir = {directory}
modconfdir = {directory}
run_dir = {directory}
db_dir = {directory}
radacctdir = {directory}
name = radiusd
pidfile = {directory}/radiusd.pid
max_request_time = 30
cleanup_delay = 0
max_requests = 1024
hostname_lookups = no
correct_escapes = true

log {{
    destination = files
    file = {directory}/radiusd.log
    colourise = no
    auth = yes
    auth_badpass = no
    auth_goodpass = no
}}

security {{
    allow_core_dumps = no
    max_attributes = 200
    reject_delay = 0
    status_server = yes
}}

thread pool {{
    start_servers = 2
    max_servers = 4
    min_spare_servers = 1
    max_spare_servers = 3
    max_requests_per_server = 0
}}

client test {{
    ipaddr = 127.0.0.1
    secret = "{secret}"
    require_message_authenticator = yes
    nas_type = other
}}

modules {{
    pap {{
        normalise = no
    }}
    files {{
        filename = {directory}/users
    }}
    always reject {{
        rcode = reject
    }}
    always handled {{
        rcode = handled
    }}
}}

server default {{
    listen {{
        type = auth
        ipaddr = 127.0.0.1
        port = {port}
    }}

    authorize {{
        if (!&User-Password) {{
            reject
        }}
        if (!&State) {{
            files
            if (!&control:Cleartext-Password) {{
                reject
            }}
            update control {{
                &Auth-Type := Password
            }}
        }}
        else {{
            # the answer to a challenge: its State brings back our session-state (a
            # comparison with a missing attribute is false, hence == and else)
            if (&session-state:Tmp-String-0 == "code-sent") {{
                update control {{
                    &Auth-Type := Code
                    &Cleartext-Password := "{CODE}"
                }}
            }}
            else {{
                reject
            }}
        }}
    }}

    authenticate {{
        Auth-Type Password {{
            pap
            if (&control:Tmp-String-1 == "challenge") {{
                update session-state {{
                    &Tmp-String-0 := "code-sent"
                }}
                update reply {{
                    &Reply-Message := "{PROMPT}"
                    {signature}
                }}
                update control {{
                    &Response-Packet-Type := Access-Challenge
                }}
                handled
            }}
        }}
        Auth-Type Code {{
            pap
        }}
    }}

    post-auth {{
        update reply {{
            &Reply-Message := "{WELCOME}"
            {signature}
        }}
        Post-Auth-Type REJECT {{
            update reply {{
                &Reply-Message := "{DENIED}"
                {signature}
            }}
        }}
    }}
}}
"""


USERS: dict[str, tuple[str, bool]] = {
    PAP_USER: (PAP_PASSWORD, False),
    CHALLENGE_USER: (CHALLENGE_PASSWORD, True),
}


def _users(users: Mapping[str, tuple[str, bool]]) -> str:
    """The ``files`` module's users file: name, password, and whether a code is asked next."""
    lines = []
    for name, (password, challenge) in users.items():
        check = f'Cleartext-Password := "{password}"'
        if challenge:
            check += ', Tmp-String-1 := "challenge"'
        lines.append(f"{name}\t{check}\n")
    return "\n".join(lines)


class FreeRadius:
    """One private radiusd. ``port`` is chosen once and kept across restarts. ``users`` maps
    a name to its password and whether the code round follows; ``sign`` makes every reply
    carry a Message-Authenticator."""

    def __init__(
        self,
        directory: Path,
        *,
        secret: str = SECRET,
        port: int | None = None,
        users: Mapping[str, tuple[str, bool]] = USERS,
        sign: bool = True,
    ) -> None:
        require_freeradius()
        self.directory = directory
        self.secret = secret
        self.port = port or free_udp_port()
        self.process: trio.Process | None = None
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "radiusd.conf").write_text(_radiusd_conf(directory, self.port, secret, sign))
        (directory / "users").write_text(_users(users))
        (directory / "dictionary").write_text("# the server's own additions: none\n")
        self.secret_file = directory / "secret"
        self.secret_file.write_text(secret + "\n")
        self.secret_file.chmod(0o600)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "radiusd.log"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def start(self) -> None:
        """Start radiusd and return once it is ready; raise with its log if it is not."""
        assert self.process is None, "already running"
        seen = len(self.log_text())
        # errors before the log file is open (a config that does not parse) go to stderr
        with (self.directory / "radiusd.log").open("a") as console:
            self.process = await trio.lowlevel.open_process(
                [RADIUSD, "-f", "-d", str(self.directory), "-n", "radiusd"],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
            )
        with trio.move_on_after(START_TIMEOUT_S):
            while READY not in self.log_text()[seen:]:
                if self.process.poll() is not None:
                    break
                await trio.sleep(0.05)
            else:
                return
        await self.stop()
        raise RuntimeError(f"FreeRADIUS did not start; its log:\n{self.log_text()[seen:]}")

    async def stop(self) -> None:
        """Stop radiusd (SIGTERM, then SIGKILL) and wait until its port is closed."""
        process, self.process = self.process, None
        if process is None:
            return
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()


@contextlib.asynccontextmanager
async def freeradius(directory: Path, **options: Any) -> AsyncIterator[FreeRadius]:
    """A started FreeRADIUS in ``directory`` (options as for :class:`FreeRadius`), always
    stopped at the end."""
    server = FreeRadius(directory, **options)
    try:
        await server.start()
        yield server
    finally:
        await server.stop()


def farm_radius(server: FreeRadius, **options: Any) -> dict[str, object]:
    """The farm settings (``farmkit.farm(**...)``) that send farmkit's USER to ``server`` as
    a second factor."""
    return {
        "radius": RadiusConfig(
            (server.address,), server.secret_file, timeout_s=2.0, retries=1, **options
        ),
        "factor_rules": (FactorRuleConfig("radius-for-alice", Factor.RADIUS, users=(USER,)),),
    }
