"""The batched gate product: numpy's BLAS vs Numba kernels, 1 thread (issue 12, items 1-2).

    python bench/gemm_probe.py                                   # OpenBLAS picks its own kernels
    OPENBLAS_CORETYPE=Haswell python bench/gemm_probe.py         # as some of our machines force
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/gemm_probe.py
    python bench/gemm_probe.py --cells                           # fused product + cell update
    NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt,+sse4.2 \\
        python bench/gemm_probe.py --kernels p32_r2,p16_r4,p8_r8,p32_r2_g2,p64_r2   # AVX2 code

Shapes: A (N, C) += Z (N, K) @ W (K, C) with K = I + H, C = 4H of the models in bench/results.md
(32,64,1): (96, 256); (128,256,2): (384, 1024) and (512, 1024); (512,1024,1): (1536, 4096); for N
in 1, 4, 16, 64 streams (a batched step; ``run`` has the same shapes with K = H).

Contenders, each validated before it is timed (llm.c style):
* ``blas``: ``np.matmul(Z, W, out=T)`` (no accumulate: the cheaper job; OpenBLAS pinned to 1 thread);
* ``engine``: ``kernels._product``, the engine's product since layout 7 (register blocks of
  ``kernels.BLOCK_STREAMS`` streams x ``BLOCK_COLUMNS`` columns over 64-column panels);
* ``pP_rR[_gG]``: ``lstm_cpu.gemm`` register-blocked kernels on panels of P columns, R streams
  (G panels at once), checked against ``engine`` to 1e-5 (they sum row quads; the engine, since
  layout 7, chains FMAs: the same sums rounded differently; formerly array_equal, the README
  promises).
The peak is a register-only FMA loop in Numba (vector width of the compile target). Timings are
the best of interleaved rounds (every contender once per round), in GFLOP/s = 2*N*K*C / time.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numba  # noqa: E402
from numba import njit  # noqa: E402

from lstm_cpu import gemm as G  # noqa: E402
from lstm_cpu import kernels as KK  # noqa: E402
from lstm_cpu.kernels import _FLAGS  # noqa: E402


@njit(**dict(_FLAGS, cache=False))
def _engine(Z, Wp, A):
    """The engine's gate product (kernels._product) over all panels and rows."""
    KK._product(Z, Wp, A, 0, Wp.shape[0], 0, Wp.shape[1])

SHAPES = [(96, 256), (384, 1024), (512, 1024), (1536, 4096)]  # (K, C)
BATCHES = [1, 4, 16, 64]


# ---------------------------------------------------------------------------------------------
# OpenBLAS (numpy's bundled copy), through ctypes
# ---------------------------------------------------------------------------------------------
def _openblas():
    np.ones((8, 8)) @ np.ones((8, 8))
    for path in sorted({ln.split()[-1] for ln in open("/proc/self/maps") if "openblas" in ln.lower()}):
        lib = ctypes.CDLL(path)
        for pre, suf in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"), ("openblas", "")):
            if hasattr(lib, f"{pre}_set_num_threads{suf}"):
                core = getattr(lib, f"{pre}_get_corename{suf}")
                core.restype = ctypes.c_char_p
                return getattr(lib, f"{pre}_set_num_threads{suf}"), core().decode()
    return None, "unknown"


# ---------------------------------------------------------------------------------------------
# Peak: independent FMA chains on values that never leave registers
# ---------------------------------------------------------------------------------------------
@njit(fastmath={"contract"}, error_model="numpy")
def _fma_loop(a, b, c, reps):
    """a (256,) float32 in L1 = 16 zmm (32 ymm) independent chains of 16 dependent FMAs per
    pass: one load and one store per 16 FMAs, so the FMA pipes are the limit."""
    for _ in range(reps):
        for j in range(a.shape[0]):
            x = a[j]
            for _i in range(16):  # unrolled by LLVM: 16 dependent FMAs per element
                x = x * b + c
            a[j] = x


