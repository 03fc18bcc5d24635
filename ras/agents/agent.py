"""The host agent: registers its host with the broker over mutual TLS and reports its load.

It reconnects with a capped backoff when the broker goes away, so a broker restart costs a
host only the seconds until the next attempt.
"""

from __future__ import annotations

import logging

import trio

from ras import __version__
from ras.agents.config import AgentConfig
from ras.agents.load import CpuSampler, memory_percent, rdp_sessions
from ras.errors import TransportError
from ras.net.channel import Channel, greet
from ras.net.tasks import race, reconnecting
from ras.net.tls import connect_tls
from ras.pki import client_context
from ras.protocol import (
    AgentRegister,
    LoadReport,
    Ping,
    Pong,
    Registered,
    Role,
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
        self.registered = trio.Event()

    def measure(self) -> LoadReport:
        return LoadReport(
            cpu_percent=round(self._cpu.sample(), 1),
            memory_percent=round(memory_percent(), 1),
            sessions=rdp_sessions(self.config.rdp_port),
            disconnected=0,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay registered until cancelled."""
        cfg = self.config
        task_status.started()

        def down() -> None:
            self.registered = trio.Event()

        await reconnecting(
            self._session,
            log=log,
            max_backoff_s=cfg.retry_max_s,
            on_down=down,
            what=f"agent host={cfg.name} broker={cfg.broker_host}:{cfg.broker_port}",
        )

    async def _session(self) -> None:
        cfg = self.config
        with trio.fail_after(cfg.connect_timeout_s):
            stream = await connect_tls(cfg.broker_host, cfg.broker_port, self._tls)
            chan = await greet(stream, Role.AGENT, SOFTWARE)
        async with chan:
            with trio.fail_after(cfg.connect_timeout_s):
                reply = await chan.request(
                    AgentRegister(cfg.name, cfg.kind, cfg.rdp_host, cfg.rdp_port, cfg.max_sessions)
                )
            if not isinstance(reply, Registered):
                raise TransportError(f"broker answered agent_register with {reply.TYPE}")
            log.info(
                "registered host=%s rdp=%s:%d broker=%s:%d every=%.1fs",
                cfg.name,
                cfg.rdp_host,
                cfg.rdp_port,
                cfg.broker_host,
                cfg.broker_port,
                reply.report_interval_s,
            )
            await chan.send(self.measure())
            self.registered.set()
            await race(
                lambda: self._answer(chan), lambda: self._report(chan, reply.report_interval_s)
            )

    async def _report(self, chan: Channel, interval_s: float) -> None:
        while True:
            await trio.sleep(interval_s)
            await chan.send(self.measure())

    async def _answer(self, chan: Channel) -> None:
        """Answer the broker's pings; a closed link ends the session."""
        while True:
            msg = await chan.receive()
            if isinstance(msg, Ping):
                await chan.send(Pong(msg.nonce))
