"""Simulated agents: N host agents in one process, reporting scripted load.

For scale tests, benchmarks and demos without N machines. Each simulated host is a real
:class:`ras.agents.agent.Agent` (the same registration, reports, pings, reconnection and
answers to the broker over its own mutual-TLS connection) whose measurements come from a
script instead of /proc.

Certificates. The broker keeps its rule for simulated hosts too: an agent may only register
the host its certificate names. So each simulated host gets its own farm certificate, issued
at start-up from the farm CA (which needs the CA key, so simulation runs where the CA lives:
a lab, a test, the one-machine farm) and kept in a cache directory for the next run; issuing
takes well under a millisecond per host and loading a TLS context about 1.5 ms, so 5,000
hosts are ready in seconds. There is no wildcard or prefix certificate a broker would have to
accept: nothing about real agents is weakened.

Load scripts (``profile``), per host, seeded so a run can be repeated:

- ``steady``: CPU and memory around a per-host base with a slow sine swing, a fixed number
  of sessions.
- ``busy``: the same around high bases, many sessions.
- ``random``: a bounded random walk of all counters at each report.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from ras.agents.agent import Agent
from ras.agents.config import AgentConfig
from ras.errors import ErrorCode, PKIError
from ras.pki import FarmPKI, issue_certificate, write_key_pair
from ras.protocol import (
    Error,
    LoadReport,
    Message,
    SessionAction,
    SessionActionKind,
    SessionActionOk,
    SessionInfo,
    SessionState,
)

__all__ = ["Profile", "Script", "SimulatedAgent", "prepare_certificates", "simulate"]

log = logging.getLogger("ras.agent.simulate")


class Profile(enum.StrEnum):
    STEADY = "steady"
    BUSY = "busy"
    RANDOM = "random"


@dataclass(slots=True)
class Script:
    """The scripted load of one host: what it reports at time ``t`` (seconds from start).

    Its sessions are a list of (id, user, state), so the broker learns who is where, and an
    administrator's log off or disconnect changes them (:meth:`act`)."""

    profile: Profile
    max_sessions: int
    rng: random.Random
    cpu: float = 0.0
    memory: float = 0.0
    sessions: dict[str, SessionInfo] = field(default_factory=dict)
    period_s: float = 300.0
    phase: float = 0.0
    _next_id: int = 0

    def __post_init__(self) -> None:
        rng = self.rng
        self.phase = rng.uniform(0, 2 * math.pi)
        self.period_s = rng.uniform(120, 600)
        cap = self.max_sessions
        if self.profile is Profile.BUSY:
            self.cpu, self.memory = rng.uniform(60, 90), rng.uniform(60, 85)
            count = rng.randint(cap // 2, max(cap // 2, cap * 9 // 10))
        else:
            self.cpu, self.memory = rng.uniform(5, 40), rng.uniform(20, 60)
            count = rng.randint(0, max(0, cap // 4))
        for _ in range(count):
            self._open()
        for sid in list(self.sessions)[: rng.randint(0, 2)]:
            self._set(sid, SessionState.DISCONNECTED)

    def _open(self) -> None:
        self._next_id += 1
        sid = f"s{self._next_id}"
        user = f"user{self.rng.randint(1, 9999):04d}"
        self.sessions[sid] = SessionInfo(sid, user, SessionState.ACTIVE)

    def _set(self, sid: str, state: SessionState) -> None:
        self.sessions[sid] = dataclasses.replace(self.sessions[sid], state=state)

    def act(self, sid: str, action: SessionActionKind) -> bool:
        """Log off or disconnect session ``sid``; False if there is no such session."""
        if sid not in self.sessions:
            return False
        if action is SessionActionKind.LOGOFF:
            del self.sessions[sid]
        else:
            self._set(sid, SessionState.DISCONNECTED)
        return True

    def report(self, t: float) -> LoadReport:
        if self.profile is Profile.RANDOM:
            rng = self.rng
            self.cpu = _clamp(self.cpu + rng.gauss(0, 8), 0, 100)
            self.memory = _clamp(self.memory + rng.gauss(0, 3), 5, 95)
            step = rng.randint(-2, 2)
            for _ in range(max(0, min(step, self.max_sessions - len(self.sessions)))):
                self._open()
            for sid in rng.sample(sorted(self.sessions), max(0, min(-step, len(self.sessions)))):
                del self.sessions[sid]
            if self.sessions and rng.random() < 0.2:
                sid = rng.choice(sorted(self.sessions))
                state = self.sessions[sid].state
                self._set(
                    sid,
                    SessionState.ACTIVE if state == "disconnected" else SessionState.DISCONNECTED,
                )
            cpu, memory = self.cpu, self.memory
        else:
            swing = math.sin(2 * math.pi * t / self.period_s + self.phase)
            cpu = _clamp(self.cpu + 10 * swing, 0, 100)
            memory = _clamp(self.memory + 3 * swing, 0, 100)
        detail = tuple(self.sessions.values())
        return LoadReport(
            cpu_percent=round(cpu, 1),
            memory_percent=round(memory, 1),
            sessions=len(detail),
            disconnected=sum(1 for s in detail if s.state is SessionState.DISCONNECTED),
            sessions_detail=detail,
        )


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


class SimulatedAgent(Agent):
    """An agent whose load comes from a :class:`Script`."""

    def __init__(self, config: AgentConfig, script: Script) -> None:
        super().__init__(config)
        self.script = script
        self._t0: float | None = None

    def measure(self) -> LoadReport:
        now = trio.current_time()
        if self._t0 is None:
            self._t0 = now
        return self.script.report(now - self._t0)

    async def act(self, request: SessionAction) -> Message:
        if not self.script.act(request.session_id, request.action):
            return Error(ErrorCode.NOT_FOUND, f"no session {request.session_id} on this host")
        log.info(
            "simulated session %s host=%s id=%s", request.action, self.config.name,
            request.session_id,
        )  # fmt: skip
        return SessionActionOk(request.session_id)


def host_names(prefix: str, count: int) -> list[str]:
    width = max(4, len(str(count)))
    return [f"{prefix}-{i:0{width}d}" for i in range(1, count + 1)]


def prepare_certificates(pki_dir: Path, cache_dir: Path, names: Sequence[str]) -> list[Path]:
    """One farm certificate (key and chain in one file, mode 0600) per name in ``cache_dir``,
    issued by the farm CA in ``pki_dir`` unless a fitting one is there already."""
    ca = FarmPKI(pki_dir).load_ca()
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise PKIError(f"{cache_dir}: cannot create: {exc.strerror or exc}") from exc
    paths: list[Path] = []
    issued = 0
    for name in names:
        path = cache_dir / f"{name}.pem"
        if not _fits(path, name, ca_cert):
            write_key_pair(issue_certificate(ca, name), path, path)
            issued += 1
        paths.append(path)
    log.info(
        "simulated hosts' certificates ready=%d issued=%d dir=%s", len(names), issued, cache_dir
    )
    return paths


def _fits(path: Path, name: str, ca_cert: x509.Certificate) -> bool:
    """Whether ``path`` holds a certificate for ``name`` from this CA, good for 30 more days."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    return cns == [name] and left > dt.timedelta(days=30)


async def simulate(
    config: AgentConfig,
    count: int,
    *,
    profile: Profile = Profile.STEADY,
    seed: int = 0,
    pki_dir: Path | None = None,
    cache_dir: Path | None = None,
    ramp_s: float | None = None,
    task_status: trio.TaskStatus[list[SimulatedAgent]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``count`` simulated agents named ``<config.name>-0001``... until cancelled.

    ``config`` gives the broker, the CA file and the host settings (kind, RDP address,
    max_sessions) every simulated host shares; its own certificate is not used. The agents
    connect over ``ramp_s`` seconds (default: 250 per second), so the broker is not asked for
    thousands of TLS handshakes at once. ``started`` gets the agents once all have been
    started (not necessarily registered: wait on their ``registered`` events).
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    pki_dir = pki_dir or config.ca_file.parent
    cache_dir = cache_dir or pki_dir / "simulated"
    names = host_names(config.name, count)
    paths = await trio.to_thread.run_sync(prepare_certificates, pki_dir, cache_dir, names)
    rng = random.Random(seed)

    def build() -> list[SimulatedAgent]:
        agents = []
        for name, path in zip(names, paths, strict=True):
            cfg = dataclasses.replace(config, name=name, cert_file=path, key_file=path)
            script = Script(profile, config.max_sessions, random.Random(rng.getrandbits(64)))
            agents.append(SimulatedAgent(cfg, script))
        return agents

    agents = await trio.to_thread.run_sync(build)
    ramp = count / 250 if ramp_s is None else ramp_s
    log.info(
        "simulating hosts=%d profile=%s seed=%d broker=%s:%d ramp=%.1fs",
        count, profile, seed, config.broker_host, config.broker_port, ramp,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        for i, agent in enumerate(agents):
            await nursery.start(agent.run)
            if ramp > 0 and i + 1 < count:
                await trio.sleep(ramp / count)
        task_status.started(agents)
