"""Client connection profiles (file, ``ras client profile``), failover to secondary servers,
and the .rdp file writer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from farmkit import PASSWORD, USER, Listener, farm, replace

from ras.client.config import ClientConfig
from ras.client.profiles import Profiles, load_profiles, save_profiles
from ras.client.rdpfile import parse_rdp_file, render_rdp_file
from ras.client.session import ClientSession
from ras.errors import ConfigError, TransportError
from ras.pki import FarmPKI
from ras.protocol import Mode


def ras(*args: str | Path, home: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    env.pop("RAS_PASSWORD", None)
    return subprocess.run(
        [sys.executable, "-m", "ras", "client", *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=timeout,
        check=False,
    )


def test_profiles_round_trip_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    assert load_profiles(path).profiles == {}  # no file yet: no profiles
    ca = tmp_path / "ca.pem"
    work = ClientConfig(
        "gw1.example.com",
        secondary_servers=("gw2.example.com", "[2001:db8::2]:8443"),
        ca_file=ca,
        username="alice",
        resource="desk",
    )
    home = ClientConfig("10.0.0.5", 8080, mode=Mode.GATEWAY, username='bob "b" \\ ü')
    save_profiles(Profiles(path, {"work": work, "home": home}, "home"))
    loaded = load_profiles(path)
    assert loaded.profiles == {"work": work, "home": home}
    assert loaded.get(None) == home
    assert loaded.get("work").servers == [
        ("gw1.example.com", 443),
        ("gw2.example.com", 443),
        ("2001:db8::2", 8443),
    ]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (
            '[profiles.a]\nserver_host = "h"\nsecundary_servers = []\n',
            "profiles.a.secundary_servers",
        ),
        (
            '[profiles.a]\nserver_host = "h"\nsecondary_servers = ["h:99999"]\n',
            "secondary_servers[0]",
        ),
        ('[profiles.a]\nserver_host = "h"\nsecondary_servers = "h2"\n', "secondary_servers"),
        ('default = "b"\n[profiles.a]\nserver_host = "h"\nmode = "gateway"\n', "default"),
        ('colour = "red"\n', "colour"),
    ],
)
def test_bad_profiles_files_name_the_file_and_the_key(tmp_path: Path, text: str, named: str):
    path = tmp_path / "profiles.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_profiles(path)
    assert str(path) in str(info.value)
    assert named in str(info.value)


def test_profile_commands(tmp_path: Path) -> None:
    add = ras("profile", "add", "work", "--server", "gw1.example.com", "--secondary",
              "gw2.example.com:8443", "--ca-file", tmp_path / "ca.pem", "--user", "alice",
              home=tmp_path)  # fmt: skip
    assert add.returncode == 0, add.stderr
    path = tmp_path / ".config" / "ras" / "profiles.toml"
    assert str(path) in add.stderr
    lab = ras("profile", "add", "lab", "--server", "127.0.0.1:18080", "--mode", "gateway",
              "--default", home=tmp_path)  # fmt: skip
    assert lab.returncode == 0, lab.stderr
    listed = ras("profile", "list", home=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].startswith("  work\tgateway_ssl\tgw1.example.com:443,gw2.example.com:8443")
    assert lines[1].startswith("* lab\tgateway\t127.0.0.1:18080")
    again = ras("profile", "add", "lab", "--server", "x", "--mode", "gateway", home=tmp_path)
    assert again.returncode == 2
    assert "exists" in again.stderr
    no_ca = ras("profile", "add", "tls", "--server", "x", home=tmp_path)
    assert no_ca.returncode == 2
    assert "ca_file" in no_ca.stderr
    assert ras("profile", "remove", "lab", home=tmp_path).returncode == 0
    assert load_profiles(path).default == "work"  # the default moved on
    missing = ras("profile", "remove", "lab", home=tmp_path)
    assert missing.returncode == 2
    assert "no profile 'lab'" in missing.stderr
    unknown = ras("--profile", "nope", "list", home=tmp_path)
    assert unknown.returncode == 2
    assert "no profile 'nope'" in unknown.stderr


async def _dead_port() -> int:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def test_primary_down_secondary_used_and_tunnels_follow(tmp_path, nursery, caplog):
    host = Listener()
    await nursery.start(host.serve)
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        good = f.client_config(mode=Mode.GATEWAY)
        dead = await _dead_port()
        cfg = replace(
            good,
            server_host="127.0.0.1",
            server_port=dead,
            secondary_servers=(f"{good.server_host}:{good.server_port}",),
        )
        async with await ClientSession.connect(cfg) as session:
            assert session.server == (good.server_host, good.server_port)
            await session.authenticate(USER, PASSWORD)
            launched = await session.launch("desktop")
            tunnel = await session.open_tunnel(launched.ticket)  # through the secondary too
            await tunnel.send_all(b"through the secondary")
            with trio.fail_after(10):
                assert await tunnel.receive_some(100) == b"through the secondary"
            await tunnel.aclose()
        both_dead = replace(cfg, secondary_servers=(f"127.0.0.1:{dead}",))
        with pytest.raises(TransportError, match="no server answered"):
            await ClientSession.connect(both_dead)
    assert any(f"server=127.0.0.1:{dead}" in r.getMessage() for r in caplog.records)


async def test_cli_list_fails_over_to_the_secondary(tmp_path):
    async with farm(tmp_path) as f:
        good = f.client_config(mode=Mode.GATEWAY)
        dead = await _dead_port()
        (tmp_path / "pw").write_text(PASSWORD + "\n")
        args = (
            *("profile", "add", "p", "--server", f"127.0.0.1:{dead}", "--mode", "gateway"),
            *("--secondary", f"{good.server_host}:{good.server_port}", "--user", USER),
        )
        assert (await trio.to_thread.run_sync(lambda: ras(*args, home=tmp_path))).returncode == 0
        listed = await trio.to_thread.run_sync(
            lambda: ras("--password-file", tmp_path / "pw", "list", home=tmp_path)
        )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("desktop\tdesktop\t")
    assert f"through {good.server_host}:{good.server_port}" in listed.stderr


def test_rdp_file_for_mstsc() -> None:
    text = render_rdp_file(host="gw.example.com", port=3389, token="r1.AbC-_", username="alice")
    assert text.endswith("\r\n")
    assert "full address:s:gw.example.com:3389\r\n" in text
    assert "loadbalanceinfo:s:Cookie: msts=r1.AbC-_\r\n" in text
    settings = parse_rdp_file(text)
    assert settings["username"] == "alice"
    assert (
        parse_rdp_file(render_rdp_file(host="2001:db8::1", port=3390, token="t"))["full address"]
        == "[2001:db8::1]:3390"
    )
    with pytest.raises(ValueError, match="token"):
        render_rdp_file(host="gw", port=3389, token="t\r\nfull address:s:evil:3389")


# -- what the client says when it cannot go on ----------------------------------------------------


async def test_cli_errors_say_what_to_do(tmp_path):
    async with farm(tmp_path) as f:
        plain = f.client_config(mode=Mode.GATEWAY)
        tls = f.client_config(mode=Mode.GATEWAY_SSL)
        pw = tmp_path / "pw"
        pw.write_text(PASSWORD + "\n")
        server = ("--server", f"{plain.server_host}:{plain.server_port}", "--mode", "gateway")

        def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
            return ras("--user", USER, *args, home=tmp_path, timeout=60)

        # A resource that is not published: said at once, exit 2. It was "point an RDP
        # client at ..." and a failure (147, like a wrong RDP password) only at connect.
        listen = str(await _dead_port())
        nosuch = await trio.to_thread.run_sync(
            lambda: run(*server, "--password-file", pw, "launch", "nosuch", "--listen", listen)
        )
        assert nosuch.returncode == 2, nosuch.stderr
        assert "ras client: no resource 'nosuch' is published to alice (yours: desktop)" in (
            nosuch.stderr
        )
        assert "point an RDP client" not in nosuch.stderr

        # A gateway certificate the CA file does not vouch for. It was "TLS with ... failed: ".
        rogue = FarmPKI(tmp_path / "rogue")
        rogue.ensure("x")
        untrusted = await trio.to_thread.run_sync(
            lambda: run(
                "--server", f"{tls.server_host}:{tls.server_port}", "--ca-file", rogue.ca_path,
                "--password-file", pw, "list",
            )
        )  # fmt: skip
        assert untrusted.returncode == 4, untrusted.stderr
        assert "its certificate is not trusted" in untrusted.stderr

        # A password file that is not there: a bad argument (2), as documented; it was 1.
        missing = await trio.to_thread.run_sync(
            lambda: run(*server, "--password-file", tmp_path / "nowhere", "list")
        )
        assert missing.returncode == 2, missing.stderr
        assert missing.stderr == f"ras client: {tmp_path / 'nowhere'}: cannot read the " + (
            "password file: No such file or directory\n"
        )
