"""The broker's configuration (``broker.toml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ras.broker.etcd import EtcdConfig
from ras.broker.ldapconfig import LdapConfig
from ras.broker.model import (
    Balancing,
    Factor,
    FactorRule,
    Filter,
    ResourceRecord,
    TicketScope,
)
from ras.broker.radius import RadiusConfig
from ras.broker.roles import RolesConfig
from ras.config import Invalid, check_host, check_port, check_positive
from ras.ops.config import LogFormat, MetricsConfig
from ras.protocol import ResourceKind

__all__ = ["BrokerConfig", "FactorRuleConfig", "ResourceConfig"]


def _filter(users: tuple[str, ...], groups: tuple[str, ...], clients: tuple[str, ...],
            gateways: tuple[str, ...]) -> Filter:  # fmt: skip
    try:
        return Filter(users, groups, clients, gateways)
    except Invalid as exc:  # the config file has the filter's keys at the top of the table
        raise Invalid(exc.field, exc.why) from None


@dataclass(frozen=True, slots=True)
class ResourceConfig:
    """A published resource (``[[resources]]``; see :class:`ResourceRecord` for the fields).
    Empty ``hosts`` and ``pools`` mean every registered host; empty ``users``, ``groups``,
    ``clients`` (networks) and ``gateways`` mean every authenticated user, from anywhere."""

    id: str
    name: str
    kind: ResourceKind = ResourceKind.DESKTOP
    hosts: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    command: str = ""
    arguments: str = ""
    working_dir: str = ""
    target: str = ""
    application: str = ""
    pools: tuple[str, ...] = ()
    clients: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    single_sign_on: bool = True

    def __post_init__(self) -> None:
        if not self.id or not self.id.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise Invalid("id", f"{self.id!r} must be letters, digits, '.', '-' or '_'")
        if not self.name:
            raise Invalid("name", "must not be empty")
        self.record()  # the same checks as a resource made through the admin API

    def record(self) -> ResourceRecord:
        return ResourceRecord(
            id=self.id,
            name=self.name,
            kind=self.kind,
            command=self.command,
            arguments=self.arguments,
            working_dir=self.working_dir,
            target=self.target,
            application=self.application,
            hosts=self.hosts,
            pools=self.pools,
            filter=_filter(self.users, self.groups, self.clients, self.gateways),
            single_sign_on=self.single_sign_on,
        )


@dataclass(frozen=True, slots=True)
class FactorRuleConfig:
    """A second-factor rule (``[[factor_rules]]``): logins that the filter allows need
    ``factor``. Rules from the file and from the admin API are tried by ``order``, then name."""

    name: str
    factor: Factor
    order: int = 0
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    clients: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.rule()

    def rule(self) -> FactorRule:
        return FactorRule(
            self.name,
            self.factor,
            _filter(self.users, self.groups, self.clients, self.gateways),
            self.order,
        )


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Where the broker listens, its certificates, its state and what it publishes."""

    database: Path
    cert_file: Path
    key_file: Path
    ca_file: Path
    name: str = "broker"
    listen_host: str = "127.0.0.1"
    gateway_port: int = 20002
    agent_port: int = 20003
    ticket_ttl_s: float = 60.0
    # Which gateways may redeem a launch ticket or a routing token: "farm" (any gateway with a
    # farm certificate; the resource's gateway filter is checked again for the redeeming one)
    # or "gateway" (only the one it was issued through: no HALB or failover between them).
    ticket_scope: TicketScope = TicketScope.FARM
    # A login's resume token lets the client log in again after a lost connection (a HALB
    # failover, a dead gateway) for this long, without password or second factor; 0: none.
    resume_ttl_s: float = 28800.0
    report_interval_s: float = 5.0
    host_timeout_s: float = 20.0
    handshake_timeout_s: float = 10.0
    request_timeout_s: float = 30.0
    challenge_timeout_s: float = 60.0
    resources: tuple[ResourceConfig, ...] = field(default_factory=tuple)
    # Load balancing of hosts outside any pool (a pool has its own method), and the weights
    # of the used shares of sessions, memory and CPU in a host's load (0 leaves one out).
    balancing: Balancing = Balancing.RESOURCE
    weight_sessions: float = 0.5
    weight_memory: float = 0.25
    weight_cpu: float = 0.25
    # Failed logins: at most this many per user name / per client address within
    # failure_window_s, then that name / address is refused for lockout_s.
    max_failures_per_user: int = 5
    max_failures_per_address: int = 20
    failure_window_s: float = 300.0
    lockout_s: float = 300.0
    factor_rules: tuple[FactorRuleConfig, ...] = field(default_factory=tuple)
    # The RADIUS servers of the "radius" second factor (docs/second-factor.md).
    radius: RadiusConfig | None = None
    # The LDAP / Active Directory directory (docs/directories.md); none: the built-in store.
    ldap: LdapConfig | None = None
    # Several brokers of one farm (docs/brokers.md): their shared state in an etcd cluster
    # instead of ``database`` (which then holds nothing).
    etcd: EtcdConfig | None = None
    # With [etcd]: this broker's priority, automatic promotion and failback (docs/brokers.md).
    roles: RolesConfig = field(default_factory=RolesConfig)
    # The admin API (docs/admin-api.md): HTTPS on admin_listen_host:admin_port. A logon must
    # be a member of one of admin_groups; a farm certificate whose name is in
    # admin_cert_names needs no logon. Tokens expire after admin_token_ttl_s.
    admin_enabled: bool = True
    admin_listen_host: str = "127.0.0.1"
    admin_port: int = 20443
    admin_groups: tuple[str, ...] = ("ras-admins",)
    admin_cert_names: tuple[str, ...] = ()
    admin_token_ttl_s: float = 1800.0
    # RDP load balancing on the gateways' RDP port (docs/client.md): how long a routing token
    # of an exported .rdp file works, and whether a bare "Cookie: mstshash=USER" is routed.
    routing_token_ttl_s: float = 28800.0
    mstshash_routing: bool = False
    # Operations (docs/operations.md): the opt-in /metrics listener, and the log line format.
    metrics: MetricsConfig | None = None
    log_format: LogFormat = LogFormat.TEXT
    # ACME for the farm's public certificate (docs/certificates.md): the CA's directory (Let's
    # Encrypt's by default; ``ras admin cert letsencrypt --directory`` sets another), a CA file
    # to trust for its HTTPS (a private or test CA; unset: the system's), the pauses between
    # failed attempts (doubling from min to max) and the longest an order may take.
    acme_directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    acme_ca_file: Path | None = None
    acme_retry_min_s: float = 300.0
    acme_retry_max_s: float = 21600.0
    acme_order_timeout_s: float = 300.0
    # Reports (ras admin report): logins and launches kept history_days, in history_file
    # (default: beside database, <its name>-history.sqlite3).
    history_file: Path | None = None
    history_days: float = 90.0

    @property
    def history_path(self) -> Path:
        return self.history_file or self.database.with_name(f"{self.database.stem}-history.sqlite3")

    def __post_init__(self) -> None:
        if not self.acme_directory.startswith(("https://", "http://")):
            raise Invalid("acme_directory", "must be an https:// URL")
        for key in ("acme_retry_min_s", "acme_retry_max_s", "acme_order_timeout_s"):
            check_positive(key, getattr(self, key))
        if self.acme_retry_max_s < self.acme_retry_min_s:
            raise Invalid("acme_retry_max_s", "must be at least acme_retry_min_s")
        if not 0 < self.routing_token_ttl_s <= 604800:
            raise Invalid("routing_token_ttl_s", "must be more than 0 and at most 604800 (a week)")
        check_host("admin_listen_host", self.admin_listen_host)
        check_port("admin_port", self.admin_port)
        check_positive("admin_token_ttl_s", self.admin_token_ttl_s)
        if self.admin_token_ttl_s > 86400:
            raise Invalid("admin_token_ttl_s", "must be at most 86400 (a day)")
        for i, admin in enumerate(self.admin_cert_names):
            if not admin or admin.casefold() in (self.name.casefold(), "ca"):
                raise Invalid(f"admin_cert_names[{i}]", f"{admin!r} cannot name an admin")
        check_positive("history_days", self.history_days)
        check_host("listen_host", self.listen_host)
        check_port("gateway_port", self.gateway_port)
        check_port("agent_port", self.agent_port)
        for key in (
            "ticket_ttl_s",
            "report_interval_s",
            "host_timeout_s",
            "handshake_timeout_s",
            "request_timeout_s",
            "challenge_timeout_s",
            "failure_window_s",
            "lockout_s",
        ):
            check_positive(key, getattr(self, key))
        for key in ("weight_sessions", "weight_memory", "weight_cpu"):
            if not 0 <= getattr(self, key) <= 1:
                raise Invalid(key, "must be between 0 and 1")
        if self.weight_sessions + self.weight_memory + self.weight_cpu <= 0:
            raise Invalid("weight_sessions", "at least one weight must be greater than 0")
        for key in ("max_failures_per_user", "max_failures_per_address"):
            if not 1 <= getattr(self, key) <= 1_000_000:
                raise Invalid(key, "must be between 1 and 1000000")
        names = [r.name.casefold() for r in self.factor_rules]
        dup_rules = {n for n in names if names.count(n) > 1}
        if dup_rules:
            raise Invalid("factor_rules", f"rule name {sorted(dup_rules)[0]!r} is used twice")
        for i, rule in enumerate(self.factor_rules):
            if rule.factor is Factor.RADIUS and self.radius is None:
                raise Invalid(
                    f"factor_rules[{i}].factor", "needs RADIUS servers: add a [radius] table"
                )
        if not 0 <= self.resume_ttl_s <= 604800:
            raise Invalid("resume_ttl_s", "must be between 0 (no resume) and 604800 (a week)")
        if self.ticket_ttl_s > 3600:
            raise Invalid("ticket_ttl_s", "must be at most 3600 (tickets are short-lived)")
        if self.host_timeout_s <= self.report_interval_s:
            raise Invalid("host_timeout_s", "must be longer than report_interval_s")
        ids = [r.id for r in self.resources]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise Invalid("resources", f"resource id {sorted(dup)[0]!r} is used twice")
