"""The host agent's configuration (``agent.toml``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ras.config import Invalid, check_host, check_port, check_positive
from ras.net.brokers import broker_addresses
from ras.ops.config import LogFormat, MetricsConfig
from ras.protocol import AppStart, HostKind

__all__ = ["DEFAULT_LOGOFF", "AgentConfig"]

DEFAULT_LOGOFF = ("pkill", "-HUP", "-s", "{pid}")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The host this agent speaks for (``name`` must be the name in its certificate)."""

    name: str
    cert_file: Path
    key_file: Path
    ca_file: Path
    kind: HostKind = HostKind.RDSH
    rdp_host: str = "127.0.0.1"
    rdp_port: int = 3389
    max_sessions: int = 50
    broker_host: str = "127.0.0.1"
    broker_port: int = 20003
    # Several brokers (docs/brokers.md): "host:port" of each one's agent port; the agent
    # registers with and reports to every one. Empty: broker_host:broker_port alone.
    brokers: tuple[str, ...] = ()
    connect_timeout_s: float = 10.0
    # Read the RDP server's TLS certificate at each registration and report its SHA-256: the
    # web client's gateway (the TLS client to this host for a browser) pins it. Off: the
    # gateway verifies the host under the farm CA instead (docs/webclient.md).
    report_rdp_certificate: bool = False
    retry_max_s: float = 10.0
    # Where sessions are counted: "tcp" (connections to rdp_port), "utmp" (user sessions in
    # utmp_file, with their users, so the broker knows who is where and can log them off) or
    # "xrdp" (xrdp's sessions, by display, active or disconnected: ras/agents/xrdp.py).
    sessions_from: str = "tcp"
    utmp_file: Path = Path("/var/run/utmp")
    xrdp_sockdir: Path = Path("/run/xrdp/sockdir")  # sesman's socket directory
    # What the agent runs when the broker asks it to log off / disconnect a session (utmp and
    # xrdp sessions). Each word may use {id}, {pid}, {user}, {line} and {display}; empty: not
    # supported with utmp. With xrdp, the defaults are built in: log off ends the session's X
    # server ({pid}), disconnect asks xrdp to drop the RDP connection (xrdp-dis's way).
    logoff_command: tuple[str, ...] = DEFAULT_LOGOFF
    disconnect_command: tuple[str, ...] = ()
    action_timeout_s: float = 10.0
    # Operations (docs/operations.md): the opt-in /metrics listener, and the log line format.
    metrics: MetricsConfig | None = None
    log_format: LogFormat = LogFormat.TEXT
    # How the host starts published applications: "shell" (xrdp's alternate shell) or
    # "remoteapp" (a Windows host's RemoteApp).
    apps: AppStart = AppStart.SHELL
    # xrdp hosts: the programs a session may run (what `ps` shows sesman started: the
    # published command lines, the desktop's window manager script). A session running
    # anything else is logged off at once (xrdp 0.9 runs any alternate shell a client sends).
    # Empty: no check.
    allowed_programs: tuple[str, ...] = ()
    guard_interval_s: float = 0.5
    # Report the host not ready while nothing listens on rdp_port here (a VDI guest booting
    # or being reset takes no session meanwhile).
    ready_check: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise Invalid("name", "must not be empty")
        check_host("rdp_host", self.rdp_host)
        check_host("broker_host", self.broker_host)
        check_port("rdp_port", self.rdp_port, zero_ok=False)
        check_port("broker_port", self.broker_port, zero_ok=False)
        broker_addresses(self.brokers, self.broker_host, self.broker_port)  # names a bad one
        if not 1 <= self.max_sessions <= 100_000:
            raise Invalid("max_sessions", "must be between 1 and 100000")
        check_positive("connect_timeout_s", self.connect_timeout_s)
        check_positive("retry_max_s", self.retry_max_s)
        check_positive("action_timeout_s", self.action_timeout_s)
        check_positive("guard_interval_s", self.guard_interval_s)
        if self.allowed_programs and self.sessions_from != "xrdp":
            raise Invalid("allowed_programs", 'needs sessions_from = "xrdp"')
        if self.sessions_from not in ("tcp", "utmp", "xrdp"):
            raise Invalid("sessions_from", f"{self.sessions_from!r} is not tcp, utmp or xrdp")
        for key in ("logoff_command", "disconnect_command"):
            for i, word in enumerate(getattr(self, key)):
                try:
                    word.format(id="", pid="", user="", line="", display="")
                except (KeyError, IndexError, ValueError) as exc:
                    raise Invalid(f"{key}[{i}]", f"{word!r}: bad placeholder {exc}") from None

    @property
    def broker_list(self) -> tuple[tuple[str, int], ...]:
        """The brokers the agent reports to."""
        return broker_addresses(self.brokers, self.broker_host, self.broker_port)
