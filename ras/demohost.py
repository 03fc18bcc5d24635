"""The one-machine farm's demo RDP host: a desktop to log in to, with no RDP server of one's own.

An X server with nothing but a coloured background and a line of text (Xvfb, ``xsetroot``,
``xmessage``), mirrored by ``freerdp-shadow-cli`` on 127.0.0.1 with NLA, knowing one RDP user
(``demo``, its password made on the first run in ``demo-rdp.password``, its NTLM hash in
``demo-rdp.sam``). The RDP user is the RDP host's, not the farm's: the farm's user logs in to
the gateway, the RDP user to the desktop, as with any RD Gateway. NLA runs between the user's
RDP client and this server through the gateway's tunnel, so a login proves the bytes arrive
unchanged.

Debian packages: xvfb, freerdp2-shadow-x11, winpr-utils, x11-xserver-utils, x11-utils
(``./dev farm`` installs them).

``python -m ras.demohost --dir DIR [--port 3389] [--bind 0.0.0.0]`` runs one on its own (each
RDP host of a ``ras lab`` runs so in its network namespace), until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import trio

from ras.errors import ConfigError, TransportError
from ras.logs import LineFormatter
from ras.net.tls import connect_tcp
from ras.pki import write_atomic

__all__ = ["DEMO_RDP_USER", "DemoHost", "run_demo_host"]

log = logging.getLogger("ras.farm")
DEMO_RDP_USER = "demo"
_TOOLS = {
    "Xvfb": "xvfb",
    "freerdp-shadow-cli": "freerdp2-shadow-x11",
    "winpr-hash": "winpr-utils",
    "xsetroot": "x11-xserver-utils",
    "xmessage": "x11-utils",
}
_COLOUR = "#205080"
_START_S = 20.0


@dataclass(frozen=True, slots=True)
class DemoHost:
    host: str
    port: int
    user: str
    password_file: Path


def _missing_tools() -> list[str]:
    return [
        f"{tool} (Debian package {pkg})" for tool, pkg in _TOOLS.items() if not shutil.which(tool)
    ]


def _free_display() -> int:
    for n in range(120, 400):
        if not Path(f"/tmp/.X11-unix/X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            return n
    raise ConfigError("no free X display number between :120 and :399 for the demo RDP host")


def _credentials(directory: Path) -> tuple[Path, Path]:
    """The RDP user's password file and its SAM file, made on the first run."""
    password_file = directory / "demo-rdp.password"
    sam = directory / "demo-rdp.sam"
    if not password_file.exists():
        write_atomic(password_file, secrets.token_urlsafe(12).encode() + b"\n", mode=0o600)
    password = password_file.read_text().strip()
    if not sam.exists():
        done = subprocess.run(
            ["winpr-hash", "-u", DEMO_RDP_USER, "-p", password, "-f", "sam"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise ConfigError(f"winpr-hash failed: {done.stderr.strip() or done.returncode}")
        write_atomic(sam, done.stdout.encode(), mode=0o600)
    return password_file, sam


async def _stop(proc: trio.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(5) as waited:
            waited.shield = True
            await proc.wait()
        if proc.returncode is None:
            proc.kill()


async def _start_xvfb(out: IO[Any]) -> tuple[trio.Process, int]:
    """Xvfb on a free display, once it accepts clients. Another X server that takes the same
    display first (two demo hosts starting at once) makes ours exit: then the next."""
    for _attempt in range(10):
        display = _free_display()
        ready_r, ready_w = os.pipe()
        try:
            # -noreset: the X server would reset (and lose the background) when xsetroot exits
            argv = ["Xvfb", f":{display}", "-screen", "0", "1280x800x24", "-nolisten", "tcp"]
            argv += ["-noreset", "-displayfd", str(ready_w)]
            proc = await trio.lowlevel.open_process(
                argv, stdout=out, stderr=out, pass_fds=(ready_w,)
            )
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)
        async with trio.lowlevel.FdStream(ready_r) as ready:
            got = b""
            with trio.move_on_after(_START_S):
                while not got.endswith(b"\n") and (chunk := await ready.receive_some(16)):
                    got += chunk
        if got.endswith(b"\n"):
            return proc, display
        await _stop(proc)  # exited (display taken) or never ready
    raise ConfigError("the demo RDP host's X server (Xvfb) did not start")


async def _paint_when_up(env: dict[str, str], xvfb: trio.Process) -> None:
    """Paint the background as soon as the X server answers (xsetroot fails until then)."""
    argv = ["xsetroot", "-solid", _COLOUR]
    with trio.move_on_after(_START_S):
        while xvfb.returncode is None:
            done = await trio.run_process(argv, env=env, check=False, capture_stderr=True)
            if done.returncode == 0:
                return
            await trio.sleep(0.05)
    raise ConfigError("the demo RDP host's X server (Xvfb) did not start")


async def _until_listening(host: str, port: int, proc: trio.Process, what: str) -> None:
    with trio.move_on_after(_START_S):
        while proc.returncode is None:
            try:
                await (await connect_tcp(host, port)).aclose()
                return
            except TransportError:
                await trio.sleep(0.05)
    raise ConfigError(f"the demo RDP host's {what} did not start (see {proc.args!r})")


async def run_demo_host(
    directory: Path,
    port: int,
    *,
    bind: str = "127.0.0.1",
    task_status: trio.TaskStatus[DemoHost] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the demo RDP host on ``bind``:``port`` until cancelled; its state (credentials,
    logs) lives in ``directory``. ``ConfigError`` names what is missing."""
    missing = _missing_tools()
    if missing:
        raise ConfigError(
            "the demo RDP host needs " + ", ".join(missing)
            + ": run ./dev farm as root (it installs them), or give --rdp HOST:PORT"
        )  # fmt: skip
    password_file, sam = await trio.to_thread.run_sync(_credentials, directory)
    home = directory / "demo-rdp-home"  # the shadow server writes its certificate there
    home.mkdir(exist_ok=True)
    logfile = directory / "demo-rdp.log"
    procs: list[trio.Process] = []
    out = await trio.to_thread.run_sync(partial(open, logfile, "ab"))
    with out:
        try:
            xvfb, display = await _start_xvfb(out)
            procs.append(xvfb)
            env = {**os.environ, "DISPLAY": f":{display}", "HOME": str(home)}
            await _paint_when_up(env, xvfb)
            text = "ras demo desktop: you are logged in through the gateway"
            procs.append(
                await trio.lowlevel.open_process(
                    ["xmessage", "-center", text], env=env, stdout=out, stderr=out
                )
            )
            shadow = [
                "freerdp-shadow-cli", f"/port:{port}", f"/bind-address:{bind}", "/sec:nla",
                f"/sam-file:{sam}",
            ]  # fmt: skip
            procs.append(await trio.lowlevel.open_process(shadow, env=env, stdout=out, stderr=out))
            near = "127.0.0.1" if bind == "0.0.0.0" else bind
            await _until_listening(near, port, procs[-1], "RDP server")
            log.info(
                "demo RDP host ready rdp=%s:%d display=:%d user=%s log=%s",
                bind, port, display, DEMO_RDP_USER, logfile,
            )  # fmt: skip
            task_status.started(DemoHost(bind, port, DEMO_RDP_USER, password_file))
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                for proc in reversed(procs):
                    await _stop(proc)


def main(argv: list[str] | None = None) -> int:
    """Run one demo RDP host in the foreground (``python -m ras.demohost``)."""
    p = argparse.ArgumentParser(prog="python -m ras.demohost", description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, required=True, help="its credentials and log")
    p.add_argument("--port", type=int, default=3389)
    p.add_argument("--bind", default="127.0.0.1", help="the address to listen on")
    args = p.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    args.dir.mkdir(parents=True, exist_ok=True)

    async def serve() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(run_demo_host, args.dir, args.port, bind=args.bind))
                async for _ in signals:
                    nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    except ConfigError as exc:
        print(f"python -m ras.demohost: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
