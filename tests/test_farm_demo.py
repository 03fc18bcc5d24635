"""`ras farm up` as a new user runs it: a farm with a demo desktop, and the commands it prints
log in to that desktop through the gateway; so does the .rdp file its User Portal hands out.

The real `ras farm up` process (broker, gateway, agent and the demo RDP host: Xvfb mirrored by
freerdp-shadow-cli with NLA) on free loopback ports in a temporary directory; the printed
`ras client ... launch --listen` and `xfreerdp ...` lines are run as printed, through a shell.
The portal is used over HTTPS as a browser uses it (cookies, the forms' CSRF tokens), and real
xfreerdp opens the downloaded .rdp file.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from conftest import require_peers
from rdp_peers import free_port

from ras.client.rdpfile import parse_rdp_file

pytestmark = pytest.mark.peers
RAS = [sys.executable, "-m", "ras"]


def _ports() -> list[str]:
    flags = ["--gateway-port", "--gateway-tls-port", "--gateway-rdp-port", "--broker-port",
             "--agent-port", "--admin-port", "--demo-rdp-port"]  # fmt: skip
    return [arg for flag in flags for arg in (flag, str(free_port()))]


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace")
        if re.search(pattern, text, re.M):
            return text
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {pattern!r}:\n{text}")
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in {timeout} s:\n{path.read_text(errors='replace')}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class _Browser:
    """The User Portal over HTTPS as a browser uses it: the gateway's self-signed certificate
    trusted, cookies kept, forms posted with their fields (one request a connection, as the
    portal answers)."""

    def __init__(self, url: str, ca_file: Path) -> None:
        parts = urllib.parse.urlsplit(url)
        assert parts.hostname is not None, url
        assert parts.port is not None, url
        self.host, self.port = parts.hostname, parts.port
        self.context = ssl.create_default_context(cafile=str(ca_file))
        self.cookies: dict[str, str] = {}
        self.page = ""

    def request(
        self, method: str, target: str, form: dict[str, str] | None = None
    ) -> http.client.HTTPResponse:
        headers = {}
        if self.cookies:
            headers["cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["content-type"] = "application/x-www-form-urlencoded"
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=60)
        try:
            conn.request(method, target, body, headers)
            response = conn.getresponse()
            self.page = response.read().decode("utf-8", "replace")
        finally:
            conn.close()
        for value in response.headers.get_all("set-cookie") or ():
            name, _, rest = value.partition("=")
            self.cookies[name] = rest.split(";", 1)[0]
        return response

    def field(self, name: str) -> str:
        found = re.search(rf'name="{name}" value="([^"]*)"', self.page)
        assert found, f"no {name} in:\n{self.page}"
        return found.group(1)


def _xfreerdp_file(
    rdp_file: Path, password: str, env: dict[str, str]
) -> subprocess.CompletedProcess[bytes]:
    """xfreerdp on the downloaded file, as a user opens it (``+auth-only``: NLA, 0 or 147)."""
    argv = ["xfreerdp", str(rdp_file), "/u:demo", f"/p:{password}", "/cert:ignore", "+auth-only"]
    return subprocess.run(argv, env=env, capture_output=True, timeout=90, check=False)


def _portal_rdp_file(text: str, tmp_path: Path, env: dict[str, str]) -> None:
    """The printed portal: log in as the farm's demo user, the desktop offers its .rdp file
    (first, the browser as the fallback: the portal's default), and xfreerdp opens the file
    through the printed RDP port to an NLA login on the demo desktop."""
    state = tmp_path / "state"
    url = re.search(r"^  (https://\S+/)", text, re.M)
    rdp = re.search(r"^ +(127\.0\.0\.1:\d+) \(RDP: the portal's \.rdp files name it\)$", text, re.M)
    assert url, text
    assert rdp, text
    browser = _Browser(url.group(1), state / "pki" / "gateway-public.pem")
    browser.request("GET", "/login")
    password = (state / "demo.password").read_text().strip()
    form = {"csrf": browser.field("csrf"), "username": "demo", "password": password}
    assert browser.request("POST", "/login", form).status == 303, browser.page
    assert browser.request("GET", "/resources").status == 200
    offered = re.findall(r'<button type="submit" data-method="(\w+)"', browser.page)
    assert offered == ["native", "browser"], browser.page
    form = {"csrf": browser.field("csrf"), "resource": "desktop", "method": "native"}
    got = browser.request("POST", "/launch", form)
    assert got.status == 200, browser.page
    assert got.headers["content-type"].startswith("application/x-rdp")
    rdp_file = tmp_path / "desktop.rdp"
    rdp_file.write_text(browser.page)
    settings = parse_rdp_file(browser.page)
    port = rdp.group(1).rpartition(":")[2]
    assert settings["full address"] == f"localhost:{port}"  # the gateway's public host name
    assert settings["loadbalanceinfo"].startswith("Cookie: msts=")
    rdp_password = (state / "demo-rdp.password").read_text().strip()
    right = _xfreerdp_file(rdp_file, rdp_password, env)
    wrong = _xfreerdp_file(rdp_file, "wrong", env)
    assert right.returncode == 0, right.stdout.decode(errors="replace")[-2000:]
    assert wrong.returncode == 147, wrong.stdout.decode(errors="replace")[-2000:]


def test_the_printed_commands_log_in_to_the_demo_desktop(tmp_path, display):
    require_peers(xrdp=False)
    env = {**os.environ, "HOME": str(tmp_path), "DISPLAY": display}
    farm_log = tmp_path / "farm.log"
    with open(farm_log, "wb") as out:
        farm = subprocess.Popen(
            [*RAS, "farm", "up", *_ports()], cwd=tmp_path, env=env, stdout=out, stderr=out
        )
    procs = [farm]
    try:
        text = _wait_for(farm_log, r"^Stop with Ctrl-C", farm, 60)
        lines = text.splitlines()
        at = lines.index("Log in to the desktop through the gateway, in another shell:")
        launch, login = lines[at + 1].strip(), lines[at + 2].strip()
        assert launch.endswith("launch desktop --listen 127.0.0.1:13389")
        assert login.startswith("xfreerdp /v:127.0.0.1:13389 /u:demo ")
        # the listen port may be taken on a shared machine: the same command on a free one
        port = str(free_port())
        launch = launch.replace(":13389", f":{port}")
        login = login.replace(":13389", f":{port}")
        client_log = tmp_path / "client.log"
        with open(client_log, "wb") as out:
            client = subprocess.Popen(
                ["bash", "-c", launch], cwd=tmp_path, env=env, stdout=out, stderr=out
            )
        procs.append(client)
        _wait_for(client_log, "point an RDP client at", client, 30)
        right = subprocess.run(
            ["bash", "-c", login + " +auth-only"], cwd=tmp_path, env=env, capture_output=True,
            timeout=60, check=False,
        )  # fmt: skip
        wrong = subprocess.run(
            ["bash", "-c", re.sub(r'/p:"[^"]*"', "/p:wrong", login) + " +auth-only"],
            cwd=tmp_path, env=env, capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert right.returncode == 0, right.stdout.decode(errors="replace")[-2000:]
        assert wrong.returncode == 147, wrong.stdout.decode(errors="replace")[-2000:]
        assert "tunnel closed" in farm_log.read_text()  # through the gateway, not around it
        _portal_rdp_file(text, tmp_path, env)
        # through the gateway's RDP port, routed by the file's token, for the farm's user
        closed = re.findall(r"tunnel closed user=demo resource=desktop .* via=token ",
                            farm_log.read_text())  # fmt: skip
        assert len(closed) == 2, farm_log.read_text()
    finally:
        for proc in reversed(procs):
            _stop(proc)
    assert farm.returncode == 0
    # the demo host's X server and RDP server went with the farm
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, check=False)
    assert leftovers.stdout == b""


def test_flags_that_differ_from_the_state_are_refused(tmp_path):
    ports = _ports()
    made = subprocess.run(
        [*RAS, "farm", "init", *ports], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert made.returncode == 0, made.stderr
    again = subprocess.run(
        [*RAS, "farm", "init", *ports], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert again.returncode == 0, again.stderr  # the same flags: fine
    other = str(free_port())
    refused = subprocess.run(
        [*RAS, "farm", "up", "--gateway-port", other, "--rdp", "10.0.0.5:3389"],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert refused.returncode == 2
    assert f"--gateway-port {other}: gateway.toml has plain_port = " in refused.stderr
    assert "--rdp 10.0.0.5:3389: agent.toml has rdp_host = '127.0.0.1'" in refused.stderr
