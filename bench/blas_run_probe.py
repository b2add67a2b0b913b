"""Probe: ``model.run`` of 40+ sequences of small models, BLAS products against the Numba kernels.

    python bench/blas_run_probe.py THREADS

``policy.choose_kernel`` gives ``run`` of B >= BLAS_MIN_BATCH sequences of a model under
BLAS_MAX_WEIGHT_BYTES numpy BLAS recurrent products with serial Numba cells ("auto(blas)").
The Numba rows raise BLAS_MIN_BATCH for their call so the same ``run`` takes the Numba kernels
(serial, or parallel: the split kernel from 4 sequences a thread). us per time step, T=100,
best of 5. Figures: bench/results.md.
"""
import sys
import time

import numba
import numpy as np

from lstm_cpu import policy
from lstm_cpu.bench.models import embedded_model

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
numba.set_num_threads(threads)
for size in ((32, 64, 1), (64, 128, 1), (96, 160, 1)):
    m = embedded_model(size)
    for B in (40, 64):
        T = 100
        x = np.random.default_rng(0).standard_normal((T, B, size[0])).astype(np.float32)
        res = {}
        for name in ("auto(blas)", "serial-numba", "parallel-numba"):
            if name == "auto(blas)":
                f = lambda: m.run(x)
            else:
                kern = name.split("-")[0]
                f = lambda kern=kern: m.run(x, kernel=kern)
            if name != "auto(blas)":
                policy.BLAS_MIN_BATCH = 10**9
            f(); time.sleep(0.3)
            best = 1e9
            for _ in range(5):
                t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t)
            policy.BLAS_MIN_BATCH = 40
            res[name] = best / T * 1e6
        print(size, B, " ".join(f"{k} {v:7.1f}" for k, v in res.items()))
