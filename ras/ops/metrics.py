"""Every Prometheus metric family of the farm, in one place, and how daemons feed them.

Theory of operation. The families are module-level objects of one registry (``REGISTRY``,
process-wide: the one-machine farm runs broker, gateway and agent in one process and one
``/metrics`` shows them all). Two kinds:

- **events** (counters and histograms) are incremented where they happen, always with label
  values from a small fixed set (a result, a mode, a reason code, a configured name): never a
  user name, a client address or an error's free text. Helpers here map free text to codes
  (:func:`ticket_reason`, :func:`limit_reason`).
- **state** (how many agents are reporting, which backends are healthy, the VRRP state) is
  read from the daemons' own objects when Prometheus scrapes: a daemon registers a *source*
  (:func:`add_source`), a function that yields ``(family, labels, value)``, and removes it
  when it stops. Nothing is kept twice, and a scrape costs what the state's size costs.

The relay's hot path is not touched: a tunnel counts itself when it opens and when it ends
(its bytes, from the relay's totals), never per read (``ras.gateway.tunnels``).

Families other engineers feed: ``TUNNELS_OPENED``/``TUNNELS_OPEN``/``TUNNEL_BYTES`` by
``mode`` (a web client's tunnel is mode ``web``: :func:`tunnel_opened` and
:func:`tunnel_closed`), and ``CERT_EXPIRY`` (:func:`watch_certificate` for a file re-read at
each scrape, or ``CERT_EXPIRY.labels(daemon, certificate).set(not_after)`` when a new one is
installed). docs/operations.md lists them all.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import prometheus_client
from cryptography import x509
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ras import __version__

__all__ = [
    "AGENT_REPORTS",
    "BROKER_LAUNCHES",
    "BROKER_LAUNCH_SECONDS",
    "BROKER_LOGINS",
    "BROKER_PLACEMENTS",
    "BROKER_TICKETS",
    "CERT_EXPIRY",
    "ETCD_FAILURES",
    "ETCD_OPERATIONS",
    "GATEWAY_PREAUTH_REFUSALS",
    "HALB_BACKEND_CONNECTIONS",
    "HALB_NO_BACKEND",
    "HALB_VRRP_TRANSITIONS",
    "REGISTRY",
    "TUNNELS_OPEN",
    "TUNNELS_OPENED",
    "TUNNEL_BYTES",
    "TUNNEL_MODES",
    "TUNNEL_SECONDS",
    "Sample",
    "add_source",
    "limit_reason",
    "render",
    "source",
    "ticket_reason",
    "tunnel_closed",
    "tunnel_opened",
    "watch_certificate",
]

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: noise for every counter
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
Info("ras_build", "The ras version of this process.", registry=REGISTRY).info(
    {"version": __version__}
)

# -- broker ------------------------------------------------------------------------------------

BROKER_LOGINS = Counter(
    "ras_broker_logins",
    "Logins by result (ok, failed, throttled, unavailable) and factor (password, totp, radius, "
    "resume).",
    ["result", "factor"],
    registry=REGISTRY,
)
BROKER_LAUNCHES = Counter(
    "ras_broker_launches",
    "Launch requests by result (ok, no_host, not_found) and client mode.",
    ["result", "mode"],
    registry=REGISTRY,
)
BROKER_LAUNCH_SECONDS = Histogram(
    "ras_broker_launch_seconds",
    "Time the broker took to answer a launch (choosing the host, issuing the ticket).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
BROKER_PLACEMENTS = Counter(
    "ras_broker_placements",
    "Placement decisions by method (resource, round_robin, affinity; none: no host).",
    ["method"],
    registry=REGISTRY,
)
BROKER_TICKETS = Counter(
    "ras_broker_tickets",
    "Launch tickets and routing tokens: issued, redeemed, refused (with a reason code).",
    ["event", "reason"],
    registry=REGISTRY,
)

ETCD_OPERATIONS = (
    "range", "put", "delete", "txn", "lease_grant", "lease_keepalive", "lease_revoke", "other",
)  # fmt: skip
ETCD_FAILURES = Counter(
    "ras_broker_etcd_failures",
    "Requests of a broker on etcd that no member of the cluster answered, by operation "
    "(range, put, delete, txn, lease_grant, lease_keepalive, lease_revoke, other).",
    ["operation"],
    registry=REGISTRY,
)

# -- gateway -----------------------------------------------------------------------------------

TUNNEL_MODES = ("ticket", "token", "mstshash", "forward", "web")
TUNNELS_OPENED = Counter(
    "ras_gateway_tunnels",
    "Tunnels opened, by mode: ticket (client sessions), token and mstshash (the RDP port), "
    "forward (a forwarding gateway), web (the web client).",
    ["mode"],
    registry=REGISTRY,
)
TUNNELS_OPEN = Gauge(
    "ras_gateway_tunnels_open", "Tunnels open now, by mode.", ["mode"], registry=REGISTRY
)
TUNNEL_BYTES = Counter(
    "ras_gateway_tunnel_bytes",
    "Bytes relayed by tunnels that have ended, by mode and direction (up: client to host).",
    ["mode", "direction"],
    registry=REGISTRY,
)
TUNNEL_SECONDS = Histogram(
    "ras_gateway_tunnel_seconds",
    "How long tunnels lasted, by mode.",
    ["mode"],
    buckets=(1, 10, 60, 300, 900, 1800, 3600, 4 * 3600, 8 * 3600, 24 * 3600),
    registry=REGISTRY,
)
GATEWAY_PREAUTH_REFUSALS = Counter(
    "ras_gateway_preauth_refusals",
    "Connections refused before authentication, by limit (rate, total, per_address).",
    ["limit"],
    registry=REGISTRY,
)

# -- HALB --------------------------------------------------------------------------------------

HALB_VRRP_TRANSITIONS = Counter(
    "ras_halb_vrrp_transitions",
    "VRRP state changes of this node, by the state entered.",
    ["vrid", "state"],
    registry=REGISTRY,
)
HALB_BACKEND_CONNECTIONS = Counter(
    "ras_halb_backend_connections",
    "Client connections the HALB passed to each gateway.",
    ["gateway"],
    registry=REGISTRY,
)
HALB_NO_BACKEND = Counter(
    "ras_halb_no_backend",
    "Client connections refused because no gateway could take them.",
    registry=REGISTRY,
)

# -- agent -------------------------------------------------------------------------------------

AGENT_REPORTS = Counter(
    "ras_agent_reports", "Load reports the agent sent.", ["host"], registry=REGISTRY
)

# -- certificates ------------------------------------------------------------------------------

CERT_EXPIRY = Gauge(
    "ras_certificate_expiry_timestamp_seconds",
    "When a certificate a daemon presents stops being valid (Unix time), by daemon and "
    "certificate (farm: the mutual-TLS one; public: what clients see).",
    ["daemon", "certificate"],
    registry=REGISTRY,
)

# -- state read at scrape time ------------------------------------------------------------------

# family -> (help, label names): what sources may yield.
_STATE: dict[str, tuple[str, tuple[str, ...]]] = {
    "ras_broker_agents": (
        "Registered hosts by state: reporting, silent (no report within host_timeout_s), "
        "lying (last report refused as insane), drained, offline (agent disconnected).",
        ("state",),
    ),
    "ras_broker_sessions": (
        "Sessions the broker knows, by host and state (launching, active, disconnected).",
        ("host", "state"),
    ),
    "ras_broker_gateway_sessions": ("Sessions by the gateway they came through.", ("gateway",)),
    "ras_broker_etcd_up": (
        "1 while the broker's last request to etcd was answered by a member (brokers on etcd).",
        ("broker",),
    ),
    "ras_broker_primary": (
        "1 while this broker is the primary (a broker alone on SQLite always is), 0 if not.",
        ("broker",),
    ),
    "ras_broker_gateway_links": (
        "Registered links of each gateway to this broker (one per worker; 0: offline).",
        ("gateway",),
    ),
    "ras_gateway_next_hop_up": (
        "1 while a forwarding gateway's next hop passes its health checks.",
        ("gateway", "hop"),
    ),
    "ras_gateway_preauth_connections": (
        "Connections waiting to authenticate now.",
        ("gateway",),
    ),
    "ras_gateway_broker_link_up": (
        "1 while the gateway's link to its broker is registered (a normal gateway).",
        ("gateway",),
    ),
    "ras_agent_broker_connected": ("1 while the agent is registered with its broker.", ("host",)),
    "ras_halb_vrrp_state": (
        "1 for the VRRP state this node is in (initialize, backup, master), 0 for the others.",
        ("vrid", "state"),
    ),
    "ras_halb_vrrp_priority": ("The VRRP priority this node advertises now.", ("vrid",)),
    "ras_halb_backend_up": (
        "1 while a gateway passes the HALB's health checks.",
        ("vrid", "gateway"),
    ),
    "ras_halb_backend_active": ("Connections open now to each gateway.", ("vrid", "gateway")),
    "ras_halb_healthy_backends": ("Gateways passing health checks now.", ("vrid",)),
}

Sample = tuple[str, tuple[str, ...], float]  # family, label values, value


class _StateCollector(Collector):
    def __init__(self) -> None:
        self._sources: dict[int, Callable[[], Iterable[Sample]]] = {}
        self._lock = threading.Lock()
        self._next = 0

    def add(self, source: Callable[[], Iterable[Sample]]) -> Callable[[], None]:
        with self._lock:
            key = self._next
            self._next += 1
            self._sources[key] = source

        def remove() -> None:
            with self._lock:
                self._sources.pop(key, None)

        return remove

    def describe(self) -> Iterable[Metric]:
        return []  # families appear with their first source; none is fixed at registration

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            sources = list(self._sources.values())
        values: dict[str, dict[tuple[str, ...], float]] = {}
        for source in sources:
            for family, labels, value in source():
                bucket = values.setdefault(family, {})
                bucket[labels] = bucket.get(labels, 0.0) + value  # two sources: summed
        for family, samples in values.items():
            help_text, label_names = _STATE[family]
            metric = GaugeMetricFamily(family, help_text, labels=label_names)
            for labels, value in samples.items():
                metric.add_metric(list(labels), value)
            yield metric


_state = _StateCollector()
REGISTRY.register(_state)


def add_source(source: Callable[[], Iterable[Sample]]) -> Callable[[], None]:
    """Read ``source`` at every scrape (its families must be in ``_STATE``); returns the
    function that removes it (a daemon calls it when it stops)."""
    return _state.add(source)


@contextlib.contextmanager
def source(fn: Callable[[], Iterable[Sample]]) -> Iterator[None]:
    """``add_source`` for the life of a ``with`` block."""
    remove = add_source(fn)
    try:
        yield
    finally:
        remove()


def render() -> bytes:
    """The registry in Prometheus's text format (0.0.4)."""
    from prometheus_client import generate_latest

    return generate_latest(REGISTRY)


