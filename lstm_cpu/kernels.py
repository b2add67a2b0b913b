"""Numba kernels. Plain functions over arrays and scalars; they trust their callers.

The Python API (``model.py``) validates every shape and dtype once; nothing here checks. The packed
layout the kernels read (``wbuf``, ``meta``, ``fpar``, ``sbuf``) is defined in ``layout.py``; which
kernel runs (serial or parallel, and how a parallel one splits) is decided in ``policy.py``.

Two entry points per job, with the same arithmetic in the same order:

* ``stack_step_serial`` / ``stack_step_parallel``: one time step of the whole (unidirectional)
  stack for N streams, in one call (no Python loop over layers). ``stack_step_split`` is the
  parallel step for 4+ streams a thread: groups of streams, each stepped whole on one thread.
* ``layer_sequence_serial`` / ``layer_sequence_parallel``: the recurrent part of one layer and
  direction over a whole sequence, after ``input_projection_serial`` / ``_parallel`` did the
  input rows of all T*B samples in one pass, each element's chain started from the bias as a
  step starts it, so that a sequence gets a stream's bits. The parallel twin is one region for the whole
  sequence, a team of threads that wait for each other between phases (``team.py``); a batch
  large enough to split runs ``layer_run_split`` instead: groups of sequences, projection and
  recurrence each on its own thread (``policy.sequence_team`` decides).

All streams (or sequences of a batch) share one pass over each gate matrix (``_product``:
register blocks of streams x columns over the packed panels of ``layout.py``), with the float
order of a single stream. The parallel step runs two ``prange`` loops per layer: the product
over panel ranges, each thread streaming a contiguous part of W, then the cell updates over
(group of four streams, unit range) tasks, a unit range taking the same units of all four
gates; the team kernel runs the same tasks per time step inside one region. The number of ranges is decided at run time from the thread count
(``layout.unit_ranges``), never packed. Results are
bit-identical however many threads run and however many streams share a call: every output
element is computed by exactly one thread in a fixed float order.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

import numba
import numpy as np
from numba import carray, njit, prange, types
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import _config, _threads, simd
from .team import claim, finished, wait_done
from .layout import (
    F_LD,
    F_STRIDE,
    LAYOUT_VERSION,
    LD_ACT,
    LD_B,
    LD_HR,
    LD_K,
    LD_PEEP,
    LD_STRIDE,
    LD_W,
    M_APPROX,
    M_C,
    M_COUPLED,
    M_D,
    M_GENERAL,
    M_H,
    M_HEAD_B,
    M_KMAX,
    M_HEAD_O,
    M_HEAD_W,
    M_HP,
    M_I,
    M_L,
    M_LD,
    M_OUT,
    M_P,
    M_PEEP,
    M_REVERSE,
    PANEL,
    UNIT_ALIGN,
    W_CLIP,
    W_HALF,
    W_ONE,
    sbuf_offsets,
)

# Numba's cache is keyed on this file: a layout change must change this file too (layout.py).
assert LAYOUT_VERSION == 7, "layout.py changed: update kernels.py for it and bump this number"


def compiled_entry(dispatcher, args):
    """The compiled entry point of ``dispatcher`` for the types of ``args`` (compiled or loaded
    from the cache now if needed). Calling it skips Numba's per-call type resolution; the caller
    must then pass arguments of exactly these types (same dtype, ndim, layout, read-only flag
    and alignment). Falls back to the dispatcher itself if Numba's internals differ."""
    try:
        sig = tuple(numba.typeof(a) for a in args)
        cres = dispatcher.overloads.get(sig)
        if cres is None:
            dispatcher.compile(sig)
            cres = dispatcher.overloads[sig]
        return cres.entry_point
    except Exception:  # pragma: no cover - a Numba without these attributes
        return dispatcher


_FLAGS = dict(nogil=True, cache=_config.CACHE, fastmath=_config.FASTMATH, error_model="numpy")

# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------
# A rational approximation of tanh in float32 (the form Eigen and MLAS use: odd degree-13
# numerator over even degree-6 denominator, input clamped where tanh rounds to +-1 in float32).
# Max abs error ~2e-7 against libm, and it is finite for every finite input, including +-1e30.
_T_CLAMP = np.float32(7.90531110763549805)
_A1 = np.float32(4.89352455891786e-03)
_A3 = np.float32(6.37261928875436e-04)
_A5 = np.float32(1.48572235717979e-05)
_A7 = np.float32(5.12229709037114e-08)
_A9 = np.float32(-8.60467152213735e-11)
_A11 = np.float32(2.00018790482477e-13)
_A13 = np.float32(-2.76076847742355e-16)
_B0 = np.float32(4.89352518554385e-03)
_B2 = np.float32(2.26843463243900e-03)
_B4 = np.float32(1.18534705686654e-04)
_B6 = np.float32(1.19825839466702e-06)


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (``llvm.fma``), in the widest of the three float types.

    The cell update ``f * c + i * g`` has two products, and fastmath "contract" lets LLVM fuse
    either one with the sum: which one it picked differed between compile sessions of the same
    source (the general epilogue's bits differed between the serial and parallel kernels when
    one was compiled fresh and the other loaded from the cache). Spelled out, the fusion is the
    same in every compiled caller: ``_fma(f, c, i * g)``."""
    if not all(isinstance(t, types.Float) for t in (a, b, c)):
        return None
    ret = max((a, b, c), key=lambda t: t.bitwidth)

    def codegen(context, builder, sig, args):
        ty = context.get_value_type(ret)
        vals = [context.cast(builder, v, t, ret) for v, t in zip(args, sig.args)]
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]),
                                            f"llvm.fma.f{ret.bitwidth}")
        return builder.call(fn, vals)

    return ret(a, b, c), codegen


@njit(inline="always", **_FLAGS)
def _tanh_f32(x):
    # NaN fails both comparisons and propagates (our NaN policy: propagate, see README).
    if x > _T_CLAMP:
        x = _T_CLAMP
    elif x < -_T_CLAMP:
        x = -_T_CLAMP
    x2 = x * x
    p = _A13
    p = p * x2 + _A11
    p = p * x2 + _A9
    p = p * x2 + _A7
    p = p * x2 + _A5
    p = p * x2 + _A3
    p = p * x2 + _A1
    p = p * x
    q = _B6
    q = q * x2 + _B4
    q = q * x2 + _B2
    q = q * x2 + _B0
    return p / q


@njit(inline="always", **_FLAGS)
def _tanh(x, approx):
    if approx:
        return _tanh_f32(x)
    return np.tanh(x)


@njit(inline="always", **_FLAGS)
def _sigmoid(x, half, approx):
    # sigmoid(x) = (1 + tanh(x/2)) / 2: no exp, so no overflow for any input.
    return half * _tanh(half * x, approx) + half


@njit(inline="always", **_FLAGS)
def _clip(x, bound):
    if x > bound:
        return bound
    if x < -bound:
        return -bound
    return x


@njit(**_FLAGS)
def _act(code, alpha, beta, x, half, approx):
    """The ONNX activation ``code`` (see spec.ACTIVATIONS) of x; NaN propagates."""
    zero = x - x
    if code == 0:  # Sigmoid
        return _sigmoid(x, half, approx)
    if code == 1:  # Tanh
        return _tanh(x, approx)
    if code == 2:  # Relu
        return zero if x < 0 else x
    if code == 3:  # HardSigmoid
        v = alpha * x + beta
        if v < 0:
            return zero
        if v > 1:
            return zero + 1
        return v
    if code == 4:  # Affine
        return alpha * x + beta
    if code == 5:  # LeakyRelu
        return alpha * x if x < 0 else x
    if code == 6:  # ThresholdedRelu
        return zero if x <= alpha else x
    if code == 7:  # ScaledTanh
        return alpha * np.tanh(beta * x)
    if code == 8:  # Elu
        return alpha * np.expm1(x) if x < 0 else x
    if code == 9:  # Softsign
        return x / (1 + np.abs(x))
    # 10: Softplus, stably: max(x, 0) + log1p(exp(-|x|))
    return (x if x > 0 else zero) + np.log1p(np.exp(-np.abs(x)))

# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
@njit(**_FLAGS)
def _axpy_rows(W, z, acc):
    """acc (C,) += W (K, C)^T @ z (K,) for the small row-major matrices (projection, head): K
    axpys over contiguous rows, four rows per pass over acc, a fixed sum order per column (LLVM
    vectorises across columns without reassociating anything). The fusions are spelled out
    (:func:`_fma`): ``w0*z0 + w1*z1`` could be fused either way under "contract"."""
    K = W.shape[0]
    C = W.shape[1]
    k = 0
    while k + 4 <= K:
        z0 = z[k]
        z1 = z[k + 1]
        z2 = z[k + 2]
        z3 = z[k + 3]
        for j in range(C):
            acc[j] += _fma(W[k + 3, j], z3, _fma(W[k + 2, j], z2, _fma(W[k + 1, j], z1, W[k, j] * z0)))
        k += 4
    while k < K:
        zk = z[k]
        for j in range(C):
            acc[j] += W[k, j] * zk
        k += 1


# ---------------------------------------------------------------------------------------------
# Gate products over column panels (layout.py: Wp (C/PANEL, K, PANEL))
# ---------------------------------------------------------------------------------------------
# Every gate product (one stream or many, a step or a sequence) goes through :func:`_product`.
# It holds a block of RB streams x BW columns of A in vector registers while it streams rows
# k0 .. k1 of a panel once, and writes the block back once. Every element gets::
#
#     a = fma(w_k, z_k, a)      for k = k0, k0 + 1, ..., k1 - 1
#
# (fastmath "contract" only: no reassociation), so its bits do not depend on RB, BW, the
# number of streams in the call, or which thread computed its panel. (A chain of FMAs is one
# FP operation per multiply-add; the former row-quad expression ``a += w0*z0 + ... + w3*z3``
# took five for four and ran 5-18% slower on batches, the same on one stream.)
#
# Block sizes follow the vector registers the code is compiled for (Numba compiles for the host,
# and its cache is keyed on the CPU):
#
# * AVX-512: a whole panel (64 columns) x 4 streams, plain loops (16 zmm accumulators of 32).
# * Otherwise (:data:`V8_BLOCKS`): explicit 8-lane vectors (simd.py), up to 6 streams x 16
#   columns (12 ymm accumulators of 16; :func:`_make_v8_panel`), MLAS's shape for AVX2. Written
#   as plain loops, blocks of fewer than 64 columns ran at 5-9 GFLOP/s on both ISAs (LLVM kept
#   them out of registers), and the 64 x 2 block spills on 16 registers.
#
# GFLOP/s of the product at (K, C) = (384, 1024), N = 1 / 2 / 16 / 64 streams, 1 thread, Zen 4
# host (bench/avx2_block_probe.py; "Haswell" = NUMBA_CPU_NAME=haswell, our proxy for AVX2):
#
#   AVX-512, 64 x 4 plain                 44 / 45 / 102 / 103
#   Haswell, 64 x 2 plain (before)        44 / 44 /  46 /  44
#   Haswell, 8-lane blocks                45 / 67 /  99 / 102
#
# (One stream is bound by the weights' bytes, 1.5 MB from L3.) The choice changes speed only,
# never bits: tests/test_vector_width.py compares the Haswell engine's outputs with the host's.


#: Register block of the gate products on this host: BW columns (a whole panel) x RB streams
#: with AVX-512; on 256-bit hosts the batched blocks are :func:`_make_vblock`'s (V8_BLOCK_*).
BLOCK_COLUMNS, BLOCK_STREAMS = (64, 4) if simd.has_avx512() else (64, 2)
#: 256-bit hosts (AVX2 without AVX-512): N >= 2 streams run in explicit 8-lane blocks of up to
#: V8_BLOCK_STREAMS streams x 16 columns (12 ymm accumulators, 2 for a weight row, 1 broadcast).
V8_BLOCKS = not simd.has_avx512()
V8_BLOCK_STREAMS = 6


@intrinsic
def _stack_like(typingctx, arr, n):
    """A pointer to ``n`` elements of ``arr``'s dtype (``n`` a compile-time constant) in the
    caller's stack frame: an ``alloca`` in the entry block of the function it is inlined into,
    which LLVM promotes to registers once the loops over it unroll."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    size = n.literal_value
    dtype = arr.dtype

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(dtype),
                                   size=context.get_constant(types.intp, size))

    return types.CPointer(dtype)(arr, n), codegen


