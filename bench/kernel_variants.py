"""Numbered variants of the gate product and the cell update, each checked then timed.

Kept side by side so every speedup (or non-speedup) behind the chosen kernels is a visible diff.
Each variant is first validated against a float64 numpy product over the same weights; only then
is it timed (best of several repeats, compiled entry points, so Numba's dispatch is not counted).

    python bench/kernel_variants.py            # prints a markdown table
    OPENBLAS_NUM_THREADS=1 python bench/kernel_variants.py   # BLAS on one thread, like ours

Variants of acc (C,) += W (K, C)^T z (K,), the matrix-vector product of one step:

    v1  axpy, one row per pass            strict float order
    v2  axpy, four rows per pass          strict order per column   (the kernels' product to layout 6)
    panel1  register block over 64-column panels, one stream             <- lstm_cpu.kernels._product
    v3  axpy, eight rows per pass         strict order per column
    v4  dot per output over W^T (C, K)    needs reassociation (fastmath) to vectorise
    v5  dot per output, fastmath          reassociates
    blas numpy's sgemv over W^T           the in-run bound
    r0  read floor: a fastmath sum of W    no product reads W faster (not a product itself)

of the batched product A (N, C) += Z (N, K) @ W (K, C), N streams at one step:

    g1  v2 once per stream                W read N times
    g2  four streams per pass             W read N/4 times      (the kernels' product to layout 6)
    panelN  register blocks of 2 streams x 64 columns over panels   <- lstm_cpu.kernels._product
    blas numpy's sgemm                    the former BLAS path (40+ streams, until 2026-11-27)

and of the cell update for Uc units (float32, Sigmoid/Tanh/Tanh):

    e1  one loop with loop-invariant branches (peepholes, clip, coupling, libm/rational)
    e2  a branch-free loop for the common case   <- lstm_cpu.kernels._epilogue's fast path
"""

from __future__ import annotations

import timeit

import numpy as np
from numba import njit

from lstm_cpu import kernels as _K
from lstm_cpu.kernels import _tanh_f32
from lstm_cpu.layout import to_panels

_F = dict(nogil=True, fastmath={"contract"}, error_model="numpy")


@njit(**_F)
def v1(W, z, acc):
    for k in range(W.shape[0]):
        zk = z[k]
        for j in range(W.shape[1]):
            acc[j] += W[k, j] * zk


@njit(**_F)
def v2(W, z, acc):
    K = W.shape[0]
    k = 0
    while k + 4 <= K:
        z0, z1, z2, z3 = z[k], z[k + 1], z[k + 2], z[k + 3]
        for j in range(W.shape[1]):
            acc[j] += W[k, j] * z0 + W[k + 1, j] * z1 + W[k + 2, j] * z2 + W[k + 3, j] * z3
        k += 4
    while k < K:
        for j in range(W.shape[1]):
            acc[j] += W[k, j] * z[k]
        k += 1


@njit(**_F)
def panel1(Wp, z, acc):
    """The kernels' product (layout 7): Wp (C/64, K, 64) panels, one stream."""
    _K._product(z.reshape((1, z.shape[0])), Wp, acc.reshape((1, acc.shape[0])), 0, Wp.shape[0], 0, Wp.shape[1])


@njit(**_F)
def v3(W, z, acc):
    K, C = W.shape
    k = 0
    while k + 8 <= K:
        z0, z1, z2, z3 = z[k], z[k + 1], z[k + 2], z[k + 3]
        z4, z5, z6, z7 = z[k + 4], z[k + 5], z[k + 6], z[k + 7]
        for j in range(C):
            acc[j] += (W[k, j] * z0 + W[k + 1, j] * z1 + W[k + 2, j] * z2 + W[k + 3, j] * z3
                       + W[k + 4, j] * z4 + W[k + 5, j] * z5 + W[k + 6, j] * z6 + W[k + 7, j] * z7)
        k += 8
    while k < K:
        zk = z[k]
        for j in range(C):
            acc[j] += W[k, j] * zk
        k += 1


@njit(**_F)
def v4(Wt, z, acc):
    for j in range(Wt.shape[0]):
        s = acc[j]
        for k in range(Wt.shape[1]):
            s += Wt[j, k] * z[k]
        acc[j] = s


@njit(nogil=True, fastmath=True, error_model="numpy")
def v5(Wt, z, acc):
    for j in range(Wt.shape[0]):
        s = acc[j]
        for k in range(Wt.shape[1]):
            s += Wt[j, k] * z[k]
        acc[j] = s


@njit(nogil=True, fastmath=True, error_model="numpy")
def r0(W, z, acc):
    """The read floor: every weight loaded once, nothing else (a reassociated sum, 8 lanes)."""
    flat = W.reshape(-1)
    s = np.float32(0)
    for i in range(flat.shape[0]):
        s += flat[i]
    acc[0] = s


@njit(**_F)
def g1(Z, W, A):
    for s in range(Z.shape[0]):
        v2(W, Z[s], A[s])


@njit(**_F)
def g2(Z, W, A):
    N, K, C = Z.shape[0], W.shape[0], W.shape[1]
    s = 0
    while s + 4 <= N:
        for k in range(K):
            z0, z1, z2, z3 = Z[s, k], Z[s + 1, k], Z[s + 2, k], Z[s + 3, k]
            for j in range(C):
                w = W[k, j]
                A[s, j] += w * z0
                A[s + 1, j] += w * z1
                A[s + 2, j] += w * z2
                A[s + 3, j] += w * z3
        s += 4
    while s < N:
        v2(W, Z[s], A[s])
        s += 1


@njit(**_F)
def panelN(Z, Wp, A):
    """The kernels' product (layout 7) for N streams over Wp (C/64, K, 64) panels."""
    _K._product(Z, Wp, A, 0, Wp.shape[0], 0, Wp.shape[1])


