"""Published applications, documents and folders: what a launch starts, and how each host kind
and RDP client is told (codec and pure-logic level; the real xrdp run is in
test_applications_xrdp.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from farmkit import PASSWORD, USER, login
from memkit import memory_farm, reply_to

from ras.agents import xrdp
from ras.broker.config import ResourceConfig
from ras.broker.model import ResourceKind, ResourceRecord
from ras.broker.programs import program_fields
from ras.client.programs import Program
from ras.client.rdpclient import rdp_command
from ras.client.rdpfile import parse_rdp_file, render_rdp_file
from ras.errors import ErrorCode, ProtocolError
from ras.protocol import (
    AgentRegister,
    AppStart,
    Error,
    HostKind,
    Launch,
    LaunchOk,
    LoadReport,
    Mode,
    RdpToken,
    RdpTokenOk,
    Registered,
    Role,
    SessionState,
)
from ras.protocol.messages import decode_body, encode_body

CLOCK = ResourceRecord(
    "clock", "Clock", ResourceKind.APPLICATION, command="xclock", arguments="-bg rgb:20/40/c0",
    working_dir="/tmp",
)  # fmt: skip
NOTES = ResourceRecord(
    "notes", "Notes", ResourceKind.DOCUMENT, target="/srv/it's notes.txt", application="clock"
)
HOME = ResourceRecord("home", "Home", ResourceKind.FOLDER, target="/home/shared")
DESKTOP = ResourceRecord("desktop", "Desktop")


def _launch(resource: ResourceRecord, start: AppStart = AppStart.SHELL) -> LaunchOk:
    fields = program_fields(resource, (CLOCK, NOTES, HOME, DESKTOP), start)
    msg = LaunchOk(Mode.GATEWAY_SSL, "10.0.0.5", 3389, "ticket", 60, **fields)
    decoded = decode_body(encode_body(msg))  # what the client really gets, through the codec
    assert decoded == msg
    assert isinstance(decoded, LaunchOk)
    return decoded


def test_an_application_starts_alone_through_xrdp_alternate_shell():
    launched = _launch(CLOCK)
    assert (launched.command, launched.start, launched.single_sign_on) == ("xclock", "shell", True)
    options = Program.from_launch(launched).xfreerdp_options()
    assert options == ["/shell:xclock -bg rgb:20/40/c0", "/shell-dir:/tmp"]


def test_an_application_on_a_windows_host_is_a_remoteapp():
    program = Program.from_launch(_launch(CLOCK, AppStart.REMOTEAPP), "Clock")
    assert program.xfreerdp_options() == [
        "/app:xclock", "/app-cmd:-bg rgb:20/40/c0", "/app-workdir:/tmp", "/app-name:Clock",
    ]  # fmt: skip
    settings = parse_rdp_file(render_rdp_file(host="gw", port=3389, token="t", program=program))
    assert settings["remoteapplicationmode"] == "1"
    assert settings["remoteapplicationprogram"] == "xclock"
    assert settings["remoteapplicationcmdline"] == "-bg rgb:20/40/c0"
    assert settings["remoteapplicationname"] == "Clock"


def test_a_document_opens_in_its_application_with_the_file_as_one_word():
    launched = _launch(NOTES)
    assert (launched.command, launched.target) == ("xclock", "/srv/it's notes.txt")
    line = Program.from_launch(launched).command_line()
    # sesman runs a command line with blanks through /bin/sh -c: the file is one shell word
    assert line == "xclock -bg rgb:20/40/c0 '/srv/it'\"'\"'s notes.txt'"
    remote = Program.from_launch(_launch(NOTES, AppStart.REMOTEAPP)).remote_arguments()
    assert remote == '-bg rgb:20/40/c0 "/srv/it\'s notes.txt"'


def test_a_folder_opens_in_the_file_manager_and_a_desktop_starts_nothing():
    folder = Program.from_launch(_launch(HOME))
    assert folder.xfreerdp_options() == ["/shell:xdg-open /home/shared"]
    desktop = _launch(DESKTOP)
    assert (desktop.command, desktop.start) == ("", "")
    assert Program.from_launch(desktop).xfreerdp_options() == []
    assert "alternate shell" not in parse_rdp_file(
        render_rdp_file(host="gw", port=3389, token="t", program=Program.from_launch(desktop))
    )


def test_rdp_file_carries_the_alternate_shell_and_refuses_injected_lines():
    program = Program.from_launch(_launch(CLOCK))
    settings = parse_rdp_file(render_rdp_file(host="gw", port=3389, token="t", program=program))
    assert settings["alternate shell"] == "xclock -bg rgb:20/40/c0"
    assert settings["shell working directory"] == "/tmp"
    with pytest.raises(ValueError, match="program command"):
        render_rdp_file(
            host="gw",
            port=3389,
            token="t",
            program=Program("x\r\nfull address:s:evil", start="shell"),
        )


def test_single_sign_on_gives_the_password_on_stdin_never_in_argv():
    secret = "farm pass\u00e9 w0rd"
    cmd = rdp_command(
        "/usr/bin/xfreerdp", "127.0.0.1:5555", Program.from_launch(_launch(CLOCK)),
        ["/cert:ignore"], sso=("alice", secret),
    )  # fmt: skip
    assert cmd.single_sign_on
    assert cmd.stdin == (secret + "\n").encode()
    assert not any(secret in a or "/p:" in a for a in cmd.argv)
    assert cmd.argv[-3:] == ["/u:alice", "/from-stdin:force", "/cert:ignore"]
    # the user's own credentials win; another RDP client gets no stdin
    own = rdp_command("xfreerdp", "h:1", Program(), ["/u:bob", "/p:x"], sso=("alice", secret))
    assert own.stdin is None
    assert "/u:alice" not in own.argv
    other = rdp_command("remmina", "h:1", Program.from_launch(_launch(CLOCK)), sso=("a", secret))
    assert other.stdin is None
    assert other.argv == ["remmina", "/v:h:1"]


def test_launch_ok_start_and_the_new_optional_fields_are_checked_and_omitted_at_default():
    with pytest.raises(ProtocolError, match="start"):
        LaunchOk(Mode.GATEWAY, "h", 1, "t", 5, start="ssh")
    assert b"start" not in encode_body(LaunchOk(Mode.GATEWAY, "h", 1, "t", 5))
    reg = AgentRegister("pc1", HostKind.REMOTE_PC, "10.0.0.9", 3389, 1)
    assert b"apps" not in encode_body(reg)  # an older broker reads it unchanged
    assert decode_body(encode_body(reg)) == reg
    assert decode_body(encode_body(LoadReport(1.0, 2.0, 0, 0, ready=False))) == LoadReport(
        1.0, 2.0, 0, 0, ready=False
    )


# -- xrdp's sessions from /proc ------------------------------------------------------------------


def _fake_proc(tmp: Path, connected: set[int]) -> Path:
    proc = tmp / "proc"
    (proc / "net").mkdir(parents=True)
    rows = ["Num       RefCount Protocol Flags    Type St Inode Path"]
    for pid, display in ((4101, 101), (4102, 102)):
        (proc / str(pid)).mkdir()
        argv = ["/usr/lib/xorg/Xorg", f":{display}", "-auth", ".Xauthority", "-config"]
        (proc / str(pid) / "cmdline").write_bytes(
            "\0".join([*argv, "xrdp/xorg.conf", "-noreset"]).encode() + b"\0"
        )
        path = f"/run/xrdp/sockdir/xrdp_display_{display}"
        rows.append(f"0000: 00000002 00000000 00010000 0001 01 {pid}0 {path}")
        if display in connected:
            rows.append(f"0000: 00000003 00000000 00000000 0001 03 {pid}1 {path}")
    (proc / "4200").mkdir()  # another X server: not a session of xrdp
    (proc / "4200" / "cmdline").write_bytes(b"/usr/bin/Xvfb\0:5\0")
    (proc / "net" / "unix").write_text("\n".join(rows) + "\n")
    return proc


def test_xrdp_sessions_are_active_while_a_client_is_attached_else_disconnected(tmp_path):
    sessions = xrdp.xrdp_sessions(_fake_proc(tmp_path, connected={102}))
    assert [(s.display, s.pid, s.state) for s in sessions] == [
        (101, 4101, SessionState.DISCONNECTED),
        (102, 4102, SessionState.ACTIVE),
    ]


def test_xrdp_disconnect_sends_a_datagram_to_the_display_socket(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "xrdp_disconnect_display_101"))
        xrdp.disconnect(101, tmp_path)
        assert listener.recv(100)
    with pytest.raises(FileNotFoundError):
        xrdp.disconnect(102, tmp_path)


# -- the broker's answers -------------------------------------------------------------------------


@pytest.mark.usefixtures("inline_threads")
async def test_launch_and_rdp_token_carry_the_program_and_the_hosts_way(
    tmp_path, nursery, autojump_clock
):
    clock = ResourceConfig(
        "clock", "Clock", ResourceKind.APPLICATION, command="xclock", hosts=("win1",),
        single_sign_on=False,
    )  # fmt: skip
    async with memory_farm(tmp_path, nursery, resources=(clock,)) as f, f.session() as chan:
        agent = await f.dial_broker("win1", Role.AGENT, port=20003)
        register = AgentRegister("win1", HostKind.RDSH, "10.0.0.7", 3389, 5, AppStart.REMOTEAPP)
        assert isinstance(await agent.request(register), Registered)
        await agent.send(LoadReport(1.0, 1.0, 0, 0))
        assert await login(chan, USER, PASSWORD) == (None, USER)
        launched = await reply_to(chan, Launch("clock", Mode.DIRECT))
        token = await reply_to(chan, RdpToken("clock"))
        refused = await reply_to(chan, Launch("xterm", Mode.DIRECT))
    assert isinstance(launched, LaunchOk)
    assert (launched.command, launched.start, launched.single_sign_on) == (
        "xclock",
        "remoteapp",
        False,
    )
    assert isinstance(token, RdpTokenOk)
    settings = parse_rdp_file(
        render_rdp_file(
            host="gw", port=3389, token=token.token, program=Program.from_launch(token, "Clock")
        )
    )
    assert settings["remoteapplicationprogram"] == "xclock"
    assert isinstance(refused, Error)
    assert refused.code is ErrorCode.NOT_FOUND


# -- the host's guard: only the programs it allows ------------------------------------------------


def test_only_allowed_programs_and_one_quoted_file_pass_the_guard():
    programs = ["xclock -bg rgb:20/40/c0", "xmessage -file"]
    assert xrdp.allowed("xclock -bg rgb:20/40/c0", programs)
    assert xrdp.allowed("xmessage -file '/srv/it'\"'\"'s notes.txt'", programs)
    assert xrdp.allowed("xmessage -file /srv/notes.txt", programs)
    for line in (
        "xterm",
        "xclock -bg red",
        "xclock -bg rgb:20/40/c0; xterm",  # sh -c would run both
        "xmessage -file /srv/a /srv/b",
        "xmessage -file $(xterm)",
        'xmessage -file "$(xterm)"',
        "xmessage -file '/srv/a' && xterm",
        "xmessage -filex",
    ):
        assert not xrdp.allowed(line, programs), line


def test_the_session_program_is_the_x_servers_sibling(tmp_path):
    proc = _fake_proc(tmp_path, connected={101})
    for pid, ppid, argv in (
        (4101, 4000, None),  # the X server of display 101 (cmdline written by _fake_proc)
        (4103, 4000, ["/usr/sbin/xrdp-chansrv"]),
        (4104, 4000, ["sh", "-c", "xclock -bg rgb:20/40/c0"]),
        (4105, 4104, ["xclock", "-bg", "rgb:20/40/c0"]),
    ):
        (proc / str(pid)).mkdir(exist_ok=True)
        (proc / str(pid) / "stat").write_text(f"{pid} (x y) S {ppid} 1 1 0\n")
        if argv:
            (proc / str(pid) / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")
    (proc / "4102" / "stat").write_text("4102 (Xorg) S 4999 1 1 0\n")
    session, _ = xrdp.xrdp_sessions(proc)
    assert xrdp.session_program(session, proc) == "xclock -bg rgb:20/40/c0"
    # before sesman's child execs the program (it waits for the X server), it is sesman
    (proc / "4104" / "cmdline").write_bytes(b"xrdp-sesman\0--nodaemon\0")
    assert xrdp.session_program(session, proc) is None
