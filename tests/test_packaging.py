"""Installed lstm-cpu works next to a user's own ``importers.py`` (issue 13, bug 1).

The repository folder ``importers/`` is installed as ``lstm_cpu.importers`` (pyproject's
package-dir), so nothing named ``importers`` lands in site-packages, and a script run from a
folder holding an ``importers.py`` (a common name in data pipelines) still loads models. Checked
for both installs a user can have, each in a child process whose working folder holds
``importers.py`` (which raises if imported) and the script:

* the environment's editable install (``pip install -e ".[test]"``, what .ci/run does: in CI the
  checkout under test);
* a regular wheel built from this checkout (``pip wheel``), installed with ``pip install
  --target`` and put first on ``PYTHONPATH``; numpy, numba and torch come from the environment.
  The wheel's file list must hold ``lstm_cpu/importers/`` and no top-level ``importers``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import onnx
import pytest

from onnx_helpers import lstm_model, onnx_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the tests' own checkout

# Run as a script from the folder holding importers.py, so that folder is sys.path[0].
SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    try:
        import importers
    except RuntimeError as e:  # the user's file is what a bare `import importers` finds
        assert str(e) == "user file", e
    else:
        raise AssertionError("the user's importers.py was not on the path: the check is void")
    import lstm_cpu
    import torch

    model = lstm_cpu.load("m.onnx")
    x = np.random.default_rng(0).standard_normal((4, model.input_size)).astype(np.float32)
    y, _ = model.run(x)
    assert y.shape == (4, model.output_size) and np.all(np.isfinite(y)), y
    m2 = lstm_cpu.from_torch(torch.nn.LSTM(3, 5))
    assert (m2.input_size, m2.hidden_size) == (3, 5)
    print("LSTM_CPU", os.path.realpath(lstm_cpu.__file__))
    print("IMPORTERS", os.path.realpath(sys.modules["lstm_cpu.importers"].__file__))
""")


@pytest.fixture
def user_folder(tmp_path):
    """A working folder with a user's importers.py, an ONNX LSTM model and the check script."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "importers.py").write_text('raise RuntimeError("user file")\n')
    (work / "check.py").write_text(SCRIPT)
    w = onnx_weights(np.random.default_rng(1), I=3, H=5)  # W (1, 20, 3), R (1, 20, 5), B (1, 40)
    onnx.save(lstm_model(w["W"], w["R"], w["B"]), str(work / "m.onnx"))
    return work


def _run_check(work, pythonpath=None):
    """Run check.py in ``work``; returns {"LSTM_CPU": path, "IMPORTERS": path}."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    p = subprocess.run([sys.executable, "check.py"], cwd=str(work), env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"stdout:\n{p.stdout}\nstderr:\n{p.stderr[-3000:]}"
    found = dict(line.split(" ", 1) for line in p.stdout.splitlines() if " " in line)
    for key in ("LSTM_CPU", "IMPORTERS"):
        assert not found[key].startswith(os.path.realpath(str(work))), found
    return found


def test_editable_install_next_to_a_user_importers_py(user_folder):
    found = _run_check(user_folder)
    # the installed lstm_cpu.importers is the repository folder importers/
    assert found["IMPORTERS"].endswith(os.path.join("importers", "__init__.py")), found


def _copy_checkout(dst):
    """The tracked sources of this checkout, without build products or local symlinks."""
    skip = {".git", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", "tmp"}

    def ignore(folder, names):
        return [n for n in names if n in skip or n.endswith(".egg-info")
                or os.path.islink(os.path.join(folder, n))]

    shutil.copytree(REPO, dst, ignore=ignore)


def test_wheel_install_next_to_a_user_importers_py(user_folder, tmp_path):
    src, wheels, site = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    _copy_checkout(src)  # building in place would write build/ and *.egg-info into the checkout
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = list(wheels.glob("lstm_cpu-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert not any(t == "importers" or t.startswith("importers.") for t in top), sorted(top)
    assert top <= {"lstm_cpu", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, top
    for mod in ("__init__", "onnx_lstm", "torch_lstm", "onnx_export"):
        assert f"lstm_cpu/importers/{mod}.py" in names, mod
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    found = _run_check(user_folder, pythonpath=str(site))
    site_real = os.path.realpath(str(site))
    assert found["LSTM_CPU"].startswith(site_real), found
    assert found["IMPORTERS"] == os.path.join(site_real, "lstm_cpu", "importers", "__init__.py"), found
