"""Published applications with real xrdp, a real login and the real agent.

One xrdp host (two throw-away Linux users), an agent reading xrdp's sessions from /proc
(``sessions_from = "xrdp"``), and a decoy host that sorts first and must never be reached. The
users log in to the farm with their Linux passwords, and xfreerdp logs in to xrdp with the same
credentials given on its stdin (single sign-on), through the client's forwarder and the
gateway's TLS tunnel, with the options ``launch_ok`` implies (``/shell:`` for xrdp).

- The application (xclock painted one colour) is alone on the session's screen: a screenshot
  of the host's X display shows its colour inside its window and black everywhere else (no
  desktop ran), and the display's only top-level window is xclock's.
- An unpublished resource gets no launch, and no connection reaches any host.
- Disconnected by the broker (the agent's built-in xrdp disconnect), the session is reported
  *disconnected*; launched again, the user lands in the same session on the same host: the
  same display and the same xclock process, reported active again.
- A document opens in its application: the viewer runs with the file, alone on its screen.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio
from conftest import require_peers
from farmkit import Farm, Listener, add_agent, farm
from rdp_peers import TestUser, XrdpServer

from ras.broker.config import ResourceConfig
from ras.broker.model import SessionRecord, SessionState
from ras.broker.passwords import hash_password
from ras.broker.store import UserRecord
from ras.client.forwarder import serve_forwarder
from ras.client.programs import Program
from ras.client.rdpclient import rdp_command
from ras.client.session import ClientSession
from ras.errors import ErrorCode, PeerError
from ras.protocol import LaunchOk, ResourceKind

pytestmark = pytest.mark.peers

BLUE = (0x20, 0x40, 0xC0)
BLUE_X = "rgb:20/40/c0"
GREEN = (0x20, 0x60, 0x20)  # XrdpServer's test desktop: must not show
CLOCK = f"-bg {BLUE_X} -fg {BLUE_X} -hd {BLUE_X} -hl {BLUE_X} -geometry 320x240+40+30"
IMAGES = Path(os.environ.get("RAS_DOC_IMAGES", ""))  # set to write the docs' screenshot


@dataclasses.dataclass
class Launched:
    launch: LaunchOk
    proc: trio.Process
    session: ClientSession


async def _launch(
    f: Farm,
    nursery: trio.Nursery,
    user: TestUser,
    resource: str,
    display: str,
    tmp: Path,
    *,
    own: Program | None = None,
) -> Launched:
    """What ``ras client launch RESOURCE -- /cert:ignore /sec:tls`` does, with SSO; ``own``:
    a client that asks the host for a program of its own instead."""  # fmt: skip
    cfg = dataclasses.replace(f.client_config(), username=user.name, resource=resource)
    session = await ClientSession.connect(cfg)
    await session.authenticate(user.name, user.password)
    first = await session.launch(resource)
    _, port = await nursery.start(partial(serve_forwarder, session, resource, first=first))
    cmd = rdp_command(
        "xfreerdp", f"127.0.0.1:{port}", own or Program.from_launch(first, resource),
        ["/cert:ignore", "/sec:tls"], sso=(user.name, user.password),
    )  # fmt: skip
    assert cmd.stdin is not None
    log = await trio.to_thread.run_sync(open, tmp / f"xfreerdp-{user.name}-{resource}.log", "ab")
    proc = await trio.lowlevel.open_process(
        cmd.argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "DISPLAY": display, "HOME": str(tmp)}, start_new_session=True,
    )  # fmt: skip
    log.close()
    assert proc.stdin is not None
    await proc.stdin.send_all(cmd.stdin)
    await proc.stdin.aclose()
    return Launched(first, proc, session)


async def _stop(launched: Launched) -> None:
    if launched.proc.returncode is None:
        launched.proc.terminate()
    with trio.move_on_after(10):
        await launched.proc.wait()
    if launched.proc.returncode is None:
        launched.proc.kill()
        await launched.proc.wait()
    await launched.session.aclose()


async def _until(check: Callable[[], SessionRecord | None]) -> SessionRecord:
    """The agent reports every 0.5 s: wait for the broker to see ``check`` hold (the deadline
    is a hang guard)."""
    with trio.fail_after(60):
        while (found := check()) is None:  # noqa: ASYNC110 (the broker's view of reports)
            await trio.sleep(0.1)
    return found


async def _window(user: TestUser, display: int, name: str) -> list[str]:
    """Wait until a top-level window ``name`` shows on ``display``; all the named ones."""
    with trio.fail_after(30):
        while name not in (names := await trio.to_thread.run_sync(_top_windows, user, display)):  # noqa: ASYNC110 (an X server's state)
            await trio.sleep(0.2)
    return names


def _session(f: Farm, user: str, state: SessionState) -> Callable[[], SessionRecord | None]:
    def check() -> SessionRecord | None:
        return next(
            (s for s in f.broker.sessions.list() if s.user == user and s.state is state), None
        )

    return check


def _x(user: TestUser, display: int, *argv: str) -> str:
    env = {**os.environ, "DISPLAY": f":{display}", "XAUTHORITY": f"/home/{user.name}/.Xauthority"}
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout


def _top_windows(user: TestUser, display: int) -> list[str]:
    """Names of the mapped top-level windows that have a name."""
    out = _x(user, display, "xwininfo", "-root", "-children")
    return [
        line.split('"')[1]
        for line in out.splitlines()
        if line.strip().startswith("0x") and '"' in line
    ]


def _geometry(user: TestUser, display: int, name: str) -> tuple[int, int, int, int]:
    """The window's box on the screen, its border included: (x, y, width, height)."""
    out = _x(user, display, "xwininfo", "-name", name)
    wanted = ("Absolute upper-left X", "Absolute upper-left Y", "Width", "Height", "Border width")
    pairs = (line.partition(":") for line in out.splitlines())
    values = {key.strip(): int(value) for key, _, value in pairs if key.strip() in wanted}
    border = values["Border width"]
    return (
        values["Absolute upper-left X"] - border, values["Absolute upper-left Y"] - border,
        values["Width"] + 2 * border, values["Height"] + 2 * border,
    )  # fmt: skip


