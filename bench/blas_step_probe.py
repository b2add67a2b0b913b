"""Probe: batched streams of small models, the BLAS step path against the Numba kernels.

    python bench/blas_step_probe.py [threads]

For models under policy.BLAS_MAX_WEIGHT_BYTES and N >= policy.BLAS_MIN_BATCH streams, ``Stream``
steps with numpy BLAS products and serial Numba cells (policy.choose_kernel). This times that
path against the serial Numba kernel and, with 2+ threads, the split kernel
(``kernels.stack_step_split``), us per step, best of 5 x 200 steps. Figures: bench/results.md.
"""
import sys
import time

import numba
import numpy as np

from lstm_cpu import kernels
from lstm_cpu.bench.models import embedded_model

THREADS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
numba.set_num_threads(THREADS)
for size in ((32, 64, 1), (64, 128, 1), (96, 160, 1)):
    m = embedded_model(size)
    for N in (40, 64, 128):
        res = {}
        x = np.random.default_rng(0).standard_normal((N, size[0])).astype(np.float32)
        for name in ("blas", "serial") + (("split",) if THREADS > 1 else ()):
            s = m.stream(batch=N, kernel="parallel")
            if name == "split":
                wbuf, meta, fpar, sbuf = s.numba_args()
                xf = x.reshape(-1); y = np.empty(N * m.output_size, np.float32)
                call = lambda: kernels.stack_step_split(xf, THREADS, wbuf, meta, fpar, sbuf, y)
            elif name == "serial":
                wbuf, meta, fpar, sbuf = s.numba_args()
                xf = x.reshape(-1); y = np.empty(N * m.output_size, np.float32)
                call = lambda: kernels.stack_step_serial(xf, wbuf, meta, fpar, sbuf, y)
            else:
                assert s.kernel == "blas", s.kernel
                call = lambda: s.step(x)
            call(); time.sleep(0.3)
            b = 1e9
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(200): call()
                b = min(b, (time.perf_counter() - t) / 200)
            res[name] = b * 1e6
        print(size, f"{m.weight_bytes/1e6:.2f} MB", N, " ".join(f"{k} {v:7.1f}" for k, v in res.items()))
