"""Probe: the gate products with their weights on a 64-byte boundary and 16 / 48 bytes past one
(where numpy's malloc used to put them), 1 thread, in a compiled loop (no call overhead).

    NUMBA_NUM_THREADS=1 python bench/align_probe.py

Prints µs per product for the int8 x 16-bit product (``kernels_quant.i8a16_vnni``, the int8
step's) and the float32 panel product (``kernels._product``) at 1 and 16 streams. The decision
it supports is in lstm_cpu/aligned.py; the figures are in bench/results.md.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from numba import njit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lstm_cpu import kernels as K0  # noqa: E402
from lstm_cpu import kernels_quant as KQ  # noqa: E402
from lstm_cpu.aligned import WEIGHT_ALIGN  # noqa: E402


def placed(a, off):
    """A copy of ``a`` whose first byte is ``off`` bytes past a 64-byte boundary."""
    buf = np.empty(a.nbytes + 2 * WEIGHT_ALIGN, np.uint8)
    o = (-buf.ctypes.data) % WEIGHT_ALIGN + off
    out = buf[o : o + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


@njit(cache=False)
def int8_products(n, Wq4, zhi, zlo, qrows, ihi, ilo):
    for _ in range(n):
        KQ.i8a16_vnni(Wq4, zhi, zlo, qrows, 0, Wq4.shape[0], ihi, ilo)


@njit(cache=False)
def fp32_products(n, z, Wp, acc):
    for _ in range(n):
        K0._product(z, Wp, acc, 0, Wp.shape[0], 0, Wp.shape[1])


def best(f, rounds=7):
    t = 1e9
    for _ in range(rounds):
        t0 = time.perf_counter()
        f()
        t = min(t, time.perf_counter() - t0)
    return t


def main():
    rng = np.random.default_rng(0)
    offs = (0, 16, 48)
    have_vnni = KQ.has_vnni512()
    print("| product | (K, C) | streams | " + " | ".join(f"+{o} B, µs" for o in offs) + " |")
    print("|---|---|---|" + "---|" * len(offs))
    if have_vnni:
        for K, C in [(96, 256), (384, 1024), (768, 2048), (1024, 2048), (1536, 4096)]:
            W = rng.integers(-127, 128, size=(C // 16, K // 4, 64), dtype=np.int8)
            zhi = rng.integers(0, 256, size=K, dtype=np.uint8)
            zlo = rng.integers(0, 256, size=K, dtype=np.uint8)
            q = np.array([0, K // 4])
            ihi = np.zeros((1, C), np.int32)
            ilo = np.zeros((1, C), np.int32)
            n = max(10, int(3e8 / (K * C)))
            row = []
            for off in offs:
                Wa = placed(W, off)
                int8_products(1, Wa, zhi, zlo, q, ihi, ilo)
                row.append(best(lambda: int8_products(n, Wa, zhi, zlo, q, ihi, ilo)) / n * 1e6)
            print(f"| int8 x 16-bit | ({K}, {C}) | 1 | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    for K, C, N in [(64, 256, 1), (96, 256, 1), (384, 1024, 1), (1536, 4096, 1), (96, 256, 16), (384, 1024, 16)]:
        W = rng.standard_normal((C // 64, K, 64)).astype(np.float32)
        z = rng.standard_normal((N, K)).astype(np.float32)
        acc = np.zeros((N, C), np.float32)
        n = max(10, int(3e8 / (K * C * N)))
        row = []
        for off in offs:
            Wa = placed(W, off)
            fp32_products(1, z, Wa, acc)
            row.append(best(lambda: fp32_products(n, z, Wa, acc)) / n * 1e6)
        print(f"| float32 panels | ({K}, {C}) | {N} | " + " | ".join(f"{v:.2f}" for v in row) + " |")


if __name__ == "__main__":
    main()