def _screenshot(user: TestUser, display: int, path: Path) -> tuple[int, int, bytes]:
    _x(user, display, "import", "-window", "root", str(path))
    width, height = map(int, _x(user, display, "identify", "-format", "%w %h", str(path)).split())
    raw = subprocess.run(
        ["convert", str(path), "-depth", "8", "rgb:-"], capture_output=True, check=True
    ).stdout
    assert len(raw) == width * height * 3
    return width, height, raw


def _pixels(shot: tuple[int, int, bytes], box: tuple[int, int, int, int]) -> tuple[float, int, int]:
    """(share of BLUE inside ``box`` (x, y, w, h), non-black pixels outside, GREEN pixels)."""
    width, height, raw = shot
    x0, y0, w, h = box
    inside = blue = outside = green = 0
    for y in range(height):
        row = raw[y * width * 3 : (y + 1) * width * 3]
        for x in range(width):
            px = tuple(row[3 * x : 3 * x + 3])
            if px == GREEN:
                green += 1
            if x0 <= x < x0 + w and y0 <= y < y0 + h:
                inside += 1
                blue += px == BLUE
            elif px != (0, 0, 0):
                outside += 1
    return blue / max(inside, 1), outside, green


def _pid_of(user: TestUser, program: str) -> list[str]:
    done = subprocess.run(["pgrep", "-u", user.name, "-x", program], capture_output=True, text=True)
    return done.stdout.split()


async def test_applications_open_alone_reconnect_to_their_session_and_open_documents(
    tmp_path, display
):
    require_peers(xrdp=True)
    with tempfile.TemporaryDirectory(prefix="ras-docs-") as tmp:  # the session's user reads it
        os.chmod(tmp, 0o755)
        notes = Path(tmp) / "quarterly notes.txt"
        notes.write_text("ras: this document opened in its application\n")
        await _run(tmp_path, display, notes)


async def _run(tmp_path: Path, display: str, notes: Path) -> None:
    launched: list[Launched] = []
    try:
        await _scenario(tmp_path, display, notes, launched)
    finally:
        for each in launched:
            await _stop(each)


