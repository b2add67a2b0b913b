"""Numba's on-disk cache when the package directory cannot be written (issue 5, target 8).

A deployed package often lives in a read-only location. Numba then falls back to a per-user cache
directory (``$XDG_CACHE_HOME/numba``), and ``NUMBA_CACHE_DIR`` overrides both. CI runs as root,
which ignores permission bits, so the package's cache directory is made unusable by a regular
*file* named ``__pycache__`` in a copy of the package: no one can create the directory then.
Each check runs in a fresh process and reads Numba's own cache statistics.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lstm_cpu

_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
t0 = time.perf_counter()
import numpy as np
import lstm_cpu
from lstm_cpu import LayerParams, LSTMModel, kernels
rng = np.random.default_rng(0)
H, I = 16, 4
m = LSTMModel([[LayerParams(rng.normal(size=(4 * H, I)), rng.normal(size=(4 * H, H)), rng.normal(size=4 * H))]])
s = m.stream(kernel="serial")
y = s.step(np.ones(I, np.float32))
st = kernels.stack_step_serial.stats
print(json.dumps({"file": lstm_cpu.__file__, "hits": sum(st.cache_hits.values()),
                  "misses": sum(st.cache_misses.values()), "path": st.cache_path,
                  "y0": float(y[0]), "seconds": time.perf_counter() - t0}))
"""


@pytest.fixture(scope="module")
def readonly_pkg(tmp_path_factory):
    root = tmp_path_factory.mktemp("ro_pkg")
    src = Path(lstm_cpu.__file__).parent
    shutil.copytree(src, root / "lstm_cpu", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "lstm_cpu" / "__pycache__").write_text("not a directory: the package cache is unusable\n")
    return root


def _run(pkg_root, env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_") and k != "LSTM_CPU_NO_CACHE"}
    env.update(env_extra, PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(pkg_root)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["file"].startswith(str(pkg_root)), res  # the copy, not the installed package
    return res


def test_user_cache_dir_fallback_when_package_dir_is_unwritable(readonly_pkg, tmp_path):
    xdg = tmp_path / "xdg"
    first = _run(readonly_pkg, {"XDG_CACHE_HOME": str(xdg)})
    assert first["misses"] >= 1 and first["hits"] == 0, first  # compiled...
    assert first["path"].startswith(str(xdg)), first  # ...and cached under the user's cache dir
    assert any(xdg.rglob("*.nbi")), "no Numba index file written in the user cache"
    second = _run(readonly_pkg, {"XDG_CACHE_HOME": str(xdg)})
    assert second["hits"] >= 1 and second["misses"] == 0, second  # loaded, not recompiled
    assert second["y0"] == first["y0"]


def test_numba_cache_dir_overrides(readonly_pkg, tmp_path):
    nc = tmp_path / "numba_cache"
    res = _run(readonly_pkg, {"NUMBA_CACHE_DIR": str(nc), "XDG_CACHE_HOME": str(tmp_path / "unused")})
    assert res["path"].startswith(str(nc)), res
    assert any(nc.rglob("*.nbi")) and not (tmp_path / "unused").exists()
