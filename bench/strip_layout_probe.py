"""Probe: gate panels stored as 64-float rows (layout 7, today's) against four 16-column strips
per panel (a layout 8 tried on 2026-11-27, not adopted). Explicit vector blocks over the 64 columns
of a panel, native code unless run with the AVX2 proxy's environment (bench/results.md).

    python bench/strip_layout_probe.py K C N RB LANES NCOLS     # e.g. 256 1024 16 6 8 16

RB streams x NCOLS columns a block (LANES 8 or 16). Same bits either way (checked).

Zen 4 host, GFLOP/s, rows / strips. Haswell code: (K, C) = (256, 1024) 12 streams in 6 x 16
blocks 104 / 111, 16 streams in 4 x 16 92 / 102, 8 streams 90 / 103; (1024, 4096) 65 / 71;
(128, 1024) 105 / 105; one stream 1 x 64 43 / 46. AVX-512 code: one stream 57 / 57 at (96, 256),
45 / 47 at (256, 1024), 33 / 34 at (1024, 4096); 16 streams in 4 x 64: 117 / 116, 114 / 115,
106 / 102.

Why it was not adopted: in the engine's own kernels (which prefetch the next panel into L2 and
alternate the panel order every step, neither of which this probe does) the strips gained little
on Haswell code and cost on AVX-512 code. (128,256,2) B=16 ``run``, Haswell code: 307.5 -> 299.9
us a step (product 79.9 -> 78.5, projection 42.6 -> 40.1). AVX-512 code, 1 thread: the step
2.22 -> 2.30 us at (32,64,1), 42.2 -> 44.1 at (128,256,2), 355 -> 370 at (512,1024,1); ``run``
B=1 0.99 -> 1.07 us a step at (32,64,1). (Explicit 16-lane product blocks on today's layout,
measured on the way: the same as the plain ones within noise.) The attempt's diff (layout 8,
packed format 4 converting format-3 files) is described in bench/results.md.
"""
import time, sys
import numpy as np
from numba import njit
from lstm_cpu import simd

def vblock(RB, lanes, ncols, sub):
    """RB streams x ncols columns starting at j0 in the 64-col group p; sub = 64 (P64) or 16."""
    ops = simd._V16 if lanes == 16 else simd._V8
    NV = ncols // lanes
    L = ["def block(Z, s, Wp, p, K, A, j0):"]
    acc = [[f"a{r}_{v}" for v in range(NV)] for r in range(RB)]
    for r in range(RB):
        for v in range(NV):
            L.append(f"    {acc[r][v]} = ld(A, (s + {r}, p * 64 + j0 + {lanes * v}))")
    def addr(v):
        if sub == 64:
            return f"(p * K + k) * 64 + j0 + {lanes * v}"
        # column c = j0 + lanes*v within the group; strip c // 16
        return f"((p * 4 + (j0 + {lanes * v}) // 16) * K + k) * 16 + (j0 + {lanes * v}) % 16"
    L.append("    for k in range(K):")
    for v in range(NV):
        L.append(f"        w{v} = ld(Wp, {addr(v)})")
    for r in range(RB):
        L.append(f"        z = bc(Z, (s + {r}, k))")
        for v in range(NV):
            L.append(f"        {acc[r][v]} = fma(w{v}, z, {acc[r][v]})")
    for r in range(RB):
        for v in range(NV):
            L.append(f"    st(A, (s + {r}, p * 64 + j0 + {lanes * v}), {acc[r][v]})")
    ns = dict(ld=ops["load_at"], st=ops["store_at"], bc=ops["bcast_at"], fma=ops["fma_f"])
    exec(compile("\n".join(L), f"<vb{RB}{lanes}{ncols}{sub}>", "exec"), ns)
    return njit(inline="always")(ns["block"])

def make(RB, lanes, ncols, sub):
    b = vblock(RB, lanes, ncols, sub)
    @njit
    def prod(Z, Wp, A, n):
        N = A.shape[0]; K = Z.shape[1]; G = A.shape[1] // 64
        for _ in range(n):
            for p in range(G):
                for j0 in range(0, 64, ncols):
                    for s in range(0, N, RB):
                        b(Z, s, Wp, p, K, A, j0)
    return prod

def main():
    K, C, N, RB, lanes, ncols = (int(v) for v in sys.argv[1:7])
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((N, K)).astype(np.float32)
    W = rng.standard_normal((K, C)).astype(np.float32)
    W64 = np.ascontiguousarray(W.reshape(K, C // 64, 64).transpose(1, 0, 2)).ravel()
    W16 = np.ascontiguousarray(W.reshape(K, C // 16, 16).transpose(1, 0, 2)).ravel()
    fs = {"P64": (make(RB, lanes, ncols, 64), W64), "P16": (make(RB, lanes, ncols, 16), W16)}
    outs = []
    for name, (f, w) in fs.items():
        A = np.zeros((N, C), np.float32); f(Z, w, A, 1); outs.append(A)
    assert np.array_equal(outs[0], outs[1])
    A = np.zeros((N, C), np.float32)
    n = max(1, int(1e8 / (2 * N * K * C)))
    ts = {k: [] for k in fs}
    for _ in range(21):
        for name, (f, w) in fs.items():
            t = time.perf_counter(); f(Z, w, A, n); ts[name].append(time.perf_counter() - t)
    print(f"K={K} C={C} N={N} block {RB}x{ncols} lanes {lanes}: " + "  ".join(f"{k} {2*N*K*C*n/np.median(v)/1e9:.1f}" for k, v in ts.items()) + " GFLOP/s   " + "  ".join(f"{k} {np.median(v)/n*1e6:.2f}us" for k, v in ts.items()))
main()
