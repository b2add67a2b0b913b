"""Probe: where a batched ``run`` step goes, per layer: input projection, recurrence, and inside
the recurrence the gate product and the cell update.

    python bench/run_parts_probe.py I H L B [T]        # e.g. 128 256 2 16

us per time step (best of 7), 1 thread, serial kernels. Run it once as is and once with the AVX2
proxy's environment (NUMBA_CPU_NAME=haswell ..., bench/results.md) to compare the two codes.
The product is timed alone in a compiled loop (alternating panel order, as the kernel does); the
cells likewise on random pre-activations: "seq" minus the two is the copies and the bias.
"""
import sys
import time

import numpy as np
from numba import njit

from lstm_cpu import LayerParams, LSTMModel, kernels


@njit
def _products(h, Wp, acc, k0, k1, T):
    for t in range(T):
        if t % 2:
            kernels._product_down(h, Wp, acc, 0, Wp.shape[0], k0, k1)
        else:
            kernels._product(h, Wp, acc, 0, Wp.shape[0], k0, k1)


@njit
def _cells(A3, C2, M2, half, T):
    for t in range(T):
        for s in range(A3.shape[0]):
            kernels._cells_rows(A3, C2, M2, s, half)


def main(I, H, L, B, T=200):
    rng = np.random.default_rng(0)
    layers = [[LayerParams(rng.normal(0, .1, (4 * H, I if l == 0 else H)),
                           rng.normal(0, .1, (4 * H, H)), rng.normal(0, .1, 4 * H))] for l in range(L)]
    m = LSTMModel(layers, kernel="serial")
    plan, wbuf, meta, fpar = m._plan, m._wbuf, m._meta, m._fpar
    C, Hp = plan.C, plan.Hp

    def best(f, n=7):
        t = float("inf")
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            t = min(t, time.perf_counter() - t0)
        return t / T * 1e6

    x = rng.normal(size=(T, B, I)).astype(np.float32)  # (T, B, I)
    print(f"({I},{H},{L}) B={B} T={T}: run {best(lambda: m.run(x)):.2f} us a step")
    inp = x
    for l in range(L):
        kin = plan.input_rows(l)
        X = np.ascontiguousarray(inp.reshape(T * B, kin))  # (T*B, kin)
        xp = np.empty((T, B, C), np.float32)  # (T, B, C)
        tp = best(lambda: kernels.input_projection_serial(X, wbuf, meta, l, 0, xp.reshape(T * B, C)))
        y = np.empty((T, B, H), np.float32)  # (T, B, H)
        lens = np.full(B, T, np.int64)
        h, c = np.zeros((B, H), np.float32), np.zeros((B, Hp), np.float32)
        acc, mb = np.empty((B, C), np.float32), np.empty((B, Hp), np.float32)
        ts = best(lambda: kernels.layer_sequence_serial(xp, 1, wbuf, meta, fpar, l, 0, lens, h, c, y, acc, mb))
        Wp = plan.gate_panels(wbuf, l, 0)  # (C/PANEL, K, PANEL)
        K = Wp.shape[1]
        tq = best(lambda: _products(h, Wp, acc, K - H, K, T), 5)
        A3 = rng.standard_normal((B, 4, Hp)).astype(np.float32)  # (B, 4, Hp)
        tc = best(lambda: _cells(A3, c, mb, np.float32(0.5), T), 5)
        print(f"  layer {l}: projection {tp:.2f}, recurrence {ts:.2f} (product {tq:.2f}, "
              f"cells {tc:.2f}, rest {ts - tq - tc:.2f})")
        inp = y


if __name__ == "__main__":
    main(*[int(v) for v in sys.argv[1:]])