# -- helpers -----------------------------------------------------------------------------------

_opened = {mode: TUNNELS_OPENED.labels(mode) for mode in TUNNEL_MODES}
_open = {mode: TUNNELS_OPEN.labels(mode) for mode in TUNNEL_MODES}
_bytes = {
    (mode, way): TUNNEL_BYTES.labels(mode, way) for mode in TUNNEL_MODES for way in ("up", "down")
}
_seconds = {mode: TUNNEL_SECONDS.labels(mode) for mode in TUNNEL_MODES}


def tunnel_opened(mode: str) -> None:
    """A tunnel of ``mode`` (one of ``TUNNEL_MODES``) starts relaying."""
    if mode not in _opened:  # a new mode: its children made once, then looked up like these
        _add_mode(mode)
    _opened[mode].inc()
    _open[mode].inc()


def tunnel_closed(mode: str, up: int, down: int, seconds: float) -> None:
    """It ended, having carried ``up`` bytes from the client and ``down`` to it."""
    if mode not in _opened:
        _add_mode(mode)
    _open[mode].dec()
    _bytes[mode, "up"].inc(up)
    _bytes[mode, "down"].inc(down)
    _seconds[mode].observe(seconds)


def _add_mode(mode: str) -> None:
    _opened[mode] = TUNNELS_OPENED.labels(mode)
    _open[mode] = TUNNELS_OPEN.labels(mode)
    for way in ("up", "down"):
        _bytes[mode, way] = TUNNEL_BYTES.labels(mode, way)
    _seconds[mode] = TUNNEL_SECONDS.labels(mode)


