"""Probe: how fast one core reads a buffer of a given size (L1, L2, L3, memory).

    python bench/read_bandwidth_probe.py

GB/s (best of 5) of a vectorised float32 sum over buffers from 24 KB to 256 MB, read again and
again. These are the read floors quoted in bench/results.md: a `run` step at batch 1 must read
its recurrent weights once, so their size over the rate of the level they live in bounds the
step from below.
"""
import time

import numpy as np
from numba import njit


@njit(fastmath=True)
def _sum(a, n):
    s = np.float32(0)
    for _ in range(n):
        for i in range(a.shape[0]):
            s += a[i]
    return s


def main():
    for kb in (24, 512, 1024, 2048, 4096, 16384, 25 * 1024, 256 * 1024):
        a = np.random.default_rng(0).random(kb * 256, dtype=np.float32)  # (kb KB,)
        n = max(1, int(2e9 // a.nbytes))
        _sum(a, 1)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            _sum(a, n)
            best = min(best, time.perf_counter() - t0)
        print(f"{kb:8d} KB: {a.nbytes * n / best / 1e9:6.1f} GB/s")


if __name__ == "__main__":
    main()