def _make_block(BW, RB):
    """``block(Z, s, Wp, p, k0, k1, A, c0)``: A[s:s+RB, c0:c0+BW] += Z[s:s+RB, 0:k1-k0] @
    Wp[p, k0:k1, :BW], the RB x BW accumulators in registers across all the rows, each one a
    chain of FMAs in ascending k."""
    n = RB * BW

    @njit(inline="always", nogil=True, fastmath=_config.FASTMATH, error_model="numpy")
    def block(Z, s, Wp, p, k0, k1, A, c0):
        acc = carray(_stack_like(A, n), (RB, BW))  # (RB, BW) accumulators
        if RB == 1:
            # One stream: its row through a (BW,) view indexed from 0. A[s, c0 + j] carries
            # Numba's negative-index wraparound wherever c0's sign is unknown to LLVM (panel
            # ranges from run-time bounds), which kept these loads and stores scalar: 1.13 vs
            # 0.94 us at (96, 256). (The same views in the 4-stream block made it slower.)
            a1 = A[s, c0 : c0 + BW]
            for j in range(BW):
                acc[0, j] = a1[j]
        else:
            for r in range(RB):
                for j in range(BW):
                    acc[r, j] = A[s + r, c0 + j]
        for k in range(k0, k1):
            q = k - k0
            for r in range(RB):
                zr = Z[s + r, q]
                for j in range(BW):
                    acc[r, j] += Wp[p, k, j] * zr
        if RB == 1:
            a1 = A[s, c0 : c0 + BW]
            for j in range(BW):
                a1[j] = acc[0, j]
        else:
            for r in range(RB):
                for j in range(BW):
                    A[s + r, c0 + j] = acc[r, j]

    return block


_NONNEG = np.int64(0x7FFFFFFFFFFFFFFF)  # x & _NONNEG == x for x >= 0, and LLVM knows it is >= 0


def _make_product(BW, RB, down=False):
    assert BW == PANEL, "a register block spans a whole panel"
    wide, one = _make_block(BW, RB), _make_block(BW, 1)

    @njit(nogil=True, fastmath=_config.FASTMATH, error_model="numpy")
    def panel_product(Z, Wp, A, p0, p1, k0, k1):
        """A[:, p0*PANEL : p1*PANEL] (N, ·) += Z (N, k1-k0) @ rows k0 .. k1 of panels p0 .. p1
        of Wp (C/PANEL, K, PANEL); A (N, C). Panels outer: a panel streams from memory once
        and its rows serve every block of streams from L1/L2. ``down``: the panels last
        first (see :data:`_product_down`); every element's sum is the same either way."""
        N = Z.shape[0]
        for i in range(p0, p1):
            # & _NONNEG: LLVM then knows p >= 0, and drops Numba's negative-index wraparound
            # from the blocks' loads and stores of A (as with the constant bounds of
            # _range_product); without it, panels last first ran 1.6x slower at 16 streams
            p = (p0 + p1 - 1 - i) & _NONNEG if down else i
            c0 = p * PANEL
            s = 0
            while s + RB <= N:
                wide(Z, s, Wp, p, k0, k1, A, c0)
                s += RB
            while s < N:
                one(Z, s, Wp, p, k0, k1, A, c0)
                s += 1

    return panel_product


_V8_OPS = simd._V8


def _by_weight_dtype(fast, plain, args):
    """A kernel taking ``args`` (a signature with ``Wp``) that runs ``fast`` (explicit float32
    vector blocks) for float32 weights and ``plain`` otherwise, chosen at compile time by an
    ``overload`` on Wp's dtype."""
    src = (f"def kernel({args}):  # pragma: no cover - compiled code uses the overload\n"
           f"    raise NotImplementedError\n"
           f"def by_dtype({args}):\n"
           f"    f = fast if Wp.dtype == types.float32 else plain\n"
           f"    return lambda {args}: f({args})\n"
           f"def call({args}):\n"
           f"    return kernel({args})\n")
    ns = {"fast": fast, "plain": plain, "types": types}
    exec(compile(src, f"<kernels._by_weight_dtype({args})>", "exec"), ns)
    overload(ns["kernel"], inline="always")(ns["by_dtype"])
    return njit(nogil=True, fastmath=_config.FASTMATH, error_model="numpy")(ns["call"])


