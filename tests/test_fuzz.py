"""The fuzz targets of ``tests/fuzz`` inside the test suite: every kept input replayed, then a
short run of each target under atheris with a fixed seed and a fixed number of inputs (no
clock), and the regression tests of what fuzzing found. Longer runs: ``./dev fuzz``."""

from __future__ import annotations

import platform
import sys

import fuzz
import pytest
from fuzz.__main__ import command, run

pytestmark = pytest.mark.fuzz

RUNS = 2000
SEED = 1


def _need_atheris() -> None:
    """atheris is a dev dependency where it has wheels (Linux x86-64): there it must be
    installed; elsewhere the short runs are skipped (the replay still runs)."""
    if sys.platform == "linux" and platform.machine() == "x86_64":
        import atheris  # noqa: F401
    else:
        pytest.importorskip("atheris")


KEPT = [(name, path) for name in fuzz.TARGETS for path in sorted((fuzz.CORPUS / name).iterdir())]


@pytest.mark.parametrize(("name", "path"), KEPT, ids=[f"{n}/{p.name}" for n, p in KEPT])
def test_a_kept_input_replays_cleanly(name: str, path) -> None:
    fuzz.load(name).fuzz_one(path.read_bytes())


def test_every_target_has_a_kept_corpus() -> None:
    assert {name for name, _ in KEPT} == set(fuzz.TARGETS)


@pytest.mark.parametrize("name", fuzz.TARGETS)
def test_a_short_fuzz_run_finds_nothing(name: str, tmp_path) -> None:
    _need_atheris()
    cmd = command(name, tmp_path, runs=RUNS, seed=SEED)
    result = run(name, cmd, tmp_path / "log", echo=False)
    log = (tmp_path / "log").read_text(errors="replace")
    assert result.returncode == 0, f"{result.crash}\n{log[-6000:]}"
    assert result.runs == RUNS, log[-2000:]
    assert result.cov, log[-2000:]


def test_fuzz_cli_refuses_an_unknown_target(capsys) -> None:
    from fuzz.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["nosuch"])
    assert info.value.code == 2
    assert "no target 'nosuch'" in capsys.readouterr().err


# -- what fuzzing found: ras.net.http.respond sent a body to HEAD (h11 refused it) -----------


def test_a_head_request_to_the_admin_api_is_answered() -> None:
    admin_http = fuzz.load("admin_http")
    got = admin_http._serve([b"HEAD /api/status HTTP/1.1\r\nhost: x\r\n\r\n"], known_faults=False)
    assert got[0] == 405  # answered (the API serves GET there), no longer a failed handler


def test_a_head_request_to_the_gateway_plain_port_is_answered() -> None:
    gateway_http = fuzz.load("gateway_http")
    sent = gateway_http._serve([b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n"], known_faults=False)
    assert sent.startswith(b"HTTP/1.1 301 ")
    assert sent.endswith(b"\r\n\r\n")  # the head only