def ticket_reason(why: str) -> str:
    """A reason code for a refused ticket or routing token (the log line keeps the text)."""
    text = why.lower()
    for needle, code in (
        ("expired", "expired"),
        ("already used", "used"),
        ("signature", "forged"),
        ("not a ", "malformed"),
        ("unreadable", "malformed"),
        ("client", "other_client"),
        ("through gateway", "other_gateway"),
        ("through this gateway", "other_gateway"),
        ("no longer published", "unpublished"),
    ):
        if needle in text:
            return code
    return "other"


def limit_reason(why: str) -> str:
    """The limit a pre-authentication refusal hit (``ras.gateway.limits`` texts)."""
    if "a second" in why:
        return "rate"
    if "from this address" in why:
        return "per_address"
    return "total"


def _not_after(path: Path) -> float | None:
    try:
        data = path.read_bytes()
        cert = x509.load_pem_x509_certificate(data)
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc.replace(tzinfo=dt.UTC).timestamp()


def watch_certificate(daemon: str, certificate: str, path: Path | None) -> None:
    """Show ``path``'s expiry as ``CERT_EXPIRY{daemon, certificate}``, read again when the
    file changes (a reload, a certificate the broker installed, a renewal)."""
    if path is None:
        return
    cache: dict[tuple[int, int], float] = {}

    def read() -> float:
        try:
            st = os.stat(path)
        except OSError:
            return float("nan")
        key = (st.st_mtime_ns, st.st_size)
        if key not in cache:
            cache.clear()
            value = _not_after(path)
            cache[key] = float("nan") if value is None else value
        return cache[key]

    CERT_EXPIRY.labels(daemon, certificate).set_function(read)