def _make_vblock(RB, NV, bias, prefetch=False, down=False, lanes=8):
    """``block(Z, s, Wp, p, k0, k1, A, c0, j0, Bv)``: for the RB streams s .. s+RB and the
    lanes*NV columns j0 .. of panel p (A's columns c0 + j0 ..)::

        A[s+r, c0+j0+j] = start + sum over k in [k0, k1) of Z[s+r, k-k0] * Wp[p, k, j0+j]

    in explicit vectors of ``lanes`` floats (simd.py; 8 for AVX2 code, 16 for the AVX-512
    projection): RB*NV accumulators, each a chain of FMAs in ascending k, started from A itself
    (``bias=False``: the gate product; Bv unused) or from the bias Bv[c0+j0+j] (``bias=True``:
    the input projection, A neither read nor pre-set). The same chain as :func:`_make_block`
    from an A holding the bias, so the same bits. Numba has no register arrays; named locals
    are what LLVM keeps in registers, hence the generated source (the same text for the same
    arguments).

    ``prefetch``: each row k also prefetches the same columns of row k of the next panel (p + 1,
    or p - 1 when the panels go ``down``) into L2 (the first block of each strip does, so the
    whole next panel is in L2 when its turn comes). A strip reads one 64-byte line per 256-byte
    row, a stride the hardware prefetchers follow poorly from L3: at (K, C) = (1024, 4096), 16
    streams, Haswell code, 78-83 GFLOP/s without, 87-93 with; unchanged (within 3%) where the
    weights fit L2."""
    ops = simd._V16 if lanes == 16 else _V8_OPS
    L = ["def block(Z, s, Wp, p, k0, k1, A, c0, j0, Bv):"]
    acc = [[f"a{r}_{v}" for v in range(NV)] for r in range(RB)]
    for r in range(RB):
        for v in range(NV):
            L.append(f"    {acc[r][v]} = ld(Bv, c0 + j0 + {lanes * v})" if bias
                     else f"    {acc[r][v]} = ld(A, (s + {r}, c0 + j0 + {lanes * v}))")
    L.append("    K = Wp.shape[1]")
    L.append("    for k in range(k0, k1):")
    L.append("        q = k - k0")
    L.append("        wk = (p * K + k) * PANEL + j0  # Wp[p, k, j0]: a flat index, constant row stride")
    if prefetch:
        for line in range(0, lanes * NV, 16):
            sign = "-" if down else "+"
            L.append(f"        pre(Wp, wk {sign} K * PANEL + {line})  # Wp[p {sign} 1, k, j0 + {line}]")
    for v in range(NV):
        L.append(f"        w{v} = ld(Wp, wk + {lanes * v})")
    for r in range(RB):
        L.append(f"        z = bc(Z, (s + {r}, q))")
        for v in range(NV):
            L.append(f"        {acc[r][v]} = fma(w{v}, z, {acc[r][v]})")
    for r in range(RB):
        for v in range(NV):
            L.append(f"    st(A, (s + {r}, c0 + j0 + {lanes * v}), {acc[r][v]})")
    ns = dict(ld=ops["load_at"], st=ops["store_at"], bc=ops["bcast_at"], fma=ops["fma_f"],
              pre=ops["prefetch_l2_at"], PANEL=PANEL)
    name = f"<kernels._make_vblock({RB}, {NV}, {bias}, {prefetch}, {down}, {lanes})>"
    exec(compile("\n".join(L), name, "exec"), ns)
    return njit(inline="always", nogil=True, fastmath=_config.FASTMATH, error_model="numpy")(ns["block"])


def _make_v8_panel(bias, down=False):
    """``panel(Z, s0, N, Wp, p, k0, k1, A, c0, Bv)``: the product (or the projection from the
    bias Bv, ``bias``) of the N streams s0 .. s0+N over panel p, in 8-lane blocks.

    * N >= 4: 16-column strips; in each, ceil(N/6) blocks of 3-6 streams, as even as whole
      streams allow (16 streams: 6 + 5 + 5), 6-12 accumulators each. Strips outer: a strip of
      the panel (64 bytes a row) stays in L1 while every block of streams goes over it.
    * N = 2 or 3: 32-column strips of 2 streams (8 accumulators) or 16-column strips of 3 (6).
    * N = 1: one block of the whole panel (8 accumulators)."""
    b6, b5, b4, b3 = (_make_vblock(r, 2, bias) for r in (6, 5, 4, 3))
    f6, f5, f4, f3 = (_make_vblock(r, 2, bias, True, down) for r in (6, 5, 4, 3))  # first of a strip
    f2w, b1w = _make_vblock(2, 4, bias, True, down), _make_vblock(1, 8, bias)

    @njit(inline="always", nogil=True, fastmath=_config.FASTMATH, error_model="numpy")
    def panel(Z, s0, N, Wp, p, k0, k1, A, c0, Bv):
        if N >= 4:
            nb = (N + V8_BLOCK_STREAMS - 1) // V8_BLOCK_STREAMS
            for j0 in range(0, PANEL, 16):
                for b in range(nb):
                    s = s0 + N * b // nb
                    r = s0 + N * (b + 1) // nb - s
                    if b == 0:
                        if r == 6:
                            f6(Z, s, Wp, p, k0, k1, A, c0, j0, Bv)
                        elif r == 5:
                            f5(Z, s, Wp, p, k0, k1, A, c0, j0, Bv)
                        elif r == 4:
                            f4(Z, s, Wp, p, k0, k1, A, c0, j0, Bv)
                        else:
                            f3(Z, s, Wp, p, k0, k1, A, c0, j0, Bv)
                    elif r == 6:
                        b6(Z, s, Wp, p, k0, k1, A, c0, j0, Bv)
                    elif r == 5:
                        b5(Z, s, Wp, p, k0, k1, A, c0, j0, Bv)
                    elif r == 4:
                        b4(Z, s, Wp, p, k0, k1, A, c0, j0, Bv)
                    else:
                        b3(Z, s, Wp, p, k0, k1, A, c0, j0, Bv)
        elif N == 3:
            for j0 in range(0, PANEL, 16):
                f3(Z, s0, Wp, p, k0, k1, A, c0, j0, Bv)
        elif N == 2:
            for j0 in range(0, PANEL, 32):
                f2w(Z, s0, Wp, p, k0, k1, A, c0, j0, Bv)
        elif N == 1:
            b1w(Z, s0, Wp, p, k0, k1, A, c0, 0, Bv)

    return panel


def _make_product_v8(down=False):
    """:func:`_make_product`'s ``panel_product`` for 256-bit hosts (:data:`V8_BLOCKS`), in
    :func:`_make_v8_panel`'s blocks; float64 (chosen at compile time) runs :func:`_make_product`'s."""
    panel = _make_v8_panel(False, down)

    @njit(nogil=True, fastmath=_config.FASTMATH, error_model="numpy")
    def panel_product(Z, Wp, A, p0, p1, k0, k1):
        N = Z.shape[0]
        for i in range(p0, p1):
            p = (p0 + p1 - 1 - i) & _NONNEG if down else i  # see _make_product
            panel(Z, 0, N, Wp, p, k0, k1, A, p * PANEL, A)  # Bv unused

    return _by_weight_dtype(panel_product, _make_product(BLOCK_COLUMNS, BLOCK_STREAMS, down),
                            "Z, Wp, A, p0, p1, k0, k1")


_product = _make_product_v8() if V8_BLOCKS else _make_product(BLOCK_COLUMNS, BLOCK_STREAMS)
# The same product with the panels last first. The sequence kernels alternate the two every time
# step: the panels a step reads last are still in L2 when the next step begins with them, where
# one direction always would begin with the panels evicted longest ago. Where W_rec is about the
# size of L2, that saves the L3 reads of most of them: one stream's recurrent product at
# (I, H) = (128, 256) (W_rec 1 MiB, L2 1 MiB) 15.1 -> 13.9 us a step, (128, 320) 22.7 -> 21.5;
# within 2% where W_rec fits L2 (650 KB) or is far larger (16 MiB). Bits unchanged: each element
# is computed by the same block, whatever order the panels come in.
_product_down = _make_product_v8(True) if V8_BLOCKS else _make_product(BLOCK_COLUMNS, BLOCK_STREAMS, True)


#: Rows per tile of the input projection: their inputs stay in L1 while the panels go by.
#: Measured at (kin, C) = (128, 1024), 3200 rows: 85 GFLOP/s with 16, 68 with 64 or 256.
PROJECTION_TILE = 16


@njit(inline="always", **_FLAGS)
def _fill_bias(bias, A, r0, r1, c0, c1):
    """A[r, c0:c1] <- bias[c0:c1] for the rows r0 .. r1-1 (the chains' starting values)."""
    b = bias[c0:c1]  # (c1-c0,) 1-D views: a loop bound from their own shape vectorises
    for r in range(r0, r1):
        a = A[r, c0:c1]
        for j in range(b.shape[0]):
            a[j] = b[j]


