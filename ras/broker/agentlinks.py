"""The agents' links: registration, load reports, and the broker's requests to an agent.

An agent registers the host its certificate names (``agent_register``), then reports its
load every ``report_interval_s``; an agent silent for ``host_timeout_s`` is closed and its
host goes offline. The broker asks an agent to log off or disconnect a session over the same
connection (``session_action``), one request at a time per agent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ras.broker.config import BrokerConfig
from ras.broker.hosts import HostRegistry
from ras.broker.model import SessionState
from ras.broker.sessions import SessionTable
from ras.errors import ErrorCode, PeerError, RasError, TransportError
from ras.net.channel import Channel
from ras.protocol import (
    AgentRegister,
    Error,
    LoadReport,
    Message,
    Ping,
    Pong,
    Registered,
    SessionAction,
    SessionActionKind,
    SessionActionOk,
)  # fmt: skip

__all__ = ["AgentLinks"]

log = logging.getLogger("ras.broker")


@dataclass(slots=True)
class _AgentLink:
    """An agent's connection, for the broker's requests to it (one at a time)."""

    chan: Channel
    lock: trio.Lock
    replies: trio.MemorySendChannel[Message]
    answers: trio.MemoryReceiveChannel[Message]
    waiting: bool = False


class AgentLinks:
    """The connected agents: their reports feed ``hosts`` and ``sessions``."""

    def __init__(
        self,
        config: BrokerConfig,
        hosts: HostRegistry,
        sessions: SessionTable,
        on_sessions: Callable[[str, list[str]], None] | None = None,
    ) -> None:
        self.config = config
        self.hosts = hosts
        self.sessions = sessions
        self._on_sessions = on_sessions  # who has a session on a host, at each report
        self._links: dict[str, _AgentLink] = {}

    async def serve(self, chan: Channel, name: str, peer: tuple[str, int]) -> None:
        """An agent's connection after hello/welcome; ``name`` is its certificate's."""
        with trio.fail_after(self.config.handshake_timeout_s):
            reg = await chan.receive()
        if not isinstance(reg, AgentRegister):
            await chan.fail(ErrorCode.UNEXPECTED, "expected agent_register")
            return
        if reg.name != name:
            log.warning("agent refused cert=%s claimed=%s peer=%s", name, reg.name, peer[0])
            await chan.fail(ErrorCode.FORBIDDEN, f"certificate is for {name!r}, not {reg.name!r}")
            return
        host = self.hosts.register(
            reg.name, reg.kind, reg.rdp_host, reg.rdp_port, reg.max_sessions, time.monotonic(),
            apps=reg.apps,
        )  # fmt: skip
        host.rdp_cert_sha256 = reg.rdp_cert_sha256
        log.info(
            "agent registered host=%s kind=%s rdp=%s:%d max_sessions=%d",
            reg.name,
            reg.kind,
            reg.rdp_host,
            reg.rdp_port,
            reg.max_sessions,
        )
        await chan.send(Registered(reg.name, self.config.report_interval_s))
        replies, answers = trio.open_memory_channel[Message](1)
        link = _AgentLink(chan, trio.Lock(), replies, answers)
        self._links[reg.name] = link
        try:
            while True:
                with trio.move_on_after(self.config.host_timeout_s) as idle:
                    msg = await chan.receive()
                if idle.cancelled_caught:
                    log.warning(
                        "agent silent host=%s for=%.0fs", reg.name, self.config.host_timeout_s
                    )
                    await chan.fail(ErrorCode.TIMEOUT, "no load report in time")
                    return
                match msg:
                    case LoadReport():
                        self._report(reg.name, msg)
                    case SessionActionOk() | Error() if link.waiting:
                        replies.send_nowait(msg)
                    case Ping() | Pong():
                        await chan.answer_ping(msg)
                    case _:
                        await chan.fail(
                            ErrorCode.UNEXPECTED, f"{msg.TYPE} is not expected from an agent"
                        )
                        return
        finally:
            if self._links.get(reg.name) is link:
                del self._links[reg.name]
            replies.close()
            self.hosts.disconnect(reg.name, host)
            log.info("agent gone host=%s", reg.name)

    def _report(self, name: str, load: LoadReport) -> None:
        host = self.hosts.hosts[name]
        was = host.insane
        why = self.hosts.report(name, load, time.monotonic())
        if why:
            if why != was:
                log.warning("agent report refused host=%s reason=%s (no new sessions)", name, why)
            return
        if was:
            log.info("agent report sane again host=%s", name)
        if load.sessions_detail or load.sessions == 0:
            for started in self.sessions.reported(name, load.sessions_detail, time.time()):
                log.info(
                    "session started id=%s host=%s user=%s session=%s",
                    started.id, name, started.user, self.sessions.farm_id(started.id) or "-",
                )  # fmt: skip
        if self._on_sessions is not None:
            self._on_sessions(name, [s.user for s in load.sessions_detail])

    async def session_action(self, session_id: str, action: str) -> dict[str, object]:
        """Ask the agent of the session's host to log it off or disconnect it. LookupError if
        there is no such session; a RasError if the agent is away or refuses."""
        session = self.sessions.get(session_id)
        if session is None:
            raise LookupError(f"no session {session_id!r}")
        try:
            kind = SessionActionKind(action)
        except ValueError:
            raise RasError(f"{action!r} is not logoff or disconnect") from None
        if session.state is SessionState.LAUNCHING:
            raise RasError(f"session {session_id} has not started on host {session.host} yet")
        link = self._links.get(session.host)
        if link is None:
            raise TransportError(f"the agent of host {session.host} is not connected")
        agent_id = SessionTable.agent_id(session)
        farm_id = self.sessions.farm_id(session_id)
        async with link.lock:
            link.waiting = True
            try:
                await link.chan.send(SessionAction(agent_id, kind, farm_id))
                with trio.fail_after(self.config.request_timeout_s):
                    reply = await link.answers.receive()
            except trio.TooSlowError:
                raise TransportError(f"the agent of host {session.host} did not answer") from None
            except trio.EndOfChannel:
                raise TransportError(f"the agent of host {session.host} went away") from None
            finally:
                link.waiting = False
        if isinstance(reply, Error):
            log.warning(
                "session %s refused id=%s host=%s session=%s reason=%s", kind, session_id,
                session.host, farm_id or "-", reply.message,
            )  # fmt: skip
            raise PeerError(reply)
        log.info(
            "session %s id=%s user=%s host=%s session=%s",
            kind, session_id, session.user, session.host, farm_id or "-",
        )  # fmt: skip
        if kind is SessionActionKind.LOGOFF:
            self.sessions.remove(session_id)
        return {"host": session.host, "user": session.user}
