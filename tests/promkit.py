"""A real Prometheus (Debian's ``prometheus``) for tests: its config, its command line, and
reading the answers of its HTTP query API.

How the test reaches Prometheus is its own business (loopback in tests/test_prometheus.py, a
socket inside a lab host in tests/test_halb_prometheus.py): this kit only builds the request
path and reads the answer. Prometheus scrapes and evaluates the rules every second, so a test
asks until the answer is the one expected, never after a fixed sleep.
"""

from __future__ import annotations

import shutil
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from peerkit import skip_or_fail

__all__ = [
    "DEPLOY",
    "RULES",
    "argv",
    "first_value",
    "query_path",
    "require_prometheus",
    "series",
    "write_config",
]

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
RULES = DEPLOY / "ras-rules.yml"  # the shipped alert rules, loaded as they are


def require_prometheus() -> None:
    if shutil.which("prometheus") is None:
        skip_or_fail("prometheus is not installed (Debian: prometheus; scripts/install-peers)")


def write_config(
    path: Path,
    jobs: Mapping[str, Sequence[str] | Mapping[str, Sequence[str]]],
    *,
    rules: Path | None = None,
    ca_file: Path | None = None,
) -> Path:
    """A Prometheus config that scrapes and evaluates every second.

    ``jobs`` maps a job name to its targets (``host:port``), or to ``{label: [targets]}``
    where each target gets ``node=label`` (so that a test can say which node a series is
    from). With ``ca_file`` every job scrapes over HTTPS trusting that CA (the farm's).
    """
    lines = ["global:", "  scrape_interval: 1s", "  evaluation_interval: 1s"]
    if rules is not None:
        lines.append(f"rule_files: ['{rules}']")
    lines.append("scrape_configs:")
    for job, targets in jobs.items():
        lines.append(f"  - job_name: {job}")
        if ca_file is not None:
            lines += ["    scheme: https", f"    tls_config: {{ca_file: '{ca_file}'}}"]
        lines.append("    static_configs:")
        if isinstance(targets, Mapping):
            for node, listed in targets.items():
                lines.append(f"      - {{targets: {list(listed)}, labels: {{node: {node}}}}}")
        else:
            lines.append(f"      - {{targets: {list(targets)}}}")
    path.write_text("\n".join(lines) + "\n")
    return path


def argv(config: Path, tsdb: Path, listen: str) -> list[str]:
    """The command line of a Prometheus with ``config``, its storage in ``tsdb``, its web
    interface and API on ``listen`` (``host:port``)."""
    return [
        "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={tsdb}",
        f"--web.listen-address={listen}",
    ]


def query_path(expr: str) -> str:
    """The path of an instant query of ``expr`` (GET it from the Prometheus web address)."""
    return "/api/v1/query?" + urllib.parse.urlencode({"query": expr})


def series(answer: Mapping[str, Any]) -> list[tuple[dict[str, str], float]]:
    """The series of an instant query's answer: each one's labels and value."""
    if answer.get("status") != "success":
        raise AssertionError(f"Prometheus refused the query: {answer}")
    return [(r["metric"], float(r["value"][1])) for r in answer["data"]["result"]]


def first_value(answer: Mapping[str, Any]) -> float | None:
    """The value of the first series of an instant query's answer; None when there is none."""
    found = series(answer)
    return found[0][1] if found else None