@njit(**_F)
def e1(acc, c, m, has_peep, clip, coupled, approx):
    uc = c.shape[0]
    half = np.float32(0.5)
    one = np.float32(1.0)
    for u in range(uc):
        ai, af, ag, ao = acc[u], acc[uc + u], acc[2 * uc + u], acc[3 * uc + u]
        cp = c[u]
        if has_peep:
            ai += cp
        if clip > 0:
            ai = min(max(ai, -clip), clip)
        i = half * (_tanh_f32(half * ai) if approx else np.tanh(half * ai)) + half
        f = one - i if coupled else half * _tanh_f32(half * af) + half
        cn = f * cp + i * _tanh_f32(ag)
        c[u] = cn
        m[u] = (half * _tanh_f32(half * ao) + half) * _tanh_f32(cn)


@njit(**_F)
def e2(acc, c, m):
    uc = c.shape[0]
    half = np.float32(0.5)
    for u in range(uc):
        f = half * _tanh_f32(half * acc[uc + u]) + half
        i = half * _tanh_f32(half * acc[u]) + half
        cn = f * c[u] + i * _tanh_f32(acc[2 * uc + u])
        c[u] = cn
        m[u] = (half * _tanh_f32(half * acc[3 * uc + u]) + half) * _tanh_f32(cn)


def _entry(fn, *args):
    fn(*args)
    return fn.overloads[fn.signatures[-1]].entry_point


def _best_us(call, number):
    return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6


def main():
    rng = np.random.default_rng(0)
    print("| (I, H): W (K, 4H) | " + " | ".join(["v1", "v2", "v3", "v4", "v5", "panel1 (ours)",
                                                 "numpy BLAS", "r0 read floor"]) + " |")
    print("|---|" + "---|" * 8)
    for I, H in [(32, 64), (64, 128), (128, 256), (256, 512), (512, 1024)]:
        K, C = I + H, 4 * H
        W = rng.normal(size=(K, C)).astype(np.float32)  # (K, C) transposed fused gates
        Wt = np.ascontiguousarray(W.T)  # (C, K)
        z = rng.normal(size=K).astype(np.float32)  # (K,)
        ref = W.T.astype(np.float64) @ z
        acc = np.zeros(C, np.float32)
        number = max(20, 4_000_000 // (K * C))
        row = []
        Wp = to_panels(W)  # (C/64, K, 64)
        for fn, w in ((v1, W), (v2, W), (v3, W), (v4, Wt), (v5, Wt), (panel1, Wp)):
            acc[:] = 0
            ep = _entry(fn, w, z, acc)
            acc[:] = 0
            ep(w, z, acc)
            err = np.abs(acc - ref).max() / np.abs(ref).max()
            assert err < 1e-5, (fn, err)  # validate before timing
            row.append(_best_us(lambda: ep(w, z, acc), number))
        row.append(_best_us(lambda: np.dot(Wt, z, out=acc), number))
        ep = _entry(r0, W, z, acc)
        row.append(_best_us(lambda: ep(W, z, acc), number))
        print(f"| ({I}, {H}) | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    print()
    print("µs per batched product; GFLOP/s in brackets")
    print()
    print("| N, (K, C) | g1 (axpy per stream) | g2 (4 streams per pass) | panelN (panels, ours) | numpy BLAS |")
    print("|---|---|---|---|---|")
    for N in (16, 32, 48, 64):
        for K, C in ((96, 256), (384, 1024), (512, 1024)):
            W = rng.normal(size=(K, C)).astype(np.float32)  # (K, C)
            Z = rng.normal(size=(N, K)).astype(np.float32)  # (N, K)
            A = np.zeros((N, C), np.float32)  # (N, C)
            ref = Z.astype(np.float64) @ W
            number = max(5, 20_000_000 // (N * K * C))
            row = []
            Wp = to_panels(W)  # (C/64, K, 64)
            for fn, w in ((g1, W), (g2, W), (panelN, Wp)):
                A[:] = 0
                ep = _entry(fn, Z, w, A)
                A[:] = 0
                ep(Z, w, A)
                assert np.abs(A - ref).max() <= 1e-5 * np.abs(ref).max(), fn  # validate before timing
                row.append(_best_us(lambda: ep(Z, w, A), number))
            row.append(_best_us(lambda: np.matmul(Z, W, out=A), number))
            flops = 2 * N * K * C
            print(f"| {N}, ({K}, {C}) | " + " | ".join(f"{v:.1f} ({flops / v / 1e3:.0f})" for v in row) + " |")
    print()
    print("| Uc units | e1 (branches) | e2 (branch-free, ours) |")
    print("|---|---|---|")
    for uc in (64, 256, 1024):
        acc = rng.normal(size=4 * uc).astype(np.float32)
        c0 = rng.normal(size=uc).astype(np.float32)
        m1, m2, c1, c2 = np.zeros(uc, np.float32), np.zeros(uc, np.float32), c0.copy(), c0.copy()
        p1 = _entry(e1, acc, c1, m1, False, np.float32(0), False, True)
        p2 = _entry(e2, acc, c2, m2)
        c1[:], c2[:] = c0, c0
        p1(acc, c1, m1, False, np.float32(0), False, True)
        p2(acc, c2, m2)
        assert np.array_equal(m1, m2) or np.abs(m1 - m2).max() < 1e-6  # same cell update
        number = max(200, 2_000_000 // uc)
        t1 = _best_us(lambda: p1(acc, c1, m1, False, np.float32(0), False, True), number)
        t2 = _best_us(lambda: p2(acc, c2, m2), number)
        print(f"| {uc} | {t1:.2f} | {t2:.2f} |")


if __name__ == "__main__":
    main()
