"""Probe: a 4 x 24 block plan for 3, 4, 7 and 8 streams in AVX2 code (not adopted).

    NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES="+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt,+sse4.2" \
        NUMBA_CACHE_DIR=/tmp/probe-cache python bench/v8_small_blocks_probe.py

With 8-lane blocks (``kernels._make_v8_panel``), 3, 4, 7 and 8 streams run in 16-column strips of
3- and 4-stream blocks: 6-8 accumulators, no more than FMA latency x throughput. The alternative
timed here: two 24-column strips of 3 x 24 / 4 x 24 blocks (9-12 accumulators) and one
16-column strip, the same bits (checked). GFLOP/s, medians of 21 interleaved timings.

Zen 4 host, Haswell code, 2026-11-27, two runs, 16-column strips / 24-column plan, at (K, panels)
= (256, 16), (96, 4), (1024, 64):
N=3 60-62 / 63-66, 81-84 / 81-90, 44-45 / 46-47; N=4 79-80 / 78-84, 96-102 / 95-104, 67-82 /
64-74; N=7 78 / 78-80, 92-95 / 95-101, 58-80 / 58-72; N=8 84 / 85-88, 99-101 / 104-109, 67-86 /
64-83. From -2% to +9% where the weights sit in L2, 0 to -10% from L3: not adopted. (Single,
non-interleaved runs had suggested +10-25%; the machine's noise is that large.)
"""
import time

import numpy as np
from numba import njit

from lstm_cpu import kernels

PANEL = kernels.PANEL
V = kernels._make_vblock


def _strips(NV, width):
    """The product over panels for 3, 4, 7 or 8 streams, blocks of NV vectors in strips
    starting at 0, width, 2*width ... up to 48, then one 16-column strip at 48 if needed."""
    f4, b4, f3, b3 = V(4, NV, False, True), V(4, NV, False), V(3, NV, False, True), V(3, NV, False)
    g4, c4, g3, c3 = V(4, 2, False, True), V(4, 2, False), V(3, 2, False, True), V(3, 2, False)

    @njit
    def prod(Z, Wp, A, n):
        N, K = Z.shape[0], Wp.shape[1]
        nb = 1 if N <= 4 else 2
        for _ in range(n):
            for p in range(Wp.shape[0]):
                c0 = p * PANEL
                for j0 in range(0, 48 if width == 24 else PANEL, width):
                    for b in range(nb):
                        s = N * b // nb
                        r = N * (b + 1) // nb - s
                        if b == 0:
                            if r == 4:
                                f4(Z, s, Wp, p, 0, K, A, c0, j0, A)
                            else:
                                f3(Z, s, Wp, p, 0, K, A, c0, j0, A)
                        elif r == 4:
                            b4(Z, s, Wp, p, 0, K, A, c0, j0, A)
                        else:
                            b3(Z, s, Wp, p, 0, K, A, c0, j0, A)
                if width == 24:
                    for b in range(nb):
                        s = N * b // nb
                        r = N * (b + 1) // nb - s
                        if b == 0:
                            if r == 4:
                                g4(Z, s, Wp, p, 0, K, A, c0, 48, A)
                            else:
                                g3(Z, s, Wp, p, 0, K, A, c0, 48, A)
                        elif r == 4:
                            c4(Z, s, Wp, p, 0, K, A, c0, 48, A)
                        else:
                            c3(Z, s, Wp, p, 0, K, A, c0, 48, A)
    return prod


def main():
    rng = np.random.default_rng(0)
    plans = {"16-column strips": _strips(2, 16), "24-column plan": _strips(3, 24)}
    for N in (3, 4, 7, 8):
        for K, npan in ((256, 16), (96, 4), (1024, 64)):
            Z = rng.random((N, K), dtype=np.float32)  # (N, K)
            Wp = rng.random((npan, K, PANEL), dtype=np.float32)  # (panels, K, PANEL)
            outs = {k: np.zeros((N, npan * PANEL), np.float32) for k in plans}
            for k, f in plans.items():
                f(Z, Wp, outs[k], 1)
            a, b = outs.values()
            assert np.array_equal(a, b), "both plans must give the same bits"
            flops = 2 * N * K * npan * PANEL
            n = max(1, int(3e8 // flops))
            rates = {k: [] for k in plans}
            for _ in range(21):
                for k, f in plans.items():
                    t0 = time.perf_counter()
                    f(Z, Wp, outs[k], n)
                    rates[k].append(flops * n / (time.perf_counter() - t0) / 1e9)
            print(f"N={N} (K, panels)=({K}, {npan}):",
                  ", ".join(f"{k} {np.median(v):.1f}" for k, v in rates.items()), "GFLOP/s")


if __name__ == "__main__":
    main()