async def _scenario(tmp_path: Path, display: str, notes: Path, launched: list[Launched]) -> None:
    app = ResourceKind.APPLICATION
    resources = [
        ResourceConfig("clock", "Clock", app, command="xclock", arguments=CLOCK),
        ResourceConfig("viewer", "Viewer", app, command="xmessage", arguments="-file"),
        ResourceConfig(
            "notes", "Quarterly notes", ResourceKind.DOCUMENT, target=str(notes),
            application="viewer",
        ),
    ]  # fmt: skip
    decoy = Listener()
    with XrdpServer(users=3) as server:
        sockdir = server.logs[0].parent / "run-xrdp" / "sockdir"  # its private /run/xrdp
        alice, bob, carol = server.users
        async with (
            farm(tmp_path, resources=resources, report_interval_s=0.5) as f,
            trio.open_nursery() as nursery,
        ):
            for user in server.users:
                f.store.put_user(UserRecord(user.name, hash_password(user.password), ("users",)))
            await add_agent(
                f, nursery, "xrdp1", server.host, server.port, sessions_from="xrdp",
                xrdp_sockdir=sockdir, allowed_programs=(f"xclock {CLOCK}", "xmessage -file"),
            )  # fmt: skip

            # Only what is published starts: no launch, no ticket, no connection anywhere.
            probe = await ClientSession.connect(
                dataclasses.replace(f.client_config(), username=alice.name)
            )
            await probe.authenticate(alice.name, alice.password)
            with pytest.raises(PeerError) as refused:
                await probe.launch("xterm")
            assert refused.value.code is ErrorCode.NOT_FOUND
            await probe.aclose()

            # The application, alone on the session's screen.
            first = await _launch(f, nursery, alice, "clock", display, tmp_path)
            launched.append(first)
            active = await _until(_session(f, alice.name, SessionState.ACTIVE))
            screen = int(active.id.split(":")[1])
            assert await _window(alice, screen, "xclock") == ["xclock"]
            shot = tmp_path / "clock.png"
            pixels = await trio.to_thread.run_sync(_screenshot, alice, screen, shot)
            box = await trio.to_thread.run_sync(_geometry, alice, screen, "xclock")
            assert box[2:] >= (320, 240)
            blue, outside, green = _pixels(pixels, box)
            assert blue > 0.6, f"xclock's colour covers {blue:.0%} of its window"
            assert outside == 0, f"{outside} pixels outside the application's window are not black"
            assert green == 0, "the test desktop ran"
            if IMAGES.name:
                (IMAGES / "application-xclock.png").write_bytes(shot.read_bytes())
            clock_pid = _pid_of(alice, "xclock")
            assert len(clock_pid) == 1

            # A document opens in its application, with the file.
            doc = await _launch(f, nursery, bob, "notes", display, tmp_path)
            launched.append(doc)
            opened = await _until(_session(f, bob.name, SessionState.ACTIVE))
            bob_screen = int(opened.id.split(":")[1])
            assert await _window(bob, bob_screen, "xmessage") == ["xmessage"]
            (viewer,) = _pid_of(bob, "xmessage")
            with open(f"/proc/{viewer}/cmdline", "rb") as cmdline:  # noqa: ASYNC230 (/proc)
                argv = cmdline.read().split(b"\0")
            assert argv[:3] == [b"xmessage", b"-file", str(notes).encode()]

            # A client asking the host for a program of its own: xrdp starts it, the host's
            # guard (the agent's allowed_programs) logs the session off at once.
            rogue = await _launch(
                f, nursery, carol, "clock", display, tmp_path,
                own=Program("xlogo", start="shell"),
            )  # fmt: skip
            launched.append(rogue)
            with trio.fail_after(60):
                await rogue.proc.wait()
            assert rogue.proc.returncode == 12  # logged off by the host
            assert _pid_of(carol, "xlogo") == []
            assert _pid_of(carol, "Xorg") == []

            # Disconnected through the broker: the agent reports the session disconnected.
            await f.broker.agents.session_action(active.id, "disconnect")
            with trio.fail_after(30):
                await first.proc.wait()
            gone = await _until(_session(f, alice.name, SessionState.DISCONNECTED))
            assert gone.id == active.id
            assert f.broker.hosts.hosts["xrdp1"].disconnected == 1
            await _stop(first)
            # Now a host with no session at all, first by name: by load alone it would win.
            await nursery.start(decoy.serve)
            await add_agent(f, nursery, "a-decoy", "127.0.0.1", decoy.port)

            # Launched again: back in the same session on the same host, the clock still ticking.
            again = await _launch(f, nursery, alice, "clock", display, tmp_path)
            launched.append(again)
            assert (again.launch.host, again.launch.port) == (server.host, server.port)
            back = await _until(_session(f, alice.name, SessionState.ACTIVE))
            assert back.id == active.id
            assert _pid_of(alice, "xclock") == clock_pid
            assert f.broker.hosts.hosts["xrdp1"].disconnected == 0

            assert decoy.connections == 0
            nursery.cancel_scope.cancel()
