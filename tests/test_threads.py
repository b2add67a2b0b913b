"""One shared model, many threads: results must be bit-identical to doing the same work in order.

A model is immutable and streams own their state, so N threads stepping their own streams must
not perturb each other in any way, with either kernel (``model.stream(kernel="serial" |
"parallel")``). The parallel kernel is entered from 8 threads at once, which is what aborts a
process under Numba's ``workqueue`` layer unless the runtime guards it (see lstm_cpu/kernels.py, parallel_guard).
The model is large enough (H=128, 2 layers) to be split into more than one chunk where the
machine has more than one thread, so the parallel kernel really runs in parallel.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from lstm_cpu.model import LSTMModel
from lstm_cpu.spec import LayerParams

N_THREADS = 8
STREAMS_PER_THREAD = 2
STEPS = 200
I, H, L = 16, 128, 2


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(7)
    layers = [[LayerParams(
        w_ih=rng.uniform(-0.3, 0.3, (4 * H, I if l == 0 else H)),  # (4H, in)
        w_hh=rng.uniform(-0.3, 0.3, (4 * H, H)),  # (4H, H)
        bias=rng.uniform(-0.3, 0.3, 4 * H),  # (4H,)
    )] for l in range(L)]
    return LSTMModel(layers, kernel="parallel")  # one column chunk per thread: really parallel


def _inputs(k):
    """Input of stream k: (STEPS, I) float32, different per stream."""
    return np.random.default_rng(1000 + k).standard_normal((STEPS, I)).astype(np.float32)


def _work(model, kernel, ks, batch=None):
    """Step the streams ks interleaved (as a thread would), return {k: (ys, h, c)}."""
    if batch is None:
        streams = {k: model.stream(kernel=kernel) for k in ks}
        xs = {k: _inputs(k) for k in ks}
        ys = {k: [] for k in ks}
        for t in range(STEPS):
            for k in ks:
                ys[k].append(streams[k].step(xs[k][t]))
        return {k: (np.stack(ys[k]),) + streams[k].state for k in ks}
    # One batched stream holding all of ks.
    s = model.stream(batch=len(ks), kernel=kernel)
    x = np.stack([_inputs(k) for k in ks], axis=1)  # (STEPS, N, I)
    ys = np.stack([s.step(x[t]) for t in range(STEPS)])  # (STEPS, N, out)
    h, c = s.state  # (L, N, out), (L, N, H)
    return {k: (ys[:, j], h[:, j], c[:, j]) for j, k in enumerate(ks)}


def _run_threads(fn, n):
    """Run fn(i) in n threads started together; re-raise the first exception."""
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def target(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def _assert_identical(got, want):
    for k in want:
        for a, b, name in zip(got[k], want[k], ("y", "h", "c")):
            np.testing.assert_array_equal(a, b, err_msg=f"stream {k}: {name} differs")


@pytest.mark.parametrize("kernel", ["serial", "parallel"])
def test_threads_stepping_own_streams_bit_identical(model, kernel):
    groups = [list(range(i * STREAMS_PER_THREAD, (i + 1) * STREAMS_PER_THREAD)) for i in range(N_THREADS)]
    want = {}
    for g in groups:
        want.update(_work(model, kernel, g))
    got = {}
    for r in _run_threads(lambda i: _work(model, kernel, groups[i]), N_THREADS):
        got.update(r)
    _assert_identical(got, want)


@pytest.mark.parametrize("kernel", ["serial", "parallel"])
def test_threads_batched_streams_bit_identical(model, kernel):
    groups = [list(range(i * 3, i * 3 + 3)) for i in range(N_THREADS)]
    want = {}
    for g in groups:
        want.update(_work(model, kernel, g, batch=True))
    got = {}
    for r in _run_threads(lambda i: _work(model, kernel, groups[i], batch=True), N_THREADS):
        got.update(r)
    _assert_identical(got, want)


def test_serial_and_parallel_kernels_agree(model):
    """Not bit-identity (the kernels may split work differently) but the same numbers."""
    a = _work(model, "serial", [0, 1])
    b = _work(model, "parallel", [0, 1])
    for k in a:
        for x, y in zip(a[k], b[k]):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel", ["serial", "parallel"])
def test_concurrent_model_run(model, kernel):
    xs = [np.random.default_rng(50 + i).standard_normal((60, 2, I)).astype(np.float32) for i in range(4)]
    want = [model.run(x, kernel=kernel) for x in xs]
    got = _run_threads(lambda i: model.run(xs[i], kernel=kernel), 4)
    for (yg, (hg, cg)), (yw, (hw, cw)) in zip(got, want):
        np.testing.assert_array_equal(yg, yw)
        np.testing.assert_array_equal(hg, hw)
        np.testing.assert_array_equal(cg, cw)


def test_streams_created_and_dropped_from_many_threads(model):
    """Churn: each thread repeatedly creates a stream, steps it a little, drops it."""
    steps = 20
    want = {k: _work_short(model, k, steps) for k in range(4)}

    def churn(i):
        out = []
        for rep in range(15):
            k = (i + rep) % 4
            kernel = "parallel" if rep % 2 else "serial"
            out.append((k, kernel, _work_short(model, k, steps, kernel)))
            if rep % 5 == 0:
                gc.collect()
        return out

    for res in _run_threads(churn, N_THREADS):
        for k, kernel, ys in res:
            np.testing.assert_allclose(ys, want[k], rtol=0, atol=1e-5, err_msg=f"{kernel} stream {k}")
    # Per kernel, the churned results are exactly the sequential ones.
    for kernel in ("serial", "parallel"):
        ref = _work_short(model, 0, steps, kernel)
        res = _run_threads(lambda i: _work_short(model, 0, steps, kernel), N_THREADS)
        for r in res:
            np.testing.assert_array_equal(r, ref)


def _work_short(model, k, steps, kernel="serial"):
    s = model.stream(kernel=kernel)
    x = _inputs(k)
    ys = np.stack([s.step(x[t]) for t in range(steps)])  # (steps, out)
    del s
    return ys


def test_parallel_kernel_from_threads_under_workqueue(tmp_path):
    """Numba's fallback layer aborts the process if two threads enter a parallel region at once;
    the runtime must serialise parallel calls there (lstm_cpu.kernels.parallel_guard)."""
    import os
    import subprocess
    import sys
    import textwrap

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = textwrap.dedent("""
        import threading, numpy as np
        import lstm_cpu
        from lstm_cpu.model import LSTMModel
        from lstm_cpu.spec import LayerParams
        rng = np.random.default_rng(0)
        H, I = 128, 8
        m = LSTMModel([[LayerParams(rng.uniform(-.2, .2, (4 * H, I)), rng.uniform(-.2, .2, (4 * H, H)))]])
        xs = [np.random.default_rng(k).standard_normal((50, I)).astype(np.float32) for k in range(6)]
        def work(k):
            s = m.stream(kernel="parallel")
            return np.stack([s.step(x) for x in xs[k]])
        want = [work(k) for k in range(6)]
        got = [None] * 6
        def t(k):
            got[k] = work(k)
            got[k] = (got[k], m.run(xs[k], kernel="parallel")[0])
        ts = [threading.Thread(target=t, args=(k,)) for k in range(6)]
        [x.start() for x in ts]; [x.join() for x in ts]
        assert lstm_cpu.threading_layer() == "workqueue", lstm_cpu.threading_layer()
        for k in range(6):
            assert np.array_equal(got[k][0], want[k])
            assert np.allclose(got[k][1], want[k], atol=1e-5)
        print("OK")
    """)
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("OK"), (
        f"rc={p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr[-3000:]}")
