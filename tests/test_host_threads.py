"""No side effects on the host process: the thread counts the application set stay as it set them.

An application that embeds lstm-cpu sets torch, numpy's OpenBLAS and OpenMP to some number of
threads; importing lstm-cpu, loading a model and running it (serial and parallel kernels, chunk
runs, batched streams on both the Numba and the BLAS path, whole sequences) must leave all three
as they were, while lstm-cpu's own parallel kernels still use the threads it was asked for
(Numba's count, here set with NUMBA_NUM_THREADS).

Numba's omp threading layer and torch share one libgomp, and Numba's start-up calls
``omp_set_num_threads`` and ``omp_set_nested`` (see lstm_cpu/_threads.py), so each case runs in a
fresh interpreter: the start-up happens once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Readers and setters of the three counts, through ctypes. OpenBLAS: the copy numpy bundles (its
# symbols carry a scipy_ prefix and a 64_ suffix in numpy 2 wheels). OpenMP: the libgomp that
# Numba's omp layer binds to (omppool is loaded RTLD_LOCAL, so the global scope, where torch puts
# its libgomp, is searched first, then omppool's own dependencies).
HELPERS = textwrap.dedent("""
    import ctypes, os, sys
    import numpy as np

    def _numpy_openblas():
        paths = sorted({line.split()[-1] for line in open("/proc/self/maps")
                        if "openblas" in line.lower() and ".so" in line})
        assert paths, "numpy's OpenBLAS is not loaded"
        for p in paths:
            lib = ctypes.CDLL(p)
            for pre, suf in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"),
                             ("openblas", "")):
                try:
                    get = getattr(lib, pre + "_get_num_threads" + suf)
                    put = getattr(lib, pre + "_set_num_threads" + suf)
                except AttributeError:
                    continue
                get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, put
        raise AssertionError(f"no openblas_get_num_threads in {paths}")

    def _numba_libgomp():
        from numba.np.ufunc import omppool
        for handle in (None, omppool.__file__):
            lib = ctypes.CDLL(handle)
            if hasattr(lib, "omp_get_max_threads"):
                lib.omp_get_max_threads.restype = ctypes.c_int
                lib.omp_get_max_active_levels.restype = ctypes.c_int
                return lib
        raise AssertionError("no libgomp found for Numba's omp layer")

    np.ones((64, 64)) @ np.ones((64, 64))  # make sure OpenBLAS is initialised
    BLAS_GET, BLAS_SET = _numpy_openblas()
    OMP = _numba_libgomp()

    def counts():
        out = {"openblas": BLAS_GET(), "omp_max_threads": OMP.omp_get_max_threads(),
               "omp_max_active_levels": OMP.omp_get_max_active_levels()}
        if "torch" in sys.modules:
            out["torch"] = sys.modules["torch"].get_num_threads()
        return out
""")

# Everything a user does with lstm-cpu, every kernel family once. FIRST is the first thing that
# can start Numba's threading layer (each is a different path into it).
WORKLOAD = textwrap.dedent("""
    import tempfile
    import lstm_cpu
    from lstm_cpu import LSTMModel, LayerParams

    rng = np.random.default_rng(0)
    I, H, L = 16, 64, 2
    layers = [[LayerParams(rng.uniform(-.3, .3, (4 * H, I if l == 0 else H)),
                           rng.uniform(-.3, .3, (4 * H, H)), rng.uniform(-.3, .3, 4 * H))]
              for l in range(L)]
    x0 = np.zeros((3, I), np.float32)
    if FIRST == "parallel stream":  # a one-chunk model, no thread count read before the kernel
        LSTMModel(layers, kernel="serial").stream(kernel="parallel").step(x0[0])
    elif FIRST == "parallel run":
        LSTMModel(layers, kernel="serial").run(x0, kernel="parallel")
    elif FIRST == "threading_layer":
        lstm_cpu.threading_layer()
    built = LSTMModel(layers, kernel="parallel")  # one column chunk per Numba thread
    with tempfile.TemporaryDirectory() as d:
        built.save(os.path.join(d, "m.lstm"))
        model = lstm_cpu.load(os.path.join(d, "m.lstm"))
    xs = rng.standard_normal((20, 64, I)).astype(np.float32)  # (T, streams, I)
    ys = {}
    for kernel in ("serial", "parallel"):
        s = model.stream(kernel=kernel)
        ys[kernel] = np.stack([s.step(x) for x in xs[:, 0]])  # (T, H)
        s.run(xs[:, 0])
        for batch in (8, 64):  # 64: the BLAS path of batched streams
            sb = model.stream(batch=batch, kernel=kernel)
            sb.step(xs[0, :batch])
            sb.run(xs[:, :batch])
        model.run(xs[:, 0], kernel=kernel)
        model.run(xs[:, :16], kernel=kernel)
        model.run(xs[:, :64], kernel=kernel)  # the BLAS path of batched sequences
    assert np.allclose(ys["serial"], ys["parallel"], atol=1e-5), "kernels disagree"
    assert lstm_cpu.threading_layer() == "omp", lstm_cpu.threading_layer()