def peak_gflops(rounds=7):
    a = np.ones(256, np.float32)
    b, c = np.float32(0.999), np.float32(1e-3)
    reps = 2000
    _fma_loop(a, b, c, 1)
    best = min(_timed(lambda: _fma_loop(a, b, c, reps)) for _ in range(rounds))
    return 2.0 * 256 * reps * 16 / best / 1e9


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# Assembly: the hot loop of a kernel
# ---------------------------------------------------------------------------------------------
def hot_loop_report(fn, top=1):
    """FMAs by width, loads and stack traffic in the innermost loop holding the most FMAs."""
    asm = "\n".join(fn.inspect_asm().values())
    lines = asm.splitlines()
    labels = {ln.split(":")[0]: i for i, ln in enumerate(lines) if re.match(r"^\.?L\w+:", ln)}
    loops = []  # (first, last) line of every backward jump's loop
    for i, ln in enumerate(lines):
        m = re.match(r"\s+j\w+\s+(\.?L\w+)", ln)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            loops.append((labels[m.group(1)], i))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    if not inner:
        return "no loop found"
    # packed FMAs by width (an xmm one is a 128-bit vector; vfmadd...ss is scalar), then the rest
    pats = [r"vfmadd\w*ps.*zmm", r"vfmadd\w*ps.*ymm", r"vfmadd\w*ps.*xmm", r"vfmadd\w*ss", r"vmulps",
            r"vaddps", r"vmovu?ps\s+-?\d*\(%r(?!sp)", r"vmovu?ps\s+%[xyz]mm\d+, -?\d*\(%r(?!sp)",
            r"vbroadcastss", r"vmov.*\(%rsp\)"]
    vec = lambda r: sum(bool(re.search(r"vfmadd\w*ps", x)) for x in lines[r[0]:r[1] + 1])  # noqa: E731
    out = []
    for a, b in sorted((r for r in inner if vec(r)), key=lambda r: -vec(r))[:top]:
        body = lines[a:b + 1]
        n = [sum(bool(re.search(p, x)) for x in body) for p in pats]
        out.append(f"{n[0]} zmm/{n[1]} ymm/{n[2]} xmm/{n[3]} scalar FMA, {n[4]} mul, {n[5]} add, "
                   f"{n[6]} loads, {n[7]} stores, {n[8]} bcast, {n[9]} stack moves, {len(body)} instrs")
    return "; ".join(out) or "no vector FMA loop"


