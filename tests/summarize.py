"""The single reporter of test.sh: one verdict from the JUnit XML and exit code of each phase.

    python tests/summarize.py --phase serial 0 .test-logs/junit-serial.xml \\
                              --phase mpi-n2 1 .test-logs/junit-mpi-n2.xml

Prints a line per phase, a line per failed test and per bad phase, and as the very last line
``N passed, N failed, N skipped`` (errors count as failed, xfails as skipped). Exits 1 if any
test failed, any phase exited nonzero, or any phase left no readable XML (killed, e.g. by the
outer timeout). Exit code 5 (no tests collected) is fine for a phase whose XML has no tests.
"""
from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

NO_TESTS = 5
EXIT_HINTS = {1: "tests failed", 2: "interrupted", 3: "internal error", 4: "usage error",
              5: "no tests collected"}
CUT_SHORT = {124: "killed by the outer timeout", 137: "killed by SIGKILL (outer timeout -k?)"}
MAX_LISTED = 20


@dataclass
class Phase:
    """One pytest run: its name, exit code and what its JUnit XML says."""

    name: str
    returncode: int
    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    problem: str = ""
    returncode_text: str = ""


def outcome(case: ET.Element) -> str:
    tags = {child.tag for child in case}
    if tags & {"failure", "error"}:
        return "failed"
    return "skipped" if "skipped" in tags else "passed"


def failure_line(case: ET.Element) -> str:
    name = f"{case.get('classname', '')}::{case.get('name', '')}"
    bad = case.find("failure")
    bad = bad if bad is not None else case.find("error")
    message = (bad.get("message", "") if bad is not None else "").strip().splitlines()
    return f"{name} - {message[0][:160]}" if message else name


def read_phase(name: str, returncode: int, xml: Path) -> Phase:
    phase = Phase(name, returncode)
    try:
        cases = list(ET.parse(xml).getroot().iter("testcase"))
    except (OSError, ET.ParseError) as err:
        cut = CUT_SHORT.get(returncode, "cut short by a timeout, crash or abort")
        phase.problem = (f"no readable JUnit XML ({type(err).__name__}: {xml}); exit "
                         f"{returncode}: {cut}; see the output above and .test-logs/")
        phase.returncode_text = f"exit {returncode}, no XML"
        return phase
    hint = EXIT_HINTS.get(returncode, "")
    exit_text = f"exit {returncode}" + (f": {hint}" if hint else "")
    for case in cases:
        result = outcome(case)
        phase.counts[result] += 1
        if result == "failed":
            phase.failures.append(failure_line(case))
    if returncode == NO_TESTS and not cases:
        return phase
    if returncode != 0 and not phase.failures:
        phase.problem = f"{exit_text} with no failed test in its XML (see .test-logs/)"
    elif returncode == 0 and phase.failures:
        phase.problem = "exit 0 but its XML lists failures"
    elif phase.failures:
        phase.problem = exit_text
    return phase


def counts_text(counts: Counter[str]) -> str:
    return f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"


def report(phases: list[Phase]) -> int:
    total: Counter[str] = Counter()
    for phase in phases:
        total.update(phase.counts)
        exit_text = phase.returncode_text or f"exit {phase.returncode}"
        print(f"{phase.name}: {counts_text(phase.counts)} ({exit_text})")
    for phase in phases:
        for line in phase.failures[:MAX_LISTED]:
            print(f"FAILED [{phase.name}] {line}")
        if len(phase.failures) > MAX_LISTED:
            print(f"FAILED [{phase.name}] ... and {len(phase.failures) - MAX_LISTED} more")
    bad = [phase for phase in phases if phase.problem]
    for phase in bad:
        print(f"PHASE FAILED: {phase.name}: {phase.problem}")
    print(counts_text(total))
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", nargs=3, action="append", required=True,
                        metavar=("NAME", "EXIT_CODE", "JUNIT_XML"))
    args = parser.parse_args(argv)
    return report([read_phase(name, int(code), Path(xml)) for name, code, xml in args.phase])


if __name__ == "__main__":
    sys.exit(main())
