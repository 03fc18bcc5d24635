"""A small connection-rate load generator (run inside the client's namespace).

Keeps ``--concurrency`` connections in flight with one epoll loop: each connection connects,
sends a tiny HTTP/1.0 request, reads the reply to the end (the server closes), closes, and a
new one takes its place. With several ``--target``s the connections go round-robin over them.
It waits until ``--start`` (a ``time.monotonic()`` instant, so several processes start
together), runs ``--seconds``, and prints one JSON line: connections completed inside the
window (``ok``), failures (``errors``, by kind) and the connection time's median and 99th
percentile in milliseconds. A reply counts only if its status line says 200.
"""

from __future__ import annotations

import argparse
import errno
import json
import select
import socket
import statistics
import time

REQUEST = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n"
_IN, _OUT, _ERR = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR | select.EPOLLHUP


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def run(args: argparse.Namespace) -> dict[str, object]:
    targets = args.target
    ep = select.epoll()
    # fd -> [socket, started, reply so far, connected?]
    live: dict[int, list] = {}
    errors: dict[str, int] = {}
    times: list[float] = []
    turn = 0

    def open_one() -> None:
        nonlocal turn
        turn += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        started = time.monotonic()
        code = sock.connect_ex(targets[turn % len(targets)])
        if code not in (0, errno.EINPROGRESS):
            name = errno.errorcode.get(code, str(code))
            errors[name] = errors.get(name, 0) + 1
            sock.close()
            return
        live[sock.fileno()] = [sock, started, b"", False]
        ep.register(sock.fileno(), _OUT)

    def finish(fd: int, error: str | None) -> None:
        sock, started, reply, _ = live.pop(fd)
        ep.unregister(fd)
        sock.close()
        now = time.monotonic()
        if error is None and not (reply.startswith(b"HTTP/1.") and b" 200 " in reply[:16]):
            error = "bad reply"
        if start <= now <= end:
            if error is None:
                times.append(now - started)
            else:
                errors[error] = errors.get(error, 0) + 1

    start = args.start
    end = start + args.seconds
    time.sleep(max(0.0, start - time.monotonic()))
    for _ in range(args.concurrency):
        open_one()
    while (now := time.monotonic()) < end:
        for fd, event in ep.poll(max(0.0, end - now)):
            entry = live[fd]
            sock = entry[0]
            if not entry[3]:  # connecting
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    finish(fd, errno.errorcode.get(code, str(code)))
                    open_one()
                    continue
                entry[3] = True
                try:
                    sock.send(REQUEST)
                except OSError as exc:
                    finish(fd, errno.errorcode.get(exc.errno or 0, "send"))
                    open_one()
                    continue
                ep.modify(fd, _IN)
                continue
            try:
                while data := sock.recv(4096):
                    entry[2] += data
            except BlockingIOError:
                if not event & _ERR:
                    continue
                finish(fd, "hangup")
            except OSError as exc:
                finish(fd, errno.errorcode.get(exc.errno or 0, "recv"))
            else:
                finish(fd, None)  # end of stream: the reply is complete
            open_one()
    for entry in list(live.values()):
        entry[0].close()
    ms = sorted(t * 1000 for t in times)
    return {
        "ok": len(ms),
        "errors": errors,
        "seconds": args.seconds,
        "median_ms": round(statistics.median(ms), 3) if ms else None,
        "p99_ms": round(ms[int(len(ms) * 0.99)], 3) if ms else None,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=_target, action="append", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--start", type=float, required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    print(json.dumps(run(parser.parse_args())), flush=True)