def _make_projection(BW, RB):
    wide, one = _make_block(BW, RB), _make_block(BW, 1)
    TS = PROJECTION_TILE

    @njit(nogil=True, fastmath=_config.FASTMATH, error_model="numpy")
    def panel_projection(X, Wp, bias, A, p0, p1):
        """A[:, p0*PANEL : p1*PANEL] (M, ·) = bias + X (M, kin) @ the first kin rows of panels
        p0 .. p1 of Wp; A (M, C), bias (C,). Each element is one chain of FMAs in ascending k
        from its bias: the chain a stream's step starts with (``_layer_product``), so the
        recurrence that continues it from the same value gives a whole sequence a stream's
        bits. Rows in tiles of PROJECTION_TILE, each tile's rows set to the bias and the
        product blocks run from them, panels inside. (Blocks that start their accumulators
        from the bias in registers spilled in their k loop with AVX-512 code, two more
        pointers to keep: 3.8 against 2.3 us a step at (32,64,1) B=16; setting the rows first
        costs 2.5-2.6. The 8-lane blocks index by flat offsets and start from the bias.)"""
        M = X.shape[0]
        kin = X.shape[1]
        for t0 in range(0, M, TS):
            t1 = min(t0 + TS, M)
            _fill_bias(bias, A, t0, t1, p0 * PANEL, p1 * PANEL)
            for p in range(p0, p1):
                c0 = p * PANEL
                s = t0
                while s + RB <= t1:
                    wide(X, s, Wp, p, 0, kin, A, c0)
                    s += RB
                while s < t1:
                    one(X, s, Wp, p, 0, kin, A, c0)
                    s += 1

    return panel_projection


def _make_projection_v8():
    """:func:`_make_projection`'s ``panel_projection`` for 256-bit hosts: tiles of rows, panels
    inside, each (tile, panel) in :func:`_make_v8_panel`'s blocks started from the bias."""
    panel = _make_v8_panel(True)
    TS = PROJECTION_TILE

    @njit(nogil=True, fastmath=_config.FASTMATH, error_model="numpy")
    def panel_projection(X, Wp, bias, A, p0, p1):
        M = X.shape[0]
        kin = X.shape[1]
        for t0 in range(0, M, TS):
            t1 = min(t0 + TS, M)
            for p in range(p0, p1):
                panel(X, t0, t1 - t0, Wp, p, 0, kin, A, p * PANEL, bias)

    return _by_weight_dtype(panel_projection, _make_projection(BLOCK_COLUMNS, BLOCK_STREAMS),
                            "X, Wp, bias, A, p0, p1")


