"""Probe: reduced-precision batched streams and whole sequences vs float32 (issue 11).

Side by side in one process, 1 thread (set NUMBA_NUM_THREADS=1), interleaved rounds: one block
of calls per (format, case) per round, the order rotating; the p50 of the per-block means.
Cases: a lone step, ``stream(batch=16)`` and ``stream(batch=64)`` steps, ``model.run`` T=200 at
batch 1 and 16. Every reduced case is first checked against the float32 model (max abs
difference printed) before it is timed.

    NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python bench/quant_batched.py [--sizes 128,256,2 ...] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lstm_cpu  # noqa: E402
from lstm_cpu import LayerParams, LSTMModel  # noqa: E402

FORMATS = ("float32", "int8", "bfloat16")


def layers(I, H, L, seed=0):
    rng = np.random.default_rng(seed)
    s = 1 / np.sqrt(H)
    return [[LayerParams(rng.uniform(-s, s, (4 * H, I if l == 0 else H)), rng.uniform(-s, s, (4 * H, H)),
                         rng.uniform(-s, s, 4 * H))] for l in range(L)]


def cases(model, I, T=200):
    rng = np.random.default_rng(1)
    out = {}
    for N in (None, 16, 64):
        st = model.stream(batch=N)
        x = rng.standard_normal((I,) if N is None else (N, I)).astype(np.float32)
        y = np.empty((model.output_size,) if N is None else (N, model.output_size), np.float32)
        out[f"step b={N or 1}"] = (lambda st=st, x=x, y=y: st.step(x, out=y), 20 if N is None else 5, 1)
    for B in (1, 16):
        xs = rng.standard_normal((T, B, I)).astype(np.float32)
        out[f"run T={T} b={B}"] = (lambda xs=xs: model.run(xs), 1, T)
    return out


def check(models, I):
    xs = np.random.default_rng(2).standard_normal((50, 4, I)).astype(np.float32)
    ref = models["float32"].run(xs)[0]
    return {w: float(np.abs(m.run(xs)[0] - ref).max()) for w, m in models.items() if w != "float32"}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="*", default=["128,256,2", "256,512,2"])
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    import numba

    print(f"numba threads {numba.get_num_threads()}; load {os.getloadavg()}")
    for size in a.sizes:
        I, H, L = map(int, size.split(","))
        models = {w: LSTMModel(layers(I, H, L), weights=w) for w in FORMATS}
        print(f"\n({I}, {H}, {L}) weight bytes", {w: m.weight_bytes for w, m in models.items()},
              "max |reduced - fp32| over 50 steps", check(models, I))
        cs = {w: cases(m, I) for w, m in models.items()}
        for w in FORMATS:  # warm up (compile, caches)
            for fn, reps, _ in cs[w].values():
                fn()
        times = {(w, c): [] for w in FORMATS for c in cs[w]}
        for r in range(a.rounds):
            for c in cs["float32"]:
                order = FORMATS[r % 3:] + FORMATS[:r % 3]
                for w in order:
                    fn, reps, steps = cs[w][c]
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    times[(w, c)].append((time.perf_counter() - t0) / reps / steps)
        print(f"| case | fp32 us | int8 us (x fp32) | bf16 us (x fp32) |")
        for c in cs["float32"]:
            f = np.median(times[("float32", c)]) * 1e6
            i8 = np.median(times[("int8", c)]) * 1e6
            b = np.median(times[("bfloat16", c)]) * 1e6
            per = " (per step)" if c.startswith("run") else ""
            print(f"| {c}{per} | {f:.0f} | {i8:.0f} ({f / i8:.2f}x) | {b:.0f} ({f / b:.2f}x) |")


if __name__ == "__main__":
    main()
