"""One fuzz target under atheris: ``python -m fuzz.engine TARGET [libFuzzer options and
corpus directories]`` (``python -m fuzz`` builds the command line; see its ``--help``).

The target is imported inside ``atheris.instrument_imports``, so that the code under test (the
``ras`` package, and h11, which reads the admin API's requests) reports its coverage to
libFuzzer; the harness itself is not instrumented. libFuzzer ends the process: exit 0 when the
time or run budget is spent, non-zero with the input written out when the target crashed.
"""

from __future__ import annotations

import logging
import sys

import atheris

import fuzz

INSTRUMENTED = ["ras", "h11"]


def main() -> None:
    if len(sys.argv) < 2:
        targets = ", ".join(fuzz.TARGETS)
        sys.exit(
            f"usage: python -m fuzz.engine TARGET [libFuzzer options] [corpus dirs]\n"
            f"targets: {targets}"
        )
    name = sys.argv[1]
    # The daemons' warnings (a failed admin logon...) would be printed for every input; an
    # error (the admin API's "bug" traceback before a 500) is still shown.
    logging.disable(logging.WARNING)
    with atheris.instrument_imports(include=INSTRUMENTED):
        target = fuzz.load(name)
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target.fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
