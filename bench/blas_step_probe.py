"""Probe: batched streams of small models, the former BLAS step path against the Numba kernels.

    python bench/blas_step_probe.py [threads]

Until 2026-11-27, ``Stream`` stepped N >= 40 streams of a model under 1 MB with numpy BLAS
products and serial Numba cells. This probe keeps
that path (``blas_step`` below, the removed ``Stream._step_blas`` and its kernels) and times it
against the serial Numba kernel and, with 2+ threads, the split kernel
(``kernels.stack_step_split``), us per step, best of 5 x 200 steps. Figures: bench/results.md.
"""
import sys
import time

import numba
import numpy as np
from numba import njit

from lstm_cpu import kernels
from lstm_cpu import layout as lay
from lstm_cpu.bench.models import embedded_model

THREADS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
numba.set_num_threads(THREADS)
F = dict(nogil=True, fastmath={"contract"}, error_model="numpy")


@njit(**F)
def load_z(l, N, x, sbuf, meta):
    for s in range(N):
        kernels._load_z(l, s, x, sbuf, meta, N)


@njit(**F)
def cells(l, N, wbuf, meta, fpar, sbuf):
    """After acc (N, C) = z @ W (BLAS): bias (via _group_cells' acc), cells and h of layer l."""
    C = meta[lay.M_C]
    rec = lay.M_LD + l * lay.LD_STRIDE
    acc_off = kernels._sbuf_offsets(meta, N)[3]
    bias = wbuf[meta[rec + lay.LD_B] : meta[rec + lay.LD_B] + C]
    for s in range(N):
        a = sbuf[acc_off + s * C : acc_off + (s + 1) * C]
        for j in range(C):
            a[j] += bias[j]
    for g in range((N + 3) // 4):
        kernels._group_cells(g, 1, l, N, wbuf, meta, fpar, sbuf)
    for s in range(N):
        kernels._finish_layer(l, s, wbuf, meta, sbuf, N)


@njit(**F)
def emit(N, wbuf, meta, sbuf, y):
    for s in range(N):
        kernels._emit(s, wbuf, meta, sbuf, N, y)


def blas_step(m, N, sbuf):
    """The former BLAS path for N streams on ``sbuf``: a closure x (N*I,), y (N*O,) -> None."""
    plan, meta, wbuf, fpar = m._plan, m._meta, m._wbuf, m._fpar
    _h, _c, z_off, acc_off, _m, _e = (int(v) for v in lay.sbuf_offsets(meta, N))
    C = plan.C
    acc = sbuf[acc_off : acc_off + N * C].reshape(N, C)
    out = np.empty((C // lay.PANEL, N, lay.PANEL), np.float32)
    layers = [(sbuf[z_off : z_off + N * plan.record(l, 0).K].reshape(N, -1), plan.gate_panels(wbuf, l, 0))
              for l in range(plan.L)]

    def step(x, y):
        for l, (z, wp) in enumerate(layers):
            load_z(l, N, x, sbuf, meta)
            np.matmul(z, wp, out=out)  # (N, K) @ (n, K, PANEL) -> (n, N, PANEL)
            acc.reshape(N, -1, lay.PANEL)[...] = out.transpose(1, 0, 2)
            cells(l, N, wbuf, meta, fpar, sbuf)
        emit(N, wbuf, meta, sbuf, y)

    return step


for size in ((32, 64, 1), (64, 128, 1), (96, 160, 1)):
    m = embedded_model(size)
    for N in (40, 64, 128):
        res = {}
        x = np.random.default_rng(0).standard_normal(N * size[0]).astype(np.float32)
        for name in ("blas", "serial") + (("split",) if THREADS > 1 else ()):
            wbuf, meta, fpar, sbuf = m.stream(batch=N, kernel="serial").numba_args()
            y = np.empty(N * m.output_size, np.float32)
            if name == "blas":
                f = blas_step(m, N, sbuf)
                call = lambda: f(x, y)
            elif name == "serial":
                call = lambda: kernels.stack_step_serial(x, wbuf, meta, fpar, sbuf, y)
            else:
                call = lambda: kernels.stack_step_split(x, THREADS, wbuf, meta, fpar, sbuf, y)
            call()
            time.sleep(0.3)
            best = 1e9
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(200):
                    call()
                best = min(best, (time.perf_counter() - t) / 200)
            res[name] = best * 1e6
        print(size, f"{m.weight_bytes / 1e6:.2f} MB", N, " ".join(f"{k} {v:7.1f}" for k, v in res.items()))