# ---------------------------------------------------------------------------------------------
# Fused product + cell update per gate panel vs lstm-cpu's batched step
# ---------------------------------------------------------------------------------------------
def cells_section(rounds):
    """One layer, N streams: ``lstm_cpu.gemm.CELLS`` (c, m checked bit for bit against each stream
    stepped alone, the README's promise) against ``stream.step`` of a batched stream (serial
    kernel: the engine's panel product and epilogue plus the copies into z and out of h; from
    BLAS_MIN_BATCH = 40 streams, OpenBLAS products)."""
    from lstm_cpu import LayerParams, LSTMModel

    rng = np.random.default_rng(1)
    print("| I, H | N | step() us | " + " | ".join(f"{k} us" for k in G.CELLS) + " | bit-identical |")
    print("|---|---|---|" + "---|" * len(G.CELLS) + "---|")
    for I, H in ((32, 64), (128, 256), (512, 1024)):
        p = LayerParams(rng.uniform(-.3, .3, (4 * H, I)), rng.uniform(-.3, .3, (4 * H, H)),
                        rng.uniform(-.3, .3, 4 * H))
        model = LSTMModel([[p]], kernel="serial")
        lp = model.layer_params()[0][0]
        W = np.concatenate([lp.w_ih, lp.w_hh], axis=1).T.astype(np.float32)  # (K, 4H) [i|f|g|o]
        b = lp.bias.astype(np.float32)  # (4H,) folded
        for N in (4, 16, 64):
            s = model.stream(batch=N, kernel="serial")
            x = rng.standard_normal((N, I)).astype(np.float32)  # (N, I)
            h = rng.standard_normal((N, H)).astype(np.float32)  # (N, H)
            c = rng.standard_normal((N, H)).astype(np.float32)  # (N, H)
            s.state = (h[None], c[None])
            s.step(x)
            y, c1 = np.empty((N, H), np.float32), np.empty((N, H), np.float32)  # each stream alone
            for j in range(N):
                one = model.stream()
                one.state = (h[None, j], c[None, j])
                y[j] = one.step(x[j])
                c1[j] = one.state[1][0]
            Z = np.concatenate([x, h], axis=1)  # (N, K)
            runs = {"step": (lambda s=s, x=x: s.step(x))}
            same = {}
            for name, fn in G.CELLS.items():
                U = int(name[1:].split("_")[0])
                Wp = G.pack_gate_panels(W, U)  # (H/U, K, 4U)
                bp = np.ascontiguousarray(b[G.gate_panel_order(H, U)].reshape(H // U, 4 * U))
                cc, m = c.copy(), np.empty((N, H), np.float32)
                fn(Z, Wp, bp, cc, m)
                same[name] = np.array_equal(m, y) and np.array_equal(cc, c1)
                runs[name] = (lambda fn=fn, Wp=Wp, bp=bp, cc=cc, m=m: fn(Z, Wp, bp, cc, m))
            reps = max(1, int(4e6 / (2 * N * (I + H) * 4 * H)))
            best = {k: np.inf for k in runs}
            for _ in range(rounds):
                for k, fn in runs.items():
                    t = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    best[k] = min(best[k], (time.perf_counter() - t) / reps)
            print(f"| {I}, {H} | {N} | {best['step'] * 1e6:.1f} | "
                  + " | ".join(f"{best[k] * 1e6:.1f}" for k in G.CELLS) + " | "
                  + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items()) + " |", flush=True)
    print("# assembly, the loop with the most FMAs (u16: its epilogue's tanh polynomials):")
    for name, fn in G.CELLS.items():
        print(f"#   {name:7s} {hot_loop_report(fn)}")


# ---------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and shapes")
    ap.add_argument("--kernels", default="p64_r2,p32_r2_g2,p32_r4,p16_r4_g2,p32_r2,p64_r4")
    ap.add_argument("--cells", action="store_true", help="only the fused product + cell update")
    args = ap.parse_args()
    rounds = 5 if args.quick else args.rounds
    names = args.kernels.split(",")
    set_blas, corename = _openblas()
    if set_blas is not None:
        set_blas(1)
    numba.set_num_threads(1)
    target = numba.config.CPU_NAME or "host"
    print(f"# gemm probe: {platform.processor() or platform.machine()}, numba target {target}, "
          f"OpenBLAS core {corename}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '(unset)')}, 1 thread")
    if args.cells:
        cells_section(rounds)
        return
    peak = peak_gflops(rounds=3 * rounds)
    print(f"# FMA peak, one core, Numba register loop: {peak:.1f} GFLOP/s ({hot_loop_report(_fma_loop)})")
    rng = np.random.default_rng(0)
    header = ["N", "K", "C", "blas"] + ["engine"] + names
    print("| " + " | ".join(header) + " | best numba / blas | agree with engine (1e-5) |")
    print("|" + "---|" * (len(header) + 2))
    shapes = SHAPES[1:3] if args.quick else SHAPES
    for K, C in shapes:
        for N in BATCHES:
            Z = rng.standard_normal((N, K)).astype(np.float32)  # (N, K) [x | h] per stream
            W = (rng.standard_normal((K, C)) * 0.1).astype(np.float32)  # (K, C) fused gates
            A0 = rng.standard_normal((N, C)).astype(np.float32)  # (N, C) bias-initialised acc
            ref = A0.copy()
            W64 = G.pack_panels(W, 64)  # (C/64, K, 64): the engine's layout
            _engine(Z, W64, ref)
            T = np.empty((N, C), np.float32)
            np.matmul(Z, W, out=T)
            assert np.allclose(A0 + T, ref, atol=1e-3, rtol=1e-4), "BLAS disagrees"
            runs = {"blas": (lambda Z=Z, W=W, T=T: np.matmul(Z, W, out=T))}
            A = A0.copy()
            runs["engine"] = (lambda Z=Z, W64=W64, A=A: _engine(Z, W64, A))
            identical = True
            for name in names:
                P = int(name[1:].split("_")[0])
                Wp = G.pack_panels(W, P)  # (C/P, K, P)
                out = A0.copy()
                G.KERNELS[name](Z, Wp, out)
                identical &= bool(np.allclose(out, ref, rtol=1e-5, atol=1e-5))  # row quads vs the engine's FMA chains
                runs[name] = (lambda f=G.KERNELS[name], Z=Z, Wp=Wp, A=out: f(Z, Wp, A))
            flops = 2.0 * N * K * C
            reps = max(1, int(2e7 / flops))  # ~0.2 ms per timing: short, to catch quiet moments
            best = {k: np.inf for k in runs}
            for _ in range(rounds):  # interleaved: every contender once per round
                for k, fn in runs.items():
                    t = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    best[k] = min(best[k], (time.perf_counter() - t) / reps)
            gf = {k: flops / v / 1e9 for k, v in best.items()}
            top = max(gf[k] for k in ["engine"] + names)
            print(f"| {N} | {K} | {C} | " + " | ".join(f"{gf[k]:.1f}" for k in header[3:])
                  + f" | {top / gf['blas']:.2f}x | {'yes' if identical else 'NO'} |", flush=True)
    print(f"# FMA peak again: {peak_gflops(rounds=3 * rounds):.1f} GFLOP/s")
    print("# assembly of the k loop (the loop with the most FMAs):")
    for name in ["engine"] + names:
        fn = _engine if name == "engine" else G.KERNELS[name]
        print(f"#   {name:7s} {hot_loop_report(fn)}")


if __name__ == "__main__":
    main()
