"""Probe: what a team wait costs, and one layer of ``model.run`` serial, as a team and split.

    python bench/team_probe.py [--sizes '32,64,1;128,256,2;512,1024,1'] [--batches 1,16]

Needs 2+ Numba threads. Prints µs per phase of the team protocol (two participants taking
turns at one task each), then, per size and batch, µs per time step of the last layer's
recurrence (T=200, projections given) with the serial kernel, the team
(``layer_sequence_parallel``) and stream groups (``layer_run_split``, projection included).
Figures in bench/results.md ("one parallel region per layer").
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from numba import njit, prange

from lstm_cpu import aligned, kernels, policy, team
from lstm_cpu.bench.models import embedded_model


@njit(parallel=True, nogil=True)
def _phases(sync, n, P):
    for p in prange(P):
        for k in range(n):
            for j in range(P):
                if team.claim(sync, 0, (p + j) % P, k):
                    team.finished(sync)
            team.wait_done(sync, (k + 1) * P)


def _median_us(fn, reps, per):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) / per * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32,64,1;128,256,2;512,1024,1")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    numba.set_num_threads(a.threads)
    n = 100_000
    s = team.new_sync(a.threads)
    _phases(s, 10, a.threads)
    s = team.new_sync(a.threads)
    t = time.perf_counter()
    _phases(s, n, a.threads)
    print(f"team wait: {(time.perf_counter() - t) / n * 1e6:.3f} us per phase, {a.threads} threads")
    T = 200
    for text in a.sizes.split(";"):
        size = tuple(int(v) for v in text.split(","))
        m = embedded_model(size)
        wbuf, meta, fpar, plan = m._wbuf, m._meta, m._fpar, m._plan
        C, Hp, out, l = plan.C, plan.Hp, m._out, m.num_layers - 1
        for B in (int(b) for b in a.batches.split(",")):
            rng = np.random.default_rng(1)
            xp = rng.standard_normal((T, B, C)).astype(np.float32)  # (T, B, C)
            X3 = rng.standard_normal((T, B, plan.input_rows(l))).astype(np.float32)
            lens = np.full(B, T, np.int64)

            def buf(*shape):
                return aligned.empty(int(np.prod(shape)), np.float32).reshape(shape)

            h, c, y, acc, mb = buf(B, out), buf(B, Hp), buf(T, B, out), buf(B, C), buf(B, Hp)
            h[...] = 0
            c[...] = 0
            shape = policy.sequence_team(B, a.threads, C, Hp)
            P, RA, RB = shape.args()
            row = {
                "serial": lambda: kernels.layer_sequence_serial(xp, 1, wbuf, meta, fpar, l, 0, lens, h, c,
                                                                y, acc, mb),
                "team": lambda: kernels.layer_sequence_parallel(
                    xp, P, RA, RB, wbuf, meta, fpar, l, 0, lens, h, c, y, acc, mb,
                    team.new_sync(shape.tasks(B, plan.P > 0))),
            }
            if B >= 2 * policy.SPLIT_MIN_STREAMS:
                row["split (with projection)"] = lambda: kernels.layer_run_split(
                    X3, a.threads, T, wbuf, meta, fpar, l, 0, lens, h, c, y, acc, mb)
            cells = ", ".join(f"{k} {_median_us(f, 10, T):.2f}" for k, f in row.items())
            print(f"{size} B={B}: {cells} us per step")


if __name__ == "__main__":
    main()