def _make_projection_v16():
    """:func:`_make_projection`'s ``panel_projection`` for AVX-512 hosts in explicit 16-lane
    blocks (4 rows x the whole panel, 16 zmm accumulators, then single rows), started from the
    bias in registers, addressed by flat offsets: the fill-then-accumulate form of the plain
    blocks set every row first (2.5-2.6 against 2.3 us a step at (32,64,1) B=16), and plain
    blocks started from the bias spilled in their k loop. The same chain, so the same bits.
    float64 (chosen at compile time) runs :func:`_make_projection`'s."""
    wide = _make_vblock(BLOCK_STREAMS, PANEL // 16, True, lanes=16)
    one = _make_vblock(1, PANEL // 16, True, lanes=16)
    RB, TS = BLOCK_STREAMS, PROJECTION_TILE

    @njit(nogil=True, fastmath=_config.FASTMATH, error_model="numpy")
    def panel_projection(X, Wp, bias, A, p0, p1):
        M = X.shape[0]
        kin = X.shape[1]
        for t0 in range(0, M, TS):
            t1 = min(t0 + TS, M)
            for p in range(p0, p1):
                c0 = p * PANEL
                s = t0
                while s + RB <= t1:
                    wide(X, s, Wp, p, 0, kin, A, c0, 0, bias)
                    s += RB
                while s < t1:
                    one(X, s, Wp, p, 0, kin, A, c0, 0, bias)
                    s += 1

    return _by_weight_dtype(panel_projection, _make_projection(BLOCK_COLUMNS, BLOCK_STREAMS),
                            "X, Wp, bias, A, p0, p1")


_projection = _make_projection_v8() if V8_BLOCKS else _make_projection_v16()


@njit(inline="always", **_FLAGS)
def _panel_bounds(r, R, n):
    """Panels [p0, p1) of range r of R over n panels, as even as whole panels allow."""
    return n * r // R, n * (r + 1) // R


@njit(inline="always", **_FLAGS)
def _range_product(Z, Wp, A, r, R, p0, p1, k0, k1, down):
    """:func:`_product` over panels [p0, p1), range r of R. With one range the bounds go in as
    the constants 0 and Wp.shape[0]: LLVM then knows every column index c0 + j >= 0, so the
    blocks' loads and stores of A carry no negative-index wraparound and vectorise (one stream
    at (96, 256): 0.93 instead of 1.13 us; 64 streams at (128,256,2): 1,090 instead of 1,190 us).
    The one-stream block also reads its row through a view (see _make_block), which covers the
    parallel ranges; the same views in the 4-stream block made it slower. ``down``: the panels
    last first (:data:`_product_down`)."""
    if down:
        if R == 1:
            _product_down(Z, Wp, A, 0, Wp.shape[0], k0, k1)
        else:
            _product_down(Z, Wp, A, p0, p1, k0, k1)
    elif R == 1:
        _product(Z, Wp, A, 0, Wp.shape[0], k0, k1)
    else:
        _product(Z, Wp, A, p0, p1, k0, k1)


# The stream buffer's layout, defined once in layout.py, compiled here.
_sbuf_offsets = njit(**_FLAGS)(sbuf_offsets)


@njit(inline="always", **_FLAGS)
def _range_bounds(r, R, hp):
    """Units [u0, u1) of range r of R: multiples of UNIT_ALIGN, as even as that allows."""
    blocks = hp // UNIT_ALIGN
    return (blocks * r // R) * UNIT_ALIGN, (blocks * (r + 1) // R) * UNIT_ALIGN


@njit(inline="always", **_FLAGS)
def _is_common(wbuf, meta):
    """The common case: float32, Sigmoid/Tanh/Tanh, no peephole, clip or coupling."""
    return (meta[M_GENERAL] == 0 and meta[M_APPROX] != 0 and meta[M_PEEP] == 0
            and meta[M_COUPLED] == 0 and wbuf[W_CLIP] == 0)


@njit(**_FLAGS)
def _epilogue_common(gi, gf, gg, go, c, m, half):
    """:func:`_epilogue` in the common case (:func:`_is_common`): branch-free loops that LLVM
    vectorises, called with seven arguments (the general function's fourteen cost about 40 ns
    a call to pass: 2.75 against 2.15 us for 16 streams x 64 units).

    Two passes: the four gate activations in place (gi, gf, gg, go are scratch), then the cell.
    In one pass, each vector of units was a chain of five dependent rational tanh's (two
    after the cell's FMA), which left the out-of-order core waiting on latency: 16 streams x
    256 units, 2.32 -> 1.83 ns a unit with 8-lane (Haswell) code, 1.58 -> 1.50 with 16-lane.
    The same operations on the same values (each expression has one product to fuse), so the
    same bits."""
    for u in range(c.shape[0]):
        gi[u] = half * _tanh_f32(half * gi[u]) + half
        gf[u] = half * _tanh_f32(half * gf[u]) + half
        gg[u] = _tanh_f32(gg[u])
        go[u] = half * _tanh_f32(half * go[u]) + half
    for u in range(c.shape[0]):
        cn = _fma(gf[u], c[u], gi[u] * gg[u])  # one fusion, the same everywhere (_fma)
        c[u] = cn
        m[u] = go[u] * _tanh_f32(cn)


@njit(**_FLAGS)
def _epilogue(gi, gf, gg, go, c, m, peep, u0, hp, wbuf, meta, fpar, rec, frec):
    """Gate activations and cell update for the n units u0 .. u0+n-1.

    gi, gf, gg, go (n,) the pre-activations of gates i, f, g, o of these units; c (n,) their cell
    state, updated in place; m (n,) <- o * h_act(c_new); peep (3*Hp,) peepholes i, f, o of the
    layer. Contiguous (n,) views and a loop bound from their own shape: what LLVM vectorises
    best (measured 0.2 us of a 2.5 us step at H=64 against indexing one (C,) row by offsets).
    """
    n = c.shape[0]
    half = wbuf[W_HALF]
    one = wbuf[W_ONE]
    clip = wbuf[W_CLIP]
    approx = meta[M_APPROX] != 0
    has_peep = meta[M_PEEP] != 0
    coupled = meta[M_COUPLED] != 0
    if _is_common(wbuf, meta):
        _epilogue_common(gi, gf, gg, go, c, m, half)
        return
    if meta[M_GENERAL] == 0:
        # Default activations with peepholes, clip, coupling or float64: no per-element dispatch.
        for u in range(n):
            ai = gi[u]
            af = gf[u]
            ag = gg[u]
            ao = go[u]
            cp = c[u]
            if has_peep:
                ai += peep[u0 + u] * cp
                af += peep[hp + u0 + u] * cp
            if clip > 0:
                ai = _clip(ai, clip)
                af = _clip(af, clip)
                ag = _clip(ag, clip)
            i = _sigmoid(ai, half, approx)
            f = one - i if coupled else _sigmoid(af, half, approx)
            cn = _fma(f, cp, i * _tanh(ag, approx))
            if has_peep:
                ao += peep[2 * hp + u0 + u] * cn
            if clip > 0:
                ao = _clip(ao, clip)
            c[u] = cn
            m[u] = _sigmoid(ao, half, approx) * _tanh(cn, approx)
        return
    cf = meta[rec + LD_ACT]
    cg = meta[rec + LD_ACT + 1]
    ch = meta[rec + LD_ACT + 2]
    af_, bf_ = fpar[frec], fpar[frec + 1]
    ag_, bg_ = fpar[frec + 2], fpar[frec + 3]
    ah_, bh_ = fpar[frec + 4], fpar[frec + 5]
    for u in range(n):
        ai = gi[u]
        af = gf[u]
        ag = gg[u]
        ao = go[u]
        cp = c[u]
        if has_peep:
            ai += peep[u0 + u] * cp
            af += peep[hp + u0 + u] * cp
        if clip > 0:
            ai = _clip(ai, clip)
            af = _clip(af, clip)
            ag = _clip(ag, clip)
        i = _act(cf, af_, bf_, ai, half, approx)
        f = 1 - i if coupled else _act(cf, af_, bf_, af, half, approx)
        cn = _fma(f, cp, i * _act(cg, ag_, bg_, ag, half, approx))
        if has_peep:
            ao += peep[2 * hp + u0 + u] * cn
        if clip > 0:
            ao = _clip(ao, clip)
        c[u] = cn
        m[u] = _act(cf, af_, bf_, ao, half, approx) * _act(ch, ah_, bh_, cn, half, approx)


@njit(inline="always", **_FLAGS)
def _cells(a, c, m, peep, u0, u1, hp, wbuf, meta, fpar, rec, frec):
    """The epilogue of units [u0, u1) from one stream's gate row a (C,), cell row c (Hp,) and m (Hp,)."""
    if _is_common(wbuf, meta):
        _epilogue_common(a[u0:u1], a[hp + u0 : hp + u1], a[2 * hp + u0 : 2 * hp + u1],
                         a[3 * hp + u0 : 3 * hp + u1], c[u0:u1], m[u0:u1], wbuf[W_HALF])
        return
    _epilogue(a[u0:u1], a[hp + u0 : hp + u1], a[2 * hp + u0 : 2 * hp + u1], a[3 * hp + u0 : 3 * hp + u1],
              c[u0:u1], m[u0:u1], peep, u0, hp, wbuf, meta, fpar, rec, frec)


@njit(**_FLAGS)
def _load_z(l, s, x, sbuf, meta, N):
    """z[s] (K_l,) <- [input of layer l | h[l, s]] for stream s; x (N*I,); z is (N, K_l)."""
    K = meta[M_LD + l * LD_STRIDE + LD_K]
    h_off, c_off, z_off, acc_off, m_off, _end = _sbuf_offsets(meta, N)
    _fill_z(l, s, x, sbuf, meta, N, sbuf[z_off + s * K : z_off + (s + 1) * K])


@njit(inline="always", **_FLAGS)
def _fill_z(l, s, x, sbuf, meta, N, z):
    """z (K_l,) <- [input of layer l | h[l, s]] for stream s; x (N*I,)."""
    out = meta[M_OUT]
    h_off = _sbuf_offsets(meta, N)[0]
    # every copy between views indexed from 0: an offset index (x[s * kin + k]) carries Numba's
    # negative-index wraparound and stays scalar (64 streams at (128,256,2): 36 -> 5 us a step)
    if l == 0:
        kin = meta[M_I]
        src = x[s * kin : (s + 1) * kin]
    else:
        kin = out
        src = sbuf[h_off + ((l - 1) * N + s) * out : h_off + ((l - 1) * N + s + 1) * out]
    zin = z[:kin]
    for k in range(kin):
        zin[k] = src[k]
    hl = sbuf[h_off + (l * N + s) * out : h_off + (l * N + s + 1) * out]
    zh = z[kin : kin + out]
    for k in range(out):
        zh[k] = hl[k]


@njit(**_FLAGS)
def _layer_product(r, R, l, N, wbuf, meta, sbuf):
    """Task r of R: acc <- bias + W^T z over the panels of range r, for all N streams of layer l.
    A range of panels is one contiguous stretch of W: each thread streams its own part once."""
    C = meta[M_C]
    n = C // PANEL
    p0, p1 = _panel_bounds(r, R, n)
    rec = M_LD + l * LD_STRIDE
    K = meta[rec + LD_K]
    h_off, c_off, z_off, acc_off, m_off, _end = _sbuf_offsets(meta, N)
    bias = wbuf[meta[rec + LD_B] : meta[rec + LD_B] + C]  # (C,)
    A = sbuf[acc_off : acc_off + N * C].reshape((N, C))  # (N, C) gate pre-activations
    c0, c1 = p0 * PANEL, p1 * PANEL
    b = bias[c0:c1]  # (c1-c0,) 1-D views: a loop bound from their own shape vectorises
    for s in range(N):
        a = A[s, c0:c1]
        for j in range(b.shape[0]):
            a[j] = b[j]
    Wp = wbuf[meta[rec + LD_W] : meta[rec + LD_W] + K * C].reshape((n, K, PANEL))  # panels
    Z = sbuf[z_off : z_off + N * K].reshape((N, K))  # (N, K) [input | h_prev] per stream
    _range_product(Z, Wp, A, r, R, p0, p1, 0, K, False)


@njit(**_FLAGS)
def _group_cells(q, R, l, N, wbuf, meta, fpar, sbuf):
    """Task q = (stream group g, unit range r): the cell updates of units [u0, u1) of the streams
    4g .. 4g+3 of layer l, from acc (all four gates of those units)."""
    C, hp = meta[M_C], meta[M_HP]
    g = q // R
    u0, u1 = _range_bounds(q % R, R, hp)
    rec = M_LD + l * LD_STRIDE
    h_off, c_off, z_off, acc_off, m_off, _end = _sbuf_offsets(meta, N)
    peep = wbuf[meta[rec + LD_PEEP] : meta[rec + LD_PEEP] + 3 * hp]  # (3*Hp,) if the model has them
    for s in range(4 * g, min(4 * g + 4, N)):
        a = sbuf[acc_off + s * C : acc_off + (s + 1) * C]  # (C,)
        c = sbuf[c_off + (l * N + s) * hp : c_off + (l * N + s + 1) * hp]  # (Hp,)
        m = sbuf[m_off + s * hp : m_off + (s + 1) * hp]  # (Hp,)
        _cells(a, c, m, peep, u0, u1, hp, wbuf, meta, fpar, rec, F_LD + l * F_STRIDE)


@njit(**_FLAGS)
def _project(m, wbuf, off, hp, P, h):
    """h (P,) <- W_hr @ m, with W_hr stored transposed at wbuf[off] as (Hp, P)."""
    for j in range(P):
        h[j] = 0
    W = wbuf[off : off + hp * P].reshape((hp, P))
    _axpy_rows(W, m, h)


@njit(**_FLAGS)
def _finish_layer(l, s, wbuf, meta, sbuf, N):
    """h[l, s] <- projection of m[s], or its first H units."""
    out, hp, P, H = meta[M_OUT], meta[M_HP], meta[M_P], meta[M_H]
    h_off, c_off, z_off, acc_off, m_off, _end = _sbuf_offsets(meta, N)
    h = sbuf[h_off + (l * N + s) * out : h_off + (l * N + s + 1) * out]
    m = sbuf[m_off + s * hp : m_off + (s + 1) * hp]
    if P > 0:
        _project(m, wbuf, meta[M_LD + l * LD_STRIDE + LD_HR], hp, P, h)
    else:
        for j in range(H):
            h[j] = m[j]


@njit(**_FLAGS)
def _emit(s, wbuf, meta, sbuf, N, y):
    """y[s] <- head(h[L-1, s]) or h[L-1, s]; y (N*O,) or (N*out,), stream-major."""
    L, out = meta[M_L], meta[M_OUT]
    O = meta[M_HEAD_O]
    h_off = 0
    h = sbuf[h_off + ((L - 1) * N + s) * out : h_off + ((L - 1) * N + s + 1) * out]
    if O > 0:
        hb = meta[M_HEAD_B]
        for j in range(O):
            y[s * O + j] = wbuf[hb + j]
        hw = meta[M_HEAD_W]
        _axpy_rows(wbuf[hw : hw + out * O].reshape((out, O)), h, y[s * O : (s + 1) * O])
    else:
        ys = y[s * out : (s + 1) * out]  # indexed from 0 (see _load_z)
        for j in range(out):
            ys[j] = h[j]


@njit(**_FLAGS)
def head_rows(Y, wbuf, meta, Z):
    """Z[m] (O,) <- head(Y[m]) for every row of Y (M, D*out): the linear head as a stream's step
    applies it (:func:`_emit`: from the bias, rows of head_w in ascending order), so ``run``'s
    outputs keep a stream's bits. Z (M, O)."""
    O, F = meta[M_HEAD_O], Y.shape[1]
    hb, hw = meta[M_HEAD_B], meta[M_HEAD_W]
    W = wbuf[hw : hw + F * O].reshape((F, O))  # (D*out, O)
    b = wbuf[hb : hb + O]  # (O,)
    for m in range(Y.shape[0]):
        z = Z[m]
        for j in range(O):
            z[j] = b[j]
        _axpy_rows(W, Y[m], z)


# ---------------------------------------------------------------------------------------------
# Streaming: one step of the whole stack for N streams
# ---------------------------------------------------------------------------------------------
@njit(**_FLAGS)
def stack_step_serial(x, wbuf, meta, fpar, sbuf, y):
    """One step. x (N*I,) inputs, stream-major; sbuf the streams' state and scratch (updated);
    y (N*O,) outputs (O = head size, or out). Flat x and y: a single stream passes its (I,) input
    and a fresh (out,) output with no reshape on the Python side. All N streams share one pass
    over each layer's panels (:func:`_product`); one stream's result is bit-identical whatever
    N is. Also the step for the user's own ``@numba.njit`` code: ``stream.numba_args()`` gives
    ``(wbuf, meta, fpar, sbuf)``."""
    N = x.shape[0] // meta[M_I]
    for l in range(meta[M_L]):
        for s in range(N):
            _load_z(l, s, x, sbuf, meta, N)
        _layer_product(0, 1, l, N, wbuf, meta, sbuf)
        for g in range((N + 3) // 4):  # one unit range: all units
            _group_cells(g, 1, l, N, wbuf, meta, fpar, sbuf)
        for s in range(N):
            _finish_layer(l, s, wbuf, meta, sbuf, N)
    for s in range(N):
        _emit(s, wbuf, meta, sbuf, N, y)


@njit(parallel=True, **_FLAGS)
def stack_step_parallel(x, R, wbuf, meta, fpar, sbuf, y):
    """The parallel twin of :func:`stack_step_serial`: same arithmetic, prange over R panel
    ranges (the product) and then over (stream group, unit range) tasks (the cells); R follows
    the thread count (``layout.unit_ranges``), the bits do not. R is an argument, not
    ``numba.get_num_threads()`` read here: that call is a ctypes pointer, which would keep Numba
    from caching the kernel."""
    N = x.shape[0] // meta[M_I]
    tasks = ((N + 3) // 4) * R
    for l in range(meta[M_L]):
        for s in range(N):
            _load_z(l, s, x, sbuf, meta, N)
        for r in prange(R):  # panel ranges: each thread streams its own part of W
            _layer_product(r, R, l, N, wbuf, meta, sbuf)
        for q in prange(tasks):  # unit ranges: all four gates of a unit are there now
            _group_cells(q, R, l, N, wbuf, meta, fpar, sbuf)
        for s in range(N):
            _finish_layer(l, s, wbuf, meta, sbuf, N)
    for s in range(N):
        _emit(s, wbuf, meta, sbuf, N, y)


@njit(**_FLAGS)
def _streams_product(l, N, s0, s1, zb, wbuf, meta, sbuf):
    """:func:`_layer_product` over all panels for the streams s0 .. s1 of N only: acc[s] <-
    bias + W^T z[s], their z rows (s1-s0, K_l) at sbuf[zb:]. The same chain per element as
    any other stream count, so the same bits."""
    C = meta[M_C]
    rec = M_LD + l * LD_STRIDE
    K = meta[rec + LD_K]
    h_off, c_off, z_off, acc_off, m_off, _end = _sbuf_offsets(meta, N)
    bias = wbuf[meta[rec + LD_B] : meta[rec + LD_B] + C]  # (C,)
    A = sbuf[acc_off + s0 * C : acc_off + s1 * C].reshape((s1 - s0, C))  # (s1-s0, C)
    for s in range(s1 - s0):
        a = A[s]
        for j in range(C):
            a[j] = bias[j]
    Wp = wbuf[meta[rec + LD_W] : meta[rec + LD_W] + K * C].reshape((C // PANEL, K, PANEL))  # panels
    Z = sbuf[zb : zb + (s1 - s0) * K].reshape((s1 - s0, K))  # (s1-s0, K)
    _product(Z, Wp, A, 0, Wp.shape[0], 0, K)


@njit(parallel=True, **_FLAGS)
def stack_step_split(x, SG, wbuf, meta, fpar, sbuf, y):
    """:func:`stack_step_serial` with the N streams in SG groups of whole groups of four, each
    group on one thread for the whole step (every layer's product and cells): one parallel
    region per step, and the threads never wait for each other (:func:`stack_step_parallel`
    opens two per layer, and its threads wait at the end of each). Streams are independent, so
    this is the serial arithmetic stream by stream: the same bits.

    The z scratch is (N, K_l) for layer l, so its rows move when K_l does: a group running
    layer 1 would overwrite rows of the next group still in layer 0. Each group keeps its z
    rows inside its own stretch, [s0 * Kmax, s1 * Kmax) of the z block (tests/test_team.py
    runs layers of different widths)."""
    N = x.shape[0] // meta[M_I]
    G = (N + 3) // 4  # groups of four streams (the cells' unit of work)
    z_off = _sbuf_offsets(meta, N)[2]
    for gi in prange(SG):
        g0, g1 = G * gi // SG, G * (gi + 1) // SG
        s0, s1 = 4 * g0, min(4 * g1, N)
        zb = z_off + s0 * meta[M_KMAX]  # this group's z rows (s1-s0, K_l), for every layer
        for l in range(meta[M_L]):
            K = meta[M_LD + l * LD_STRIDE + LD_K]
            for s in range(s0, s1):
                _fill_z(l, s, x, sbuf, meta, N, sbuf[zb + (s - s0) * K : zb + (s - s0 + 1) * K])
            _streams_product(l, N, s0, s1, zb, wbuf, meta, sbuf)
            for g in range(g0, g1):
                _group_cells(g, 1, l, N, wbuf, meta, fpar, sbuf)
            for s in range(s0, s1):
                _finish_layer(l, s, wbuf, meta, sbuf, N)
        for s in range(s0, s1):
            _emit(s, wbuf, meta, sbuf, N, y)


@njit(**_FLAGS)
def stack_run_split(xs, SG, wbuf, meta, fpar, sbuf, ys):
    """T steps in one call with the split step kernel."""
    for t in range(xs.shape[0]):
        stack_step_split(xs[t], SG, wbuf, meta, fpar, sbuf, ys[t])


@njit(**_FLAGS)
def stack_run_serial(xs, wbuf, meta, fpar, sbuf, ys):
    """T steps in one call: xs (T, N*I) -> ys (T, N*O); the state carries over."""
    for t in range(xs.shape[0]):
        stack_step_serial(xs[t], wbuf, meta, fpar, sbuf, ys[t])


@njit(**_FLAGS)
def stack_run_parallel(xs, R, wbuf, meta, fpar, sbuf, ys):
    """T steps in one call with the parallel step kernel."""
    for t in range(xs.shape[0]):
        stack_step_parallel(xs[t], R, wbuf, meta, fpar, sbuf, ys[t])


# ---------------------------------------------------------------------------------------------
# Whole sequences: the recurrent part of one layer and direction
# ---------------------------------------------------------------------------------------------
@njit(**_FLAGS)
def _seq_product(r, R, t, l, d, xp, wbuf, meta, h, acc):
    """Task r of R at time t: acc[s] (C,) <- xp[t, s] + W_rec^T h[s] over the panels of range r,
    for all B streams (recurrent rows only; xp holds bias + the input projection, and the
    recurrent rows continue its chains)."""
    C, out, D = meta[M_C], meta[M_OUT], meta[M_D]
    n = C // PANEL
    B = h.shape[0]
    p0, p1 = _panel_bounds(r, R, n)
    rec = M_LD + (l * D + d) * LD_STRIDE
    c0, c1 = p0 * PANEL, p1 * PANEL
    for s in range(B):
        a = acc[s, c0:c1]  # (c1-c0,) 1-D views: a loop bound from their own shape vectorises
        xr = xp[t, s, c0:c1]
        for j in range(xr.shape[0]):
            a[j] = xr[j]
    K = meta[rec + LD_K]
    Wp = wbuf[meta[rec + LD_W] : meta[rec + LD_W] + K * C].reshape((n, K, PANEL))  # panels
    # the recurrent rows K-out .. K, the panels last first at odd t (see _product_down)
    _range_product(h, Wp, acc, r, R, p0, p1, K - out, K, t % 2 == 1)


@njit(**_FLAGS)
def _input_product(r, R, X, wbuf, meta, l, d, xp):
    """Task r of R: xp (M, C) <- bias + X (M, kin) @ the input rows of layer l, direction d's
    W, over the panels of range r: each element the chain a stream's step starts with, which
    the sequence kernels continue over the recurrent rows."""
    C, D = meta[M_C], meta[M_D]
    n = C // PANEL
    p0, p1 = _panel_bounds(r, R, n)
    rec = M_LD + (l * D + d) * LD_STRIDE
    K = meta[rec + LD_K]
    bias = wbuf[meta[rec + LD_B] : meta[rec + LD_B] + C]  # (C,)
    Wp = wbuf[meta[rec + LD_W] : meta[rec + LD_W] + K * C].reshape((n, K, PANEL))  # panels
    if R == 1:  # constant bounds, as in _range_product
        _projection(X, Wp, bias, xp, 0, Wp.shape[0])
    else:
        _projection(X, Wp, bias, xp, p0, p1)


@njit(**_FLAGS)
def input_projection_serial(X, wbuf, meta, l, d, xp):
    """xp (M, C) <- X (M, kin) @ W[:kin] of layer l, direction d: the input projection of a
    whole sequence (M = T*B rows) in one pass over W's panels."""
    _input_product(0, 1, X, wbuf, meta, l, d, xp)


@njit(parallel=True, **_FLAGS)
def input_projection_parallel(X, R, wbuf, meta, l, d, xp):
    """The parallel twin of :func:`input_projection_serial`: prange over R ranges of rows, each
    thread reading all of W and writing its own contiguous rows of xp. (Split by panel ranges,
    the threads' writes alternated within every row of xp, and two threads took 1.8x as long as
    one at C = 256: 263 vs 148 us for 1,024 rows; by rows, 77 us.) Rows are independent: the
    bits do not depend on R."""
    M = X.shape[0]
    for r in prange(R):
        m0, m1 = M * r // R, M * (r + 1) // R
        _input_product(0, 1, X[m0:m1], wbuf, meta, l, d, xp[m0:m1])


@njit(**_FLAGS)
def _seq_cells(q, R, t, l, d, wbuf, meta, fpar, lengths, c, acc, mb):
    """Task q = (stream group g, unit range r) at time t: c[s] and mb[s] = o * h_act(c) of units
    [u0, u1), for the group's streams still inside their sequence."""
    hp, D = meta[M_HP], meta[M_D]
    B = c.shape[0]
    g = q // R
    u0, u1 = _range_bounds(q % R, R, hp)
    rec = M_LD + (l * D + d) * LD_STRIDE
    peep = wbuf[meta[rec + LD_PEEP] : meta[rec + LD_PEEP] + 3 * hp]  # (3*Hp,) if the model has them
    for s in range(4 * g, min(4 * g + 4, B)):
        if t < lengths[s]:
            _cells(acc[s], c[s], mb[s], peep, u0, u1, hp, wbuf, meta, fpar, rec,
                   F_LD + (l * D + d) * F_STRIDE)


@njit(**_FLAGS)
def _seq_finish(t, s, l, d, wbuf, meta, h, y, mb):
    """h[s] <- projection of mb[s], or its first H units; y[t, s, d*out:(d+1)*out] <- h[s]."""
    out, P, D = meta[M_OUT], meta[M_P], meta[M_D]
    if P > 0:
        _project(mb[s], wbuf, meta[M_LD + (l * D + d) * LD_STRIDE + LD_HR], meta[M_HP], P, h[s])
    hs = h[s]  # (out,) 1-D views indexed from 0 (see _load_z)
    if P == 0:
        ms = mb[s]
        for j in range(out):
            hs[j] = ms[j]
    ys = y[t, s, d * out : (d + 1) * out]
    for j in range(out):
        ys[j] = hs[j]


@njit(**_FLAGS)
def _zero_past(lengths, d, out, y):
    """y[t, s, d*out:(d+1)*out] <- 0 for every step t past sequence s's length."""
    T, B = y.shape[0], y.shape[1]
    for s in range(B):
        for t in range(max(0, lengths[s]), T):
            ys = y[t, s, d * out : (d + 1) * out]
            for j in range(out):
                ys[j] = 0


@njit(**_FLAGS)
def _cells_rows(A3, C2, M2, s, half):
    """:func:`_epilogue_common` of stream s, indexing A3 (B, 4, Hp) (gates i, f, g, o; scratch,
    overwritten by the activations), C2 and M2 (B, Hp) directly instead of through (Hp,) views:
    the same arithmetic in the same order, so the same bits, without a view's reference-count
    updates."""
    for u in range(C2.shape[1]):
        A3[s, 0, u] = half * _tanh_f32(half * A3[s, 0, u]) + half
        A3[s, 1, u] = half * _tanh_f32(half * A3[s, 1, u]) + half
        A3[s, 2, u] = _tanh_f32(A3[s, 2, u])
        A3[s, 3, u] = half * _tanh_f32(half * A3[s, 3, u]) + half
    for u in range(C2.shape[1]):
        cn = _fma(A3[s, 1, u], C2[s, u], A3[s, 0, u] * A3[s, 2, u])  # one fusion (_fma)
        C2[s, u] = cn
        M2[s, u] = A3[s, 3, u] * _tanh_f32(cn)


@njit(**_FLAGS)
def _seq_common(xp, wbuf, meta, l, d, lengths, h, c, y, acc, mb):
    """:func:`layer_sequence_serial` for a model in the common case (:func:`_is_common`)
    without projection: the same product, cell update and copies in the same order (so the
    same bits), with the views made once per call instead of per stream and step. Each view of
    an array updates its reference count (two atomic operations): at (32,64,1) about 0.1 us of
    a 0.94 us step for one stream, and a dozen views per stream and step. Arguments as there."""
    T, B = xp.shape[0], xp.shape[1]
    C, hp, out, D = meta[M_C], meta[M_HP], meta[M_OUT], meta[M_D]
    n_panels = C // PANEL
    rec = M_LD + (l * D + d) * LD_STRIDE
    K = meta[rec + LD_K]
    Wp = wbuf[meta[rec + LD_W] : meta[rec + LD_W] + K * C].reshape((n_panels, K, PANEL))  # panels
    half = wbuf[W_HALF]
    A3 = acc.reshape((B, 4, hp))  # (B, 4, Hp) gates i, f, g, o per stream
    y4 = y.reshape((T, B, D, out))  # (T, B, D, out)
    backward = d == 1 or meta[M_REVERSE] != 0
    n = 0  # steps to run: the longest sequence's (shorter ones skip their cells past the end)
    for s in range(B):
        n = max(n, min(max(lengths[s], 0), T))
    for step in range(T):
        t = T - 1 - step if backward else step
        if t >= n:
            continue  # no sequence is inside: nothing to compute
        for s in range(B):
            for j in range(C):
                acc[s, j] = xp[t, s, j]  # bias + the input rows' chain (_input_product)
        # h (B, out): the recurrent rows, the panels last first at odd t (see _product_down)
        if t % 2 == 1:
            _product_down(h, Wp, acc, 0, n_panels, K - out, K)
        else:
            _product(h, Wp, acc, 0, n_panels, K - out, K)
        for s in range(B):
            if t < lengths[s]:
                _cells_rows(A3, c, mb, s, half)
                for j in range(out):
                    h[s, j] = mb[s, j]
                    y4[t, s, d, j] = mb[s, j]


@njit(**_FLAGS)
def layer_sequence_serial(xp, R, wbuf, meta, fpar, l, d, lengths, h, c, y, acc, mb):
    """Run layer l, direction d over a sequence of B streams in one call.

    xp (T, B, C) input projections (no bias), in W's column order; lengths (B,) valid steps
    per sequence; h (B, out), c (B, Hp) the state, updated in place; y (T, B, D*out) the layer's
    outputs, direction d writing columns d*out:(d+1)*out (zeros at steps past a sequence's
    length: the kernel writes every element of its columns, so y may come uninitialised);
    acc (B, C) and mb (B, Hp) scratch.
    Direction 1 (or a REVERSE model) runs backwards from each sequence's last valid step.
    All B streams share one pass over the recurrent rows of each panel per step (:func:`_product`),
    with the float order of a single stream: results do not depend on B (nor on R).
    """
    T, B = xp.shape[0], xp.shape[1]
    _zero_past(lengths, d, meta[M_OUT], y)
    if meta[M_P] == 0 and _is_common(wbuf, meta):
        _seq_common(xp, wbuf, meta, l, d, lengths, h, c, y, acc, mb)
        return
    for step in range(T):
        t = T - 1 - step if (d == 1 or meta[M_REVERSE] != 0) else step
        _seq_product(0, 1, t, l, d, xp, wbuf, meta, h, acc)
        for g in range((B + 3) // 4):
            _seq_cells(g, 1, t, l, d, wbuf, meta, fpar, lengths, c, acc, mb)
        for s in range(B):
            if t < lengths[s]:
                _seq_finish(t, s, l, d, wbuf, meta, h, y, mb)


@njit(**_FLAGS)
def _seq_cells_finish(q, R, t, l, d, wbuf, meta, fpar, lengths, h, c, y, acc, mb):
    """:func:`_seq_cells` of task q, then, for a model without projection, h[s] and y[t, s] of
    the same units (a copy of mb[s]'s, as :func:`_seq_finish` makes it)."""
    _seq_cells(q, R, t, l, d, wbuf, meta, fpar, lengths, c, acc, mb)
    if meta[M_P] > 0:
        return
    out, D = meta[M_OUT], meta[M_D]
    B = c.shape[0]
    g = q // R
    u0, u1 = _range_bounds(q % R, R, meta[M_HP])
    u1 = min(u1, out)
    for s in range(4 * g, min(4 * g + 4, B)):
        if t < lengths[s] and u0 < u1:
            ms = mb[s, u0:u1]  # 1-D views indexed from 0 (see _load_z)
            hs = h[s, u0:u1]
            ys = y[t, s, d * out + u0 : d * out + u1]
            for j in range(u1 - u0):
                hs[j] = ms[j]
                ys[j] = ms[j]


@njit(**_FLAGS)
def _team_member(p, P, RA, RB, xp, wbuf, meta, fpar, l, d, lengths, h, c, y, acc, mb, sync):
    """Participant p of P of :func:`layer_sequence_parallel` (see ``team.py``). Per time step:
    phase A, RA tasks (panel ranges of the product); phase B, groups x RB tasks (cells, and h
    and y when there is no projection); phase C, one task per stream (the projection) if the
    model has one. Participant p first runs the tasks j = p, p + P, ... of each list (the same
    ones every step), then any still unclaimed."""
    T, B = xp.shape[0], xp.shape[1]
    if p == 0:
        _zero_past(lengths, d, meta[M_OUT], y)  # read by nobody inside the region
    nA = RA
    nB = ((B + 3) // 4) * RB
    nC = B if meta[M_P] > 0 else 0
    per_step = nA + nB + nC
    for step in range(T):
        t = T - 1 - step if (d == 1 or meta[M_REVERSE] != 0) else step
        done0 = step * per_step
        for sweep in range(2):  # own tasks, then the rest
            for j in range(p if sweep == 0 else 0, nA, P if sweep == 0 else 1):
                if claim(sync, 0, j, step):
                    _seq_product(j, RA, t, l, d, xp, wbuf, meta, h, acc)
                    finished(sync)
        wait_done(sync, done0 + nA)
        for sweep in range(2):
            for j in range(p if sweep == 0 else 0, nB, P if sweep == 0 else 1):
                if claim(sync, nA, j, step):
                    _seq_cells_finish(j, RB, t, l, d, wbuf, meta, fpar, lengths, h, c, y, acc, mb)
                    finished(sync)
        wait_done(sync, done0 + nA + nB)
        if nC > 0:
            for sweep in range(2):
                for j in range(p if sweep == 0 else 0, nC, P if sweep == 0 else 1):
                    if claim(sync, nA + nB, j, step):
                        if t < lengths[j]:
                            _seq_finish(t, j, l, d, wbuf, meta, h, y, mb)
                        finished(sync)
            wait_done(sync, done0 + per_step)


@njit(parallel=True, **_FLAGS)
def layer_sequence_parallel(xp, P, RA, RB, wbuf, meta, fpar, l, d, lengths, h, c, y, acc, mb,
                            sync):
    """The parallel twin of :func:`layer_sequence_serial` (same arguments, plus): one parallel
    region for the whole sequence, a team of P participants (``team.py``) walking the time
    steps together: RA panel ranges of the product, then (stream group, RB unit ranges) tasks
    of the cells, waiting on ``sync`` (int64, ``team.sync_size`` of all their tasks, zeroed)
    between phases. Every element is computed by one task in the serial kernel's float order:
    the bits do not depend on P, RA or RB."""
    for p in prange(P):
        _team_member(p, P, RA, RB, xp, wbuf, meta, fpar, l, d, lengths, h, c, y, acc, mb, sync)


@njit(**_FLAGS)
def _group_run(X3, s0, s1, Tc, wbuf, meta, fpar, l, d, lengths, h, c, y, acc, mb):
    """Layer l, direction d for the sequences s0 .. s1-1 of X3 (T, B, kin), as the serial path
    of ``model.run`` does it: chunks of Tc steps, each chunk's inputs copied together, projected
    into the group's own buffer and run through :func:`layer_sequence_serial` (so the same bits).
    h, c, y, acc, mb as there, for all B sequences (the group writes its own rows)."""
    T, kin, C = X3.shape[0], X3.shape[2], meta[M_C]
    G = s1 - s0
    xg = np.empty((Tc * G, kin), X3.dtype)  # (Tc*G, kin) a chunk's inputs, time-major
    xpg = np.empty((Tc, G, C), X3.dtype)  # (Tc, G, C) their projections
    clens = np.empty(G, np.int64)  # (G,) lengths in chunk time
    # The group's state and scratch in its own buffers: rows of the shared (B, ·) arrays meet
    # other groups' rows inside a cache line, which two threads writing every step pass back
    # and forth (measured at (32,64,1) B=16, 2 groups: 7.9 us per step, 5.3 alone)
    hg = h[s0:s1].copy()  # (G, out)
    cg = c[s0:s1].copy()  # (G, Hp)
    accg = np.empty((G, C), acc.dtype)  # (G, C)
    mbg = np.empty((G, mb.shape[1]), mb.dtype)  # (G, Hp)
    # ... and its outputs too: the serial kernel then gets C-contiguous arrays only, the very
    # types of the serial path, so it is the same compiled function (y[:, s0:s1] would be a
    # strided view: another specialisation, which LLVM may contract into FMAs differently)
    out = meta[M_OUT]
    yg = np.empty((Tc, G, y.shape[2]), y.dtype)  # (Tc, G, D*out), direction d's columns used
    backward = d == 1 or meta[M_REVERSE] != 0
    chunks = (T + Tc - 1) // Tc
    for i in range(chunks):
        t0 = (chunks - 1 - i if backward else i) * Tc
        n = min(T, t0 + Tc) - t0
        for t in range(n):
            for s in range(G):
                src = X3[t0 + t, s0 + s]
                dst = xg[t * G + s]
                for k in range(kin):
                    dst[k] = src[k]
        part = xpg[:n]
        input_projection_serial(xg[: n * G], wbuf, meta, l, d, part.reshape((n * G, C)))
        for s in range(G):
            clens[s] = min(max(lengths[s0 + s] - t0, 0), n)
        layer_sequence_serial(part, 1, wbuf, meta, fpar, l, d, clens, hg, cg, yg[:n], accg, mbg)
        for t in range(n):
            for s in range(G):
                src = yg[t, s, d * out : (d + 1) * out]
                dst = y[t0 + t, s0 + s, d * out : (d + 1) * out]
                for j in range(out):
                    dst[j] = src[j]
    h[s0:s1] = hg
    c[s0:s1] = cg


@njit(parallel=True, **_FLAGS)
def layer_run_split(X3, SG, Tc, wbuf, meta, fpar, l, d, lengths, h, c, y, acc, mb):
    """Layer l, direction d of ``model.run`` for B sequences X3 (T, B, kin) in SG stream groups,
    one per iteration (:func:`_group_run`, chunks of Tc steps): input projection and recurrence
    together. Streams never read each other's state, so nothing is shared and nobody waits;
    each thread writes only its own streams' rows. Bit-identical to the serial path."""
    B = X3.shape[1]
    for g in prange(SG):
        _group_run(X3, B * g // SG, B * (g + 1) // SG, Tc, wbuf, meta, fpar, l, d, lengths, h, c,
                   y, acc, mb)


# ---------------------------------------------------------------------------------------------
# The threading layer (started by _threads.launch, never by a kernel call in the host's threads)
# ---------------------------------------------------------------------------------------------
_layer_lock = threading.Lock()
_workqueue_lock = threading.Lock()
_layer = None


def threading_layer() -> str:
    """The threading layer Numba loaded ("omp", "tbb" or "workqueue"); loads it if needed."""
    global _layer
    _threads.launch()  # starts the layer, if needed, without touching the host's OpenMP settings
    if _layer is None:
        with _layer_lock:
            if _layer is None:
                _layer = numba.threading_layer()
    return _layer


def parallel_guard():
    """A context manager for calling a parallel kernel: a lock under ``workqueue`` (which aborts
    the process when two threads enter a parallel region at once), else nothing."""
    if threading_layer() == "workqueue":
        return _workqueue_lock
    return nullcontext()
