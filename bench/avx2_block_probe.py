"""Probe: register blocks of the batched gate product for AVX2 code (16 ymm registers).

    NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES="+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt,+sse4.2" \
        NUMBA_CACHE_DIR=/tmp/probe-cache python bench/avx2_block_probe.py

The shipped AVX2 block is a whole panel x 2 streams (16 ymm accumulators: every register, so
the weights and broadcasts spill). Measured on the Zen 4 host with Haswell code, GFLOP/s at
(K, C) = (256, 1024), N = 12 / 16 / 24 streams: 64x2 59.7 each; half-panel blocks 32x2 / 32x3
/ 32x4 5.5-6.1, ten times slower, for a reason not found yet (the same as the earlier "half-panel
chains ran at 5-9 GFLOP/s"). bench/results.md, "AVX2 code", has what this costs `run`.

Clue: run without the environment variables (AVX-512 code), 64x2 runs at 106 GFLOP/s and the
32-wide blocks at 4.7-6.5, a 32x2 block alone (j0 = 0, no second half) at 4.7: so it is not the
ISA, nor the offset into the panel, but the 32-column loop. A guess to test: LLVM unrolls a
32-trip loop fully before the loop vectoriser sees it, and the SLP vectoriser then fails on the
stack accumulators (the 64-trip loop is vectorised first and promoted to registers). Explicit
vectors would settle it: kernels_quant's VecType ops exist for 8 and 16 lanes.

**Settled, and the way out** (the second half of this file): the same product written with
explicit 8-lane vectors (kernels_quant's ``fma_f``/``bcast_ld_f``/``store_f`` and a float32
vector load), Haswell code on the Zen 4 host, GFLOP/s at (256, 1024): 6 streams x 16 columns
(12 ymm accumulators, MLAS's shape) 103.1; 4 x 16 99.3; 3 x 32 46.8; 2 x 64 45.0. Each element
is still one fma chain in ascending k from A's value, so the bits are the AVX-512 block's.

**Integrated**: ``kernels._make_vblock`` / ``_make_v8_panel`` (hosts without AVX-512), the
vector type and its operations now in ``lstm_cpu/simd.py`` (this probe reads them from there).
"""
import numpy as np, time
from numba import njit, carray
from lstm_cpu import kernels as K, aligned
from lstm_cpu.kernels import _stack_like, PANEL
F = dict(nogil=True, fastmath={"contract"}, error_model="numpy")
def make(BW, RB, j0):
    n = RB * BW
    @njit(inline="always", **F)
    def block(Z, s, Wp, p, k0, k1, A, c0):
        acc = carray(_stack_like(A, n), (RB, BW))
        for r in range(RB):
            ar = A[s + r, c0 + j0 : c0 + j0 + BW]
            for j in range(BW):
                acc[r, j] = ar[j]
        for k in range(k0, k1):
            q = k - k0
            for r in range(RB):
                zr = Z[s + r, q]
                for j in range(BW):
                    acc[r, j] += Wp[p, k, j0 + j] * zr
        for r in range(RB):
            ar = A[s + r, c0 + j0 : c0 + j0 + BW]
            for j in range(BW):
                ar[j] = acc[r, j]
    return block
def make_prod(BW, RB):
    halves = [make(BW, RB, j0) for j0 in range(0, PANEL, BW)]
    assert len(halves) in (1, 2, 4)
    h0 = halves[0]; h1 = halves[1] if len(halves) > 1 else halves[0]
    @njit(**F)
    def prod(Z, Wp, A, k0, k1, reps):
        N = Z.shape[0]
        for r in range(reps):
            for p in range(Wp.shape[0]):
                c0 = p * PANEL
                s = 0
                while s + RB <= N:
                    h0(Z, s, Wp, p, k0, k1, A, c0)
                    if BW < PANEL:
                        h1(Z, s, Wp, p, k0, k1, A, c0)
                    s += RB
    return prod
variants = {"64x2": make_prod(64, 2), "32x3": make_prod(32, 3), "32x4": make_prod(32, 4), "32x2": make_prod(32, 2)}
Kr, C = 256, 1024
n = C // 64
Wp = aligned.empty(n * Kr * 64, np.float32).reshape(n, Kr, 64); Wp[:] = 0.01
for N in (12, 16, 24):
    Z = np.ones((N, Kr), np.float32)
    for name, fn in variants.items():
        RB = int(name.split("x")[1])
        if N % RB: continue
        A = np.zeros((N, C), np.float32); fn(Z, Wp, A, 0, Kr, 1)
        reps = 200
        t = time.perf_counter(); fn(Z, Wp, A, 0, Kr, reps); dt = (time.perf_counter() - t) / reps
        print(N, name, f"{2*N*Kr*C/dt/1e9:.1f} GFLOP/s")


# ---- explicit 8-lane vectors: the shipped blocks (kernels._make_vblock) ---------------------
from numba import njit
from lstm_cpu import aligned
from lstm_cpu.kernels import PANEL, _make_vblock
F = dict(nogil=True, fastmath={"contract"}, error_model="numpy")
def make_prod(RB, NV):
    blk = _make_vblock(RB, NV, False); BW = 8 * NV
    @njit(**F)
    def prod(Z, Wp, A, reps):
        N, K, n = Z.shape[0], Z.shape[1], Wp.shape[0]
        for r in range(reps):
            for p in range(n):
                for j0 in range(0, PANEL, BW):
                    s = 0
                    while s + RB <= N:
                        blk(Z, s, Wp, p, 0, K, A, p * PANEL, j0)
                        s += RB
    return prod
Kr, C = 256, 1024; n = C // 64
Wp = aligned.empty(n * Kr * 64, np.float32).reshape(n, Kr, 64); Wp[:] = 0.01
for RB, NV in ((6, 2), (4, 2), (3, 4), (2, 8), (4, 3)):
    if 64 % (8 * NV): continue
    N = 24 if 24 % RB == 0 else 16
    Z = np.ones((N, Kr), np.float32); A = np.zeros((N, C), np.float32)
    fn = make_prod(RB, NV); fn(Z, Wp, A, 1)
    t = time.perf_counter(); fn(Z, Wp, A, 200); dt = (time.perf_counter() - t) / 200
    print(f"{RB} streams x {8*NV} cols (explicit ymm): {2*N*Kr*C/dt/1e9:.1f} GFLOP/s")
