"""The skip allowlist (tests/skip_allowlist.py) can fail a run: each kind of skip, in a child pytest.

Each case is a tiny test folder run by ``python -m pytest -p skip_allowlist`` in a subprocess (the
plugin's record of skips is per process), and the exit status is what CI sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import skip_allowlist

_HERE = os.path.dirname(os.path.abspath(__file__))

CASES = {
    # name: (test file, expected exit status)
    "plain pass": ("def test_ok():\n    pass\n", 0),
    "runtime skip": ("import pytest\ndef test_ok():\n    pass\n"
                     "def test_s():\n    pytest.skip('peer missing')\n", 1),
    "skip marker": ("import pytest\n@pytest.mark.skip(reason='later')\ndef test_s():\n    pass\n", 1),
    "xfail": ("import pytest\n@pytest.mark.xfail(reason='known bug')\ndef test_x():\n    assert 0\n", 1),
    "module importorskip": ("import pytest\npytest.importorskip('no_such_module_lstm_cpu')\n"
                            "def test_never():\n    pass\n", 1),
    # allowed by the entry the folder's conftest adds: node id and reason both match
    "allowed skip": ("import pytest\ndef test_allowed():\n    pytest.skip('legit reason')\n", 0),
    # the same reason on another test is not allowed
    "reason elsewhere": ("import pytest\ndef test_other():\n    pytest.skip('legit reason')\n", 1),
}

CONFTEST = textwrap.dedent("""
    import skip_allowlist
    skip_allowlist.ALLOWED.append(skip_allowlist.Allowed(
        "*::test_allowed", r"legit", "a self-test entry"))
""")


@pytest.mark.parametrize("name", list(CASES))
def test_unallowed_skips_fail_the_run(tmp_path, name):
    body, want = CASES[name]
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_case.py").write_text(body)
    env = dict(os.environ, PYTHONPATH=_HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "skip_allowlist",
                        "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == want, f"{name}: exit {p.returncode}, expected {want}\n{p.stdout[-2000:]}"
    assert ("skips not on tests/skip_allowlist.py" in p.stdout) == (want != 0), p.stdout[-2000:]


def test_every_entry_says_why():
    for a in skip_allowlist.ALLOWED:
        assert a.nodeid and a.reason and len(a.why) > 20, a