""")

# Numba's team really has the asked-for size after all this: a prange over as many iterations as
# threads sees each thread id once (static schedule, dynamic adjustment off).
TEAM = textwrap.dedent("""
    import numba

    @numba.njit(parallel=True)
    def team_ids(n):
        ids = np.full(n, -1, np.int64)
        for i in numba.prange(n):
            ids[i] = numba.get_thread_id()
        return ids

    assert numba.get_num_threads() == ASKED, (numba.get_num_threads(), ASKED)
    assert sorted(set(team_ids(ASKED).tolist())) == list(range(ASKED)), team_ids(ASKED)
""")


def _run(script, env_extra, tmp_path):
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0 and p.stdout.strip().endswith("OK"), (
        f"rc={p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr[-4000:]}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps and libgomp")
@pytest.mark.parametrize("host, asked, first", [
    # the application pinned everything to 1 thread; lstm-cpu may use 2
    (1, 2, "parallel model"),
    (1, 2, "parallel stream"),
    (1, 2, "parallel run"),
    (1, 2, "threading_layer"),
    pytest.param(2, 1, "parallel model", marks=pytest.mark.skipif(
        (os.cpu_count() or 1) < 2, reason="OpenBLAS clamps its count to the cores it found")),
])
def test_counts_set_through_torch_survive(tmp_path, host, asked, first):
    """torch loaded first (its libgomp is the one Numba binds to): torch.set_num_threads(host),
    openblas_set_num_threads(host); lstm-cpu asked for `asked` threads."""
    script = "import torch\n" + HELPERS + textwrap.dedent(f"""
        torch.set_num_threads({host})
        BLAS_SET({host})
        ASKED = {asked}
        FIRST = {first!r}
        before = counts()
        assert before["torch"] == before["omp_max_threads"] == before["openblas"] == {host}, before
    """) + WORKLOAD + textwrap.dedent("""
        after = counts()
        assert after == before, f"host thread settings changed: before {before}, after {after}"
    """) + TEAM + textwrap.dedent("""
        assert counts() == before, (counts(), before)
        print("OK")
    """)
    _run(script, {"NUMBA_NUM_THREADS": str(asked)}, tmp_path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps and libgomp")
def test_omp_num_threads_env_survives_for_a_later_torch(tmp_path):
    """No torch at first: the application sets OpenMP through OMP_NUM_THREADS=1 and OpenBLAS to 1,
    uses lstm-cpu, then imports torch, which must still see 1 thread."""
    script = HELPERS + textwrap.dedent("""
        BLAS_SET(1)
        ASKED = 2
        FIRST = "parallel model"
        before = counts()
        assert before["omp_max_threads"] == before["openblas"] == 1, before
    """) + WORKLOAD + textwrap.dedent("""
        after = counts()
        assert after == before, f"host thread settings changed: before {before}, after {after}"
        import torch
        assert torch.get_num_threads() == 1, torch.get_num_threads()
    """) + TEAM + textwrap.dedent("""
        assert torch.get_num_threads() == 1, torch.get_num_threads()
        print("OK")
    """)
    _run(script, {"NUMBA_NUM_THREADS": "2", "OMP_NUM_THREADS": "1"}, tmp_path)
