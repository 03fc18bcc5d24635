"""``./dev fuzz [TARGET ...] [--seconds N]``: run fuzz targets under atheris, one after the
other, and print each one's executions per second and coverage.

Each target runs in its own process (``python -m fuzz.engine``) over its kept corpus
(``tests/fuzz/corpus/TARGET``, read only) and its scratch corpus (``WORKDIR/TARGET/corpus``,
where libFuzzer writes every new input that reaches new code; it is kept from run to run). A
crashing input is written to ``WORKDIR/TARGET/crashes/`` and the traceback printed; the exit
status is then 1. ``--keep`` merges into the kept corpus the scratch inputs that add coverage
(review them before committing). Options after ``--`` go to libFuzzer as they are
(``-- -only_ascii=1``, ``-- -jobs=2``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fuzz import CORPUS, TARGETS, load

TESTS = Path(__file__).resolve().parent.parent
MAX_LEN = 4096  # bytes: above every limit the codecs check (but the control frame's 64 KiB)
# libFuzzer's line per new input, its dictionary advice, atheris' list of modules instrumented
# and the sanitizer hooks a Python process does not have: in the log only.
_QUIET = re.compile(
    r"^#\d+\s+(NEW|REDUCE)\s|^\"|^###### |^MERGE-|^INFO: Instrumenting |"
    r"^WARNING: Failed to find function \"__sanitizer"
)


@dataclass
class Result:
    name: str
    returncode: int
    seconds: float
    runs: int | None = None
    exec_per_s: int | None = None
    cov: int | None = None
    ft: int | None = None
    corpus: str | None = None
    new_units: int | None = None
    crash: str | None = None

    def read(self, line: str) -> None:
        if m := re.search(r"cov: (\d+) ft: (\d+) corp: (\S+)", line):
            self.cov, self.ft, self.corpus = int(m[1]), int(m[2]), m[3]
        elif m := re.match(r"stat::number_of_executed_units: *(\d+)", line):
            self.runs = int(m[1])
        elif m := re.match(r"stat::average_exec_per_sec: *(\d+)", line):
            self.exec_per_s = int(m[1])
        elif m := re.match(r"stat::new_units_added: *(\d+)", line):
            self.new_units = int(m[1])
        elif m := re.search(r"Test unit written to (\S+)", line):
            self.crash = m[1]


def _dictionary(tokens: Sequence[bytes]) -> str:
    """libFuzzer's dictionary format: one quoted token a line, other bytes as \\xNN."""
    lines = []
    for token in tokens:
        text = "".join(
            chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in token
        )
        lines.append(f'"{text}"\n')
    return "".join(lines)


def command(
    name: str,
    workdir: Path,
    *,
    seconds: int | None = None,
    runs: int | None = None,
    seed: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The engine's command line for one run of ``name`` (directories made as needed)."""
    work = workdir / name
    found, crashes = work / "corpus", work / "crashes"
    found.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    dictionary = work / "dictionary"
    dictionary.write_text(_dictionary(load(name).DICTIONARY))
    cmd = [sys.executable, "-m", "fuzz.engine", name, f"-dict={dictionary}"]
    cmd += [f"-artifact_prefix={crashes}/", f"-max_len={MAX_LEN}", "-timeout=10"]
    cmd += ["-rss_limit_mb=2048", "-print_final_stats=1"]
    if seconds is not None:
        cmd.append(f"-max_total_time={seconds}")
    if runs is not None:
        cmd.append(f"-runs={runs}")
    if seed is not None:
        cmd.append(f"-seed={seed}")
    return [*cmd, *extra, str(found), str(CORPUS / name)]


def environment() -> dict[str, str]:
    """The environment for the engine: ``tests/`` on the path, so ``fuzz`` imports."""
    paths = [str(TESTS), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.environ | {"PYTHONPATH": os.pathsep.join(paths)}


def run(name: str, cmd: list[str], log: Path, *, echo: bool = True) -> Result:
    """Run one engine command; its whole output goes to ``log``, the gist to stdout."""
    start = time.monotonic()
    result = Result(name, 0, 0.0)
    with (
        log.open("w") as out,
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", env=environment(),
        ) as proc,
    ):  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            result.read(line)
            if echo and not _QUIET.search(line):
                print(f"[{name}] {line}", end="", flush=True)
    result.returncode = proc.returncode
    result.seconds = time.monotonic() - start
    return result


def _merge(name: str, workdir: Path) -> None:
    before = set(os.listdir(CORPUS / name))
    cmd = [sys.executable, "-m", "fuzz.engine", name, "-merge=1", f"-max_len={MAX_LEN}"]
    cmd += [str(CORPUS / name), str(workdir / name / "corpus")]
    run(name, cmd, workdir / name / "merge.log", echo=False)
    added = sorted(set(os.listdir(CORPUS / name)) - before)
    print(f"[{name}] kept {len(added)} new inputs in {CORPUS / name}")


def _table(results: list[Result]) -> str:
    head = ("target", "seconds", "runs", "exec/s", "cov", "ft", "corpus", "new", "crash")
    rows = [head]
    for r in results:
        crash = r.crash or ("" if r.returncode == 0 else f"exit {r.returncode}")
        row = (r.name, f"{r.seconds:.0f}", r.runs, r.exec_per_s, r.cov, r.ft, r.corpus)
        rows.append((*map(lambda v: "?" if v is None else str(v), row), str(r.new_units), crash))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(
        prog="./dev fuzz",
        description="Run fuzz targets under atheris (libFuzzer), one after the other.",
        epilog=f"targets: {', '.join(TARGETS)}. libFuzzer options go after --.",
    )
    parser.add_argument("targets", nargs="*", metavar="TARGET", help="default: all of them")
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument("--runs", type=int, help="stop each target after this many inputs")
    parser.add_argument("--seed", type=int, help="libFuzzer's random seed (default: random)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "ras-fuzz",
        help="scratch corpus, crashes and logs (default: %(default)s)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="merge new inputs that add coverage into the corpus"
    )
    args = parser.parse_args(argv)
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"no target {unknown[0]!r} (targets: {', '.join(TARGETS)})")
    results = []
    for name in args.targets or TARGETS:
        cmd = command(
            name, args.workdir, seconds=args.seconds, runs=args.runs, seed=args.seed, extra=extra
        )
        result = run(name, cmd, args.workdir / name / "log")
        results.append(result)
        if result.returncode == 0 and args.keep:
            _merge(name, args.workdir)
    print()
    print(_table(results))
    print(f"logs, scratch corpus and crashes: {args.workdir}/TARGET/")
    return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
