"""Per-step cost of a stream's step called from the user's own @numba.njit loop (issue 12, item 5).

    python bench/njit_pipeline.py [--size 32,64,1] [--steps 2000] [--rounds 15]

Three ways to step one stream T times, same inputs, validated bit for bit first, then timed in
interleaved rounds (best per step):
* ``step``: a Python loop of ``stream.step(x, out=y)`` (the hot path of the public API);
* ``run``: ``stream.run(xs)``, the chunk API (all T inputs known up front);
* ``njit``: a user's @njit loop calling ``lstm_cpu.kernels.stack_step_serial`` on
  ``stream.numba_args()``, with a feature step in front (a first difference) as in a pipeline.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numba  # noqa: E402

from lstm_cpu import LayerParams, LSTMModel  # noqa: E402
from lstm_cpu.kernels import stack_step_serial  # noqa: E402


@numba.njit
def pipeline(xs, wbuf, meta, fpar, sbuf, ys):
    """xs (T, I) raw samples -> ys (T, O); the feature is a first difference of the samples."""
    x = np.empty(xs.shape[1], xs.dtype)  # (I,)
    for t in range(xs.shape[0]):
        for i in range(x.shape[0]):
            x[i] = (xs[t, i] - xs[t - 1, i]) if t > 0 else xs[t, i]
        stack_step_serial(x, wbuf, meta, fpar, sbuf, ys[t])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="32,64,1", help="I,H,L")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    I, H, L = (int(v) for v in a.size.split(","))
    rng = np.random.default_rng(0)
    model = LSTMModel([[LayerParams(rng.uniform(-.2, .2, (4 * H, I if l == 0 else H)),
                                    rng.uniform(-.2, .2, (4 * H, H)), rng.uniform(-.2, .2, 4 * H))]
                       for l in range(L)], kernel="serial")
    T = a.steps
    raw = rng.standard_normal((T, I)).astype(np.float32)  # (T, I)
    feats = raw.copy()
    feats[1:] -= raw[:-1]  # (T, I) the same first difference, in numpy

    s = model.stream()
    out = np.empty((T, H), np.float32)

    def by_step():
        for t in range(T):
            s.step(feats[t], out=out[t])

    def by_run():
        out[:] = s.run(feats)

    def by_njit():
        pipeline(raw, *s.numba_args(), out)

    results = {}
    for name, fn in (("step", by_step), ("run", by_run), ("njit", by_njit)):
        s.reset()
        fn()
        results[name] = out.copy()
    assert np.array_equal(results["njit"], results["step"]), "njit pipeline differs from step()"
    assert np.array_equal(results["run"], results["step"]), "run() differs from step()"

    best = {}
    for _ in range(a.rounds):
        for name, fn in (("step", by_step), ("run", by_run), ("njit", by_njit)):
            s.reset()
            t0 = time.perf_counter()
            fn()
            best[name] = min(best.get(name, np.inf), (time.perf_counter() - t0) / T)
    print(f"# ({I},{H},{L}), {T} steps, 1 thread, best of {a.rounds} interleaved rounds, numba {numba.__version__}")
    print("| path | us per step | vs step() |")
    print("|---|---|---|")
    for name in ("step", "run", "njit"):
        print(f"| {name} | {best[name] * 1e6:.2f} | {best['step'] / best[name]:.2f}x |")


if __name__ == "__main__":
    main()
