"""The host agent: registers its host with the broker over mutual TLS and reports its load.

It reconnects with a capped backoff when the broker goes away, so a broker restart costs a
host only the seconds until the next attempt. With ``sessions_from = "utmp"`` it also lists
who the sessions are, with ``"xrdp"`` xrdp's sessions, active or disconnected, and carries out
the broker's ``session_action`` requests (log off, disconnect) by running the configured
command for that session (xrdp: built in unless configured).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from functools import partial

import trio

from ras import __version__
from ras.agents import xrdp
from ras.agents.config import DEFAULT_LOGOFF, AgentConfig
from ras.agents.load import (
    CpuSampler,
    UtmpSession,
    listening,
    memory_percent,
    rdp_sessions,
    utmp_sessions,
)
from ras.errors import ConfigError, ErrorCode, RemoteProtocolError, TransportError
from ras.net.channel import Channel, greet
from ras.net.rdptls import probe_certificate
from ras.net.tasks import fatal_refusal, race, reconnecting
from ras.net.tls import connect_tls
from ras.ops.listener import start_metrics
from ras.ops.metrics import AGENT_REPORTS, watch_certificate
from ras.ops.sources import agent_state
from ras.pki import client_context
from ras.protocol import (
    AgentRegister,
    Error,
    LoadReport,
    Message,
    Registered,
    Role,
    SessionAction,
    SessionActionKind,
    SessionActionOk,
    SessionInfo,
    SessionState,
)

__all__ = ["Agent"]

log = logging.getLogger("ras.agent")
SOFTWARE = f"ras-agent/{__version__}"


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._tls = client_context(
            config.ca_file, cert_file=config.cert_file, key_file=config.key_file
        )
        self._cpu = CpuSampler()
        self.registered = trio.Event()  # set while registered with a broker (any, with several)
        self._links_up = 0

    def measure(self) -> LoadReport:
        cpu, memory = round(self._cpu.sample(), 1), round(memory_percent(), 1)
        cfg = self.config
        ready = not cfg.ready_check or listening(cfg.rdp_port)
        if cfg.sessions_from == "utmp":
            detail = tuple(
                SessionInfo(str(s.pid), s.user or "?", SessionState.ACTIVE)
                for s in utmp_sessions(cfg.utmp_file)[:1000]
            )
            return LoadReport(cpu, memory, len(detail), 0, detail, ready)
        if cfg.sessions_from == "xrdp":
            detail = tuple(
                SessionInfo(str(s.display), s.user, s.state) for s in xrdp.xrdp_sessions()[:1000]
            )
            gone = sum(1 for s in detail if s.state is SessionState.DISCONNECTED)
            return LoadReport(cpu, memory, len(detail), gone, detail, ready)
        return LoadReport(cpu, memory, rdp_sessions(cfg.rdp_port), 0, (), ready)

    async def act(self, request: SessionAction) -> Message:
        """Carry out a ``session_action``: the answer to send the broker."""
        cfg = self.config
        logoff = request.action is SessionActionKind.LOGOFF
        command = cfg.logoff_command if logoff else cfg.disconnect_command
        if cfg.sessions_from == "xrdp":
            return await self._act_xrdp(request, command)
        if cfg.sessions_from != "utmp" or not command:
            return Error(ErrorCode.FORBIDDEN, f"this agent does not {request.action} sessions")
        session = self._utmp_session(request.session_id)
        if session is None:
            return Error(ErrorCode.NOT_FOUND, f"no session {request.session_id} on this host")
        argv = [
            w.format(
                id=request.session_id, pid=session.pid, user=session.user, line=session.line,
                display="",
            )
            for w in command
        ]  # fmt: skip
        return await self._run(request, argv, session.user)

    async def _act_xrdp(self, request: SessionAction, command: Sequence[str]) -> Message:
        """Log off or disconnect an xrdp session (its id is its display number)."""
        session = next(
            (s for s in xrdp.xrdp_sessions() if str(s.display) == request.session_id), None
        )
        if session is None:
            return Error(ErrorCode.NOT_FOUND, f"no session {request.session_id} on this host")
        logoff = request.action is SessionActionKind.LOGOFF
        if command and not (logoff and tuple(command) == DEFAULT_LOGOFF):
            argv = [
                w.format(
                    id=request.session_id, pid=session.pid, user=session.user,
                    line=f":{session.display}", display=session.display,
                )
                for w in command
            ]  # fmt: skip
            return await self._run(request, argv, session.user)
        try:  # built in: end the X server (sesman ends the session), or xrdp-dis's datagram
            if logoff:
                os.kill(session.pid, signal.SIGTERM)
            else:
                xrdp.disconnect(session.display, self.config.xrdp_sockdir)
        except OSError as exc:
            log.warning("session %s failed id=%s: %s", request.action, request.session_id, exc)
            return Error(ErrorCode.INTERNAL, f"{request.action} failed: {exc.strerror}")
        log.info("session %s id=%s user=%s", request.action, request.session_id, session.user)
        return SessionActionOk(request.session_id)

    async def _run(self, request: SessionAction, argv: list[str], user: str) -> Message:
        cfg = self.config
        try:
            with trio.fail_after(cfg.action_timeout_s):
                done = await trio.run_process(
                    argv, check=False, stdin=subprocess.DEVNULL, capture_stdout=True,
                    capture_stderr=True,
                )  # fmt: skip
        except (OSError, trio.TooSlowError) as exc:
            why = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
            log.warning(
                "session %s failed id=%s session=%s reason=%s",
                request.action, request.session_id, request.session or "-", why,
            )  # fmt: skip
            return Error(ErrorCode.INTERNAL, f"{request.action} failed: {why}")
        if done.returncode != 0:
            err = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            log.warning(
                "session %s failed id=%s session=%s exit=%d %s",
                request.action, request.session_id, request.session or "-", done.returncode, err[0],
            )  # fmt: skip
            return Error(
                ErrorCode.INTERNAL,
                f"{request.action} failed: exit {done.returncode} {err[0]}"[:1000],
            )
        log.info(
            "session %s id=%s user=%s session=%s",
            request.action, request.session_id, user, request.session or "-",
        )  # fmt: skip
        return SessionActionOk(request.session_id)

    def _utmp_session(self, session_id: str) -> UtmpSession | None:
        return next(
            (s for s in utmp_sessions(self.config.utmp_file) if str(s.pid) == session_id), None
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay registered with every broker until cancelled. A broker that refuses this agent
        (its certificate names another host) ends it with that ``ConfigError``, not grouped."""
        try:
            await self._stay_registered(task_status)
        except* ConfigError as group:
            fatal: BaseException = group
            while isinstance(fatal, BaseExceptionGroup):
                fatal = fatal.exceptions[0]
            raise fatal from None

    async def _stay_registered(self, task_status: trio.TaskStatus[None]) -> None:
        cfg = self.config
        watch_certificate("agent", "farm", cfg.cert_file)
        async with trio.open_nursery() as nursery:
            await start_metrics(nursery, cfg.metrics, partial(agent_state, self))
            if cfg.allowed_programs:
                nursery.start_soon(self._guard)
            task_status.started()
            async with trio.open_nursery() as links:
                for address in cfg.broker_list:
                    links.start_soon(self._link, address)
            nursery.cancel_scope.cancel()

    async def _link(self, address: tuple[str, int]) -> None:
        """Stay registered with the broker at ``address`` (reconnecting)."""
        cfg = self.config
        registered = [False]

        def down() -> None:
            if registered[0]:
                registered[0] = False
                self._links_up -= 1
                if self._links_up == 0:
                    self.registered = trio.Event()

        def up() -> None:
            registered[0] = True
            self._links_up += 1
            self.registered.set()

        try:
            await reconnecting(
                partial(self._session, address, up),
                log=log,
                max_backoff_s=cfg.retry_max_s,
                on_down=down,
                what=f"agent host={cfg.name} broker={address[0]}:{address[1]}",
            )
        finally:
            down()

    async def _guard(self) -> None:
        """Log off every xrdp session whose program the host does not allow."""
        cfg = self.config
        ended: set[int] = set()  # X servers already told to go
        while True:
            sessions = await trio.to_thread.run_sync(xrdp.xrdp_sessions)
            ended &= {s.pid for s in sessions}
            for session in sessions:
                if session.pid in ended:
                    continue
                line = await trio.to_thread.run_sync(xrdp.session_program, session)
                if line is None or xrdp.allowed(line, cfg.allowed_programs):
                    continue
                log.warning(
                    "session refused id=%d user=%s program=%s (not an allowed program): "
                    "logging it off", session.display, session.user, line[:200],
                )  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    os.kill(session.pid, signal.SIGTERM)
                ended.add(session.pid)
            await trio.sleep(cfg.guard_interval_s)

    async def _rdp_certificate(self) -> str:
        """The SHA-256 of the RDP server's TLS certificate, reported at each registration so
        that a gateway that is the TLS client to this host (the web client's) can pin it; ""
        when the server does not answer (the broker then has no pin for this host)."""
        cfg = self.config
        try:
            with trio.fail_after(cfg.connect_timeout_s):
                pin = await probe_certificate(cfg.rdp_host, cfg.rdp_port)
        except (TransportError, RemoteProtocolError, trio.TooSlowError) as exc:
            log.warning(
                "rdp certificate not read rdp=%s:%d reason=%s",
                cfg.rdp_host,
                cfg.rdp_port,
                exc or "timeout",
            )
            return ""
        log.info("rdp certificate rdp=%s:%d sha256=%s", cfg.rdp_host, cfg.rdp_port, pin)
        return pin

    async def _session(self, address: tuple[str, int], up: Callable[[], None]) -> None:
        cfg = self.config
        host, port = address
        # A refusal (FORBIDDEN: another certificate name, the gateways' port) ends the agent:
        # retrying would be refused the same way forever.
        refused = partial(fatal_refusal, f"broker {host}:{port}")
        with refused(), trio.fail_after(cfg.connect_timeout_s):
            stream = await connect_tls(host, port, self._tls)
            chan = await greet(stream, Role.AGENT, SOFTWARE)
        async with chan:
            pin = await self._rdp_certificate() if cfg.report_rdp_certificate else ""
            with refused(), trio.fail_after(cfg.connect_timeout_s):
                reply = await chan.request(
                    AgentRegister(
                        cfg.name,
                        cfg.kind,
                        cfg.rdp_host,
                        cfg.rdp_port,
                        cfg.max_sessions,
                        cfg.apps,
                        pin,
                    )
                )
            if not isinstance(reply, Registered):
                raise TransportError(f"broker answered agent_register with {reply.TYPE}")
            log.info(
                "registered host=%s rdp=%s:%d broker=%s:%d every=%.1fs",
                cfg.name,
                cfg.rdp_host,
                cfg.rdp_port,
                host,
                port,
                reply.report_interval_s,
            )
            await chan.send(self.measure())
            up()
            await race(
                lambda: self._answer(chan), lambda: self._report(chan, reply.report_interval_s)
            )

    async def _report(self, chan: Channel, interval_s: float) -> None:
        reports = AGENT_REPORTS.labels(self.config.name)
        while True:
            await trio.sleep(interval_s)
            await chan.send(self.measure())
            reports.inc()

    async def _answer(self, chan: Channel) -> None:
        """Answer the broker's pings and session actions; a closed link ends the session."""
        while True:
            msg = await chan.receive()
            if await chan.answer_ping(msg):
                continue
            if isinstance(msg, SessionAction):
                await chan.send(await self.act(msg))
                await chan.send(self.measure())  # the broker sees the change at once
