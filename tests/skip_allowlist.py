"""No silent passes: a run with a skip (or xfail) that is not allowed below fails.

The test extras (``pip install -e ".[test]"``, what .ci/run installs) hold every peer the suite
compares against, so with them installed the suite runs with zero skips. A skip therefore means
something is missing or broken (an uninstalled peer, a file that should be there, an exporter
that stopped working) and must not end in a green run. pytest reports skips, and xfails, as a
letter in the summary; this plugin turns each one that is not on :data:`ALLOWED` into a failed
run (exit status 1) and lists them at the end.

An entry allows a skip only when all three hold: the test's node id matches ``nodeid`` (fnmatch),
the skip's reason matches ``reason`` (a regex, searched), and ``when()`` is true on this machine.
Every entry says why the skip is legitimate. Collection-time skips (a module-level
``pytest.importorskip``) count too, under the module's node id.

tests/conftest.py imports the hooks; ``python -m pytest -p skip_allowlist`` (with tests/ on the
path) uses them elsewhere, which is how tests/test_skip_allowlist.py checks that they fire.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, List, Tuple

import pytest


@dataclass(frozen=True)
class Allowed:
    nodeid: str  # fnmatch pattern over the node id, e.g. "tests/test_x.py::test_y[*]"
    reason: str  # regex searched in the skip reason
    why: str  # why this skip is legitimate (for whoever reads or edits this list)
    when: Callable[[], bool] = lambda: True  # the skip is allowed only where this holds


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


ALLOWED: List[Allowed] = [
    # /proc is Linux's; /dev/zero and /dev/urandom exist on every POSIX system CI runs on.
    Allowed("tests/test_reliability.py::test_special_files_refused*", r"not present",
            "special files differ between operating systems; on Linux all three exist",
            when=lambda: not sys.platform.startswith("linux")),
    # ray is an optional peer of the serving example, not a test extra everyone installs; CI
    # installs it (and sets CI), so there its tests must run.
    Allowed("*", r"\bray\b",
            "ray is heavy and optional for local runs; CI installs it, so CI never skips these",
            when=lambda: _missing("ray") and not os.environ.get("CI")),
]

# Skips and xfails seen in this run: (node id, reason).
_seen: List[Tuple[str, str]] = []


def _reason(report) -> str:
    if hasattr(report, "wasxfail"):
        return "xfail: " + str(report.wasxfail)
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2])
    return str(longrepr)


def _note(report) -> None:
    if report.skipped:  # an xfail's report is "skipped" too, with ``wasxfail`` set
        _seen.append((report.nodeid, _reason(report)))


def pytest_runtest_logreport(report):
    _note(report)


def pytest_collectreport(report):
    _note(report)


def is_allowed(nodeid: str, reason: str) -> bool:
    return any(fnmatch.fnmatchcase(nodeid, a.nodeid) and re.search(a.reason, reason) and a.when()
               for a in ALLOWED)


def unallowed_skips() -> List[Tuple[str, str]]:
    return [(n, r) for n, r in _seen if not is_allowed(n, r)]


def pytest_terminal_summary(terminalreporter):
    bad = unallowed_skips()
    if bad:
        terminalreporter.section("skips not on tests/skip_allowlist.py: the run fails", red=True)
        for nodeid, reason in bad:
            terminalreporter.line(f"{nodeid}: {reason}")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    # NO_TESTS_COLLECTED: every module was skipped at collection, which is no pass either.
    if exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED) and unallowed_skips():
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
