"""Worker processes: one daemon run per core, sharing the listening ports (SO_REUSEPORT).

The parent forks ``n`` workers and only supervises them. Each worker runs the whole daemon in
its own trio loop and binds every listener with SO_REUSEPORT, so the kernel spreads new
connections over the workers' accept queues. Nothing is shared between workers: the gateway
keeps no state a tunnel needs beyond what the broker holds. SIGTERM or SIGINT to the parent
is passed to every worker (each drains and exits as a single daemon would), and so is SIGHUP
(reload); when one worker
ends on its own, the parent stops the others and exits with that worker's code, so a
supervisor (systemd) restarts the whole set.

Also here: ``tune_gc``, the garbage-collector settings of a long-running relay daemon.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
from collections.abc import Callable

from ras.net.listen import set_reuse_port_default

__all__ = ["RELAY_GC", "run_workers", "tune_gc", "worker_index"]

log = logging.getLogger("ras.workers")


RELAY_GC = (50_000, 50, 100)
_index = 0  # this process's worker number (0: the only one, or the first)


def worker_index() -> int:
    """This worker's number, 0 to n-1 (0 without workers): what a per-process port, such as
    the ``/metrics`` one, is offset by, since SO_REUSEPORT would spread scrapes at random."""
    return _index


def tune_gc(thresholds: tuple[int, int, int] = RELAY_GC) -> None:
    """The garbage-collector settings of a long-running daemon, called once by the ``ras``
    command at start-up (never by a library class: it is process-wide). Move everything alive
    after start-up (modules, classes, config) out of the collector's sight (``gc.freeze``) and
    collect less often. A tunnel is a few dozen tracked objects, so at 10,000 tunnels a full
    collection walks hundreds of thousands of objects; with the default thresholds full
    collections are rare and short. The broker passes its own (``ras.broker.server``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)


def run_workers(n: int, run_one: Callable[[], int]) -> int:
    """Run ``run_one`` (a whole daemon, returning its exit code) in ``n`` worker processes;
    with ``n == 1`` in this process, without forking."""
    if n <= 1:
        return run_one()
    set_reuse_port_default(True)
    children: dict[int, int] = {}
    for index in range(n):
        pid = os.fork()
        if pid == 0:  # the worker
            global _index
            _index = index
            code = 1
            try:
                code = run_one()
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = index
    log.info("workers started count=%d pids=%s", n, ",".join(map(str, children)))
    return _supervise(children)


def _supervise(children: dict[int, int]) -> int:
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            _kill(pid, signum)

    def pass_on(signum: int, _frame: object) -> None:
        for pid in children:
            _kill(pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, pass_on)  # reload, in every worker
    code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
        if pid not in children:
            continue
        index = children.pop(pid)
        exit_code = os.waitstatus_to_exitcode(status)
        if exit_code != 0:
            code = code or (exit_code if exit_code > 0 else 1)
        if not stopping:
            log.warning(
                "worker ended index=%d pid=%d code=%d, stopping the others", index, pid, exit_code
            )
            stopping = True
            for other in children:
                _kill(other, signal.SIGTERM)
    return code


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
