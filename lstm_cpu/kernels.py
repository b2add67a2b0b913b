"""Numba kernels. Plain functions over arrays and scalars; they trust their callers.

The Python API (``model.py``) validates every shape and dtype once; nothing here checks. The packed
layout the kernels read (``wbuf``, ``meta``, ``fpar``, ``sbuf``) is defined in ``layout.py``; which
kernel runs (serial or parallel, Numba or BLAS products) is decided in ``policy.py``.

Two entry points per job, with the same arithmetic in the same order:

* ``stack_step_serial`` / ``stack_step_parallel``: one time step of the whole (unidirectional)
  stack for N streams, in one call (no Python loop over layers).
* ``layer_sequence_serial`` / ``layer_sequence_parallel``: the recurrent part of one layer and
  direction over a whole sequence, the input projection having been done as one matrix product.

Streams (or sequences of a batch) go through the gate product four at a time (``_gemm_cols``:
each weight row loaded once per four streams), with the float order of a single stream. The
parallel twins run two ``prange`` loops per layer (and time step): the product over (group of
four streams, column range) tasks, each thread streaming a contiguous part of every row of W,
then the cell updates over (group, unit range) tasks, a unit range taking the same units of all
four gates. The number of ranges is decided at run time from the thread count
(``layout.unit_ranges``), never packed. Results are
bit-identical however many threads run and however many streams share a call: every output
element is computed by exactly one thread in a fixed float order.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

import numba
import numpy as np
from numba import njit, prange

from . import _config, _threads
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
    UNIT_ALIGN,
    W_CLIP,
    W_HALF,
    W_ONE,
    sbuf_offsets,
)

# Numba's cache is keyed on this file: a layout change must change this file too (layout.py).
assert LAYOUT_VERSION == 6, "layout.py changed: update kernels.py for it and bump this number"


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
def _axpy_cols(W, z, acc, c0, c1):
    """acc[c0:c1] += (W (K, C)^T @ z (K,))[c0:c1], as K axpys over contiguous row segments.

    Four rows per pass over ``acc`` (fewer loads/stores of the accumulator); the sum order per
    column is fixed, so LLVM vectorises across columns without reassociating anything, and a
    column's result does not depend on which range [c0, c1) it was computed in. The segments are
    taken as 1-D views: indexing W[k, j] with j from a range passed in ran 3x slower inside a
    parallel region (measured at (K, C) = (1024, 2048)).
    """
    K = W.shape[0]
    n = c1 - c0
    a = acc[c0:c1]  # (n,)
    k = 0
    while k + 4 <= K:
        z0 = z[k]
        z1 = z[k + 1]
        z2 = z[k + 2]
        z3 = z[k + 3]
        w0 = W[k, c0:c1]  # (n,) row segments
        w1 = W[k + 1, c0:c1]
        w2 = W[k + 2, c0:c1]
        w3 = W[k + 3, c0:c1]
        for j in range(n):
            a[j] += w0[j] * z0 + w1[j] * z1 + w2[j] * z2 + w3[j] * z3
        k += 4
    while k < K:
        zk = z[k]
        w0 = W[k, c0:c1]
        for j in range(n):
            a[j] += w0[j] * zk
        k += 1


@njit(**_FLAGS)
def _gemm_cols(Z, W, A, c0, c1):
    """A[:, c0:c1] (N, ·) += (Z (N, K) @ W (K, C))[:, c0:c1]: :func:`_axpy_cols` for four streams
    at once.

    Each pass loads four rows of W once and applies them to four streams (4x fewer weight loads
    than four separate axpys); every element gets exactly the sums of ``_axpy_cols`` in the same
    order, so a stream's result does not depend on how many streams share the call.
    """
    N = Z.shape[0]
    K = W.shape[0]
    n = c1 - c0
    s = 0
    while s + 4 <= N:
        a0 = A[s, c0:c1]  # (n,) per stream
        a1 = A[s + 1, c0:c1]
        a2 = A[s + 2, c0:c1]
        a3 = A[s + 3, c0:c1]
        k = 0
        while k + 4 <= K:
            z00, z01, z02, z03 = Z[s, k], Z[s, k + 1], Z[s, k + 2], Z[s, k + 3]
            z10, z11, z12, z13 = Z[s + 1, k], Z[s + 1, k + 1], Z[s + 1, k + 2], Z[s + 1, k + 3]
            z20, z21, z22, z23 = Z[s + 2, k], Z[s + 2, k + 1], Z[s + 2, k + 2], Z[s + 2, k + 3]
            z30, z31, z32, z33 = Z[s + 3, k], Z[s + 3, k + 1], Z[s + 3, k + 2], Z[s + 3, k + 3]
            r0 = W[k, c0:c1]  # (n,) row segments
            r1 = W[k + 1, c0:c1]
            r2 = W[k + 2, c0:c1]
            r3 = W[k + 3, c0:c1]
            for j in range(n):
                w0 = r0[j]
                w1 = r1[j]
                w2 = r2[j]
                w3 = r3[j]
                a0[j] += w0 * z00 + w1 * z01 + w2 * z02 + w3 * z03
                a1[j] += w0 * z10 + w1 * z11 + w2 * z12 + w3 * z13
                a2[j] += w0 * z20 + w1 * z21 + w2 * z22 + w3 * z23
                a3[j] += w0 * z30 + w1 * z31 + w2 * z32 + w3 * z33
            k += 4
        while k < K:
            z0, z1, z2, z3 = Z[s, k], Z[s + 1, k], Z[s + 2, k], Z[s + 3, k]
            r0 = W[k, c0:c1]
            for j in range(n):
                w0 = r0[j]
                a0[j] += w0 * z0
                a1[j] += w0 * z1
                a2[j] += w0 * z2
                a3[j] += w0 * z3
            k += 1
        s += 4
    while s < N:
        _axpy_cols(W, Z[s], A[s], c0, c1)
        s += 1


@njit(**_FLAGS)
def _axpy_rows(W, z, acc):
    """acc (C,) += W (K, C)^T @ z (K,): :func:`_axpy_cols` over every column. The same sums in the
    same order (so the same bits); a separate function because a loop bound taken from W's own
    shape vectorises better than a range passed in (measured: 0.5 us of a 2.8 us step at H=64)."""
    K = W.shape[0]
    C = W.shape[1]
    k = 0
    while k + 4 <= K:
        z0 = z[k]
        z1 = z[k + 1]
        z2 = z[k + 2]
        z3 = z[k + 3]
        for j in range(C):
            acc[j] += W[k, j] * z0 + W[k + 1, j] * z1 + W[k + 2, j] * z2 + W[k + 3, j] * z3
        k += 4
    while k < K:
        zk = z[k]
        for j in range(C):
            acc[j] += W[k, j] * zk
        k += 1


@njit(**_FLAGS)
def _gemm_rows(Z, W, A):
    """A (N, C) += Z (N, K) @ W (K, C): :func:`_gemm_cols` over every column (see _axpy_rows)."""
    N = Z.shape[0]
    K = W.shape[0]
    C = W.shape[1]
    s = 0
    while s + 4 <= N:
        k = 0
        while k + 4 <= K:
            z00, z01, z02, z03 = Z[s, k], Z[s, k + 1], Z[s, k + 2], Z[s, k + 3]
            z10, z11, z12, z13 = Z[s + 1, k], Z[s + 1, k + 1], Z[s + 1, k + 2], Z[s + 1, k + 3]
            z20, z21, z22, z23 = Z[s + 2, k], Z[s + 2, k + 1], Z[s + 2, k + 2], Z[s + 2, k + 3]
            z30, z31, z32, z33 = Z[s + 3, k], Z[s + 3, k + 1], Z[s + 3, k + 2], Z[s + 3, k + 3]
            for j in range(C):
                w0 = W[k, j]
                w1 = W[k + 1, j]
                w2 = W[k + 2, j]
                w3 = W[k + 3, j]
                A[s, j] += w0 * z00 + w1 * z01 + w2 * z02 + w3 * z03
                A[s + 1, j] += w0 * z10 + w1 * z11 + w2 * z12 + w3 * z13
                A[s + 2, j] += w0 * z20 + w1 * z21 + w2 * z22 + w3 * z23
                A[s + 3, j] += w0 * z30 + w1 * z31 + w2 * z32 + w3 * z33
            k += 4
        while k < K:
            z0, z1, z2, z3 = Z[s, k], Z[s + 1, k], Z[s + 2, k], Z[s + 3, k]
            for j in range(C):
                w0 = W[k, j]
                A[s, j] += w0 * z0
                A[s + 1, j] += w0 * z1
                A[s + 2, j] += w0 * z2
                A[s + 3, j] += w0 * z3
            k += 1
        s += 4
    while s < N:
        _axpy_rows(W, Z[s], A[s])
        s += 1


# The stream buffer's layout, defined once in layout.py, compiled here.
_sbuf_offsets = njit(**_FLAGS)(sbuf_offsets)


@njit(inline="always", **_FLAGS)
def _range_bounds(r, R, hp):
    """Units [u0, u1) of range r of R: multiples of UNIT_ALIGN, as even as that allows."""
    blocks = hp // UNIT_ALIGN
    return (blocks * r // R) * UNIT_ALIGN, (blocks * (r + 1) // R) * UNIT_ALIGN


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
    if meta[M_GENERAL] == 0 and approx and not has_peep and not coupled and clip == 0:
        # The common case (float32, Sigmoid/Tanh/Tanh, no peephole, clip or coupling): a
        # branch-free loop that LLVM vectorises.
        for u in range(n):
            f = half * _tanh_f32(half * gf[u]) + half
            i = half * _tanh_f32(half * gi[u]) + half
            cn = f * c[u] + i * _tanh_f32(gg[u])
            c[u] = cn
            m[u] = (half * _tanh_f32(half * go[u]) + half) * _tanh_f32(cn)
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
            cn = f * cp + i * _tanh(ag, approx)
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
        cn = f * cp + i * _act(cg, ag_, bg_, ag, half, approx)
        if has_peep:
            ao += peep[2 * hp + u0 + u] * cn
        if clip > 0:
            ao = _clip(ao, clip)
        c[u] = cn
        m[u] = _act(cf, af_, bf_, ao, half, approx) * _act(ch, ah_, bh_, cn, half, approx)


@njit(inline="always", **_FLAGS)
def _cells(a, c, m, peep, u0, u1, hp, wbuf, meta, fpar, rec, frec):
    """The epilogue of units [u0, u1) from one stream's gate row a (C,), cell row c (Hp,) and m (Hp,)."""
    _epilogue(a[u0:u1], a[hp + u0 : hp + u1], a[2 * hp + u0 : 2 * hp + u1], a[3 * hp + u0 : 3 * hp + u1],
              c[u0:u1], m[u0:u1], peep, u0, hp, wbuf, meta, fpar, rec, frec)


@njit(**_FLAGS)
def _load_z(l, s, x, sbuf, meta, N):
    """z[s] (K_l,) <- [input of layer l | h[l, s]] for stream s; x (N*I,); z is (N, K_l)."""
    out = meta[M_OUT]
    K = meta[M_LD + l * LD_STRIDE + LD_K]
    h_off, c_off, z_off, acc_off, m_off, _end = _sbuf_offsets(meta, N)
    z = sbuf[z_off + s * K : z_off + (s + 1) * K]
    if l == 0:
        kin = meta[M_I]
        for k in range(kin):
            z[k] = x[s * kin + k]
    else:
        kin = out
        src = h_off + ((l - 1) * N + s) * out
        for k in range(out):
            z[k] = sbuf[src + k]
    hl = h_off + (l * N + s) * out
    for k in range(out):
        z[kin + k] = sbuf[hl + k]


@njit(**_FLAGS)
def _group_product(q, R, l, N, wbuf, meta, sbuf):
    """Task q = (stream group g, column range r), r fastest: acc <- bias + W^T z over columns
    [c0, c1) for the streams 4g .. 4g+3 of layer l. A range is contiguous in every row of W, so
    each thread streams its own part of the matrix; R == 1 is the whole row in one pass."""
    C = meta[M_C]
    g = q // R
    c0, c1 = _range_bounds(q % R, R, C)
    rec = M_LD + l * LD_STRIDE
    K = meta[rec + LD_K]
    h_off, c_off, z_off, acc_off, m_off, _end = _sbuf_offsets(meta, N)
    s0 = 4 * g
    s1 = min(s0 + 4, N)
    bias = wbuf[meta[rec + LD_B] : meta[rec + LD_B] + C]  # (C,)
    A = sbuf[acc_off + s0 * C : acc_off + s1 * C].reshape((s1 - s0, C))  # (g, C)
    for s in range(s1 - s0):
        for j in range(c0, c1):
            A[s, j] = bias[j]
    W = wbuf[meta[rec + LD_W] : meta[rec + LD_W] + K * C].reshape((K, C))  # (K, C) fused gates
    Z = sbuf[z_off + s0 * K : z_off + s1 * K].reshape((s1 - s0, K))  # (g, K) [input | h_prev]
    if R == 1:
        _gemm_rows(Z, W, A)
    else:
        _gemm_cols(Z, W, A, c0, c1)


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
        for j in range(out):
            y[s * out + j] = h[j]


# ---------------------------------------------------------------------------------------------
# Streaming: one step of the whole stack for N streams
# ---------------------------------------------------------------------------------------------
@njit(**_FLAGS)
def stack_step_serial(x, wbuf, meta, fpar, sbuf, y):
    """One step. x (N*I,) inputs, stream-major; sbuf the streams' state and scratch (updated);
    y (N*O,) outputs (O = head size, or out). Flat x and y: a single stream passes its (I,) input
    and a fresh (out,) output with no reshape on the Python side. Streams go through the gate
    product in groups of four (:func:`_gemm_rows`); one stream's result is bit-identical whatever
    N is. Also the step for the user's own ``@numba.njit`` code: ``stream.numba_args()`` gives
    ``(wbuf, meta, fpar, sbuf)``."""
    N = x.shape[0] // meta[M_I]
    for l in range(meta[M_L]):
        for s in range(N):
            _load_z(l, s, x, sbuf, meta, N)
        for g in range((N + 3) // 4):  # one range: the whole row in one pass
            _group_product(g, 1, l, N, wbuf, meta, sbuf)
            _group_cells(g, 1, l, N, wbuf, meta, fpar, sbuf)
        for s in range(N):
            _finish_layer(l, s, wbuf, meta, sbuf, N)
    for s in range(N):
        _emit(s, wbuf, meta, sbuf, N, y)


@njit(parallel=True, **_FLAGS)
def stack_step_parallel(x, R, wbuf, meta, fpar, sbuf, y):
    """The parallel twin of :func:`stack_step_serial`: same arithmetic, prange over the
    (stream group, unit range) tasks; R follows the thread count (``layout.unit_ranges``), the
    bits do not. R is an argument, not ``numba.get_num_threads()`` read here: that call is a
    ctypes pointer, which would keep Numba from caching the kernel."""
    N = x.shape[0] // meta[M_I]
    tasks = ((N + 3) // 4) * R
    for l in range(meta[M_L]):
        for s in range(N):
            _load_z(l, s, x, sbuf, meta, N)
        for q in prange(tasks):  # column ranges: each thread streams its own part of every row
            _group_product(q, R, l, N, wbuf, meta, sbuf)
        for q in prange(tasks):  # unit ranges: all four gates of a unit are there now
            _group_cells(q, R, l, N, wbuf, meta, fpar, sbuf)
        for s in range(N):
            _finish_layer(l, s, wbuf, meta, sbuf, N)
    for s in range(N):
        _emit(s, wbuf, meta, sbuf, N, y)


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
# Many streams (policy: BLAS products): the gate product is a numpy matrix product
# ---------------------------------------------------------------------------------------------
@njit(**_FLAGS)
def batch_load_z(l, x, sbuf, meta):
    """z (N, K_l) <- [input of layer l | h[l]] for every stream; x (N*I,)."""
    N = x.shape[0] // meta[M_I]
    for s in range(N):
        _load_z(l, s, x, sbuf, meta, N)


@njit(**_FLAGS)
def batch_cells_serial(l, N, wbuf, meta, fpar, sbuf):
    """After acc (N, C) = z @ W (BLAS): bias, cell update and h of layer l."""
    C, hp = meta[M_C], meta[M_HP]
    rec = M_LD + l * LD_STRIDE
    h_off, c_off, z_off, acc_off, m_off, _end = _sbuf_offsets(meta, N)
    bias = wbuf[meta[rec + LD_B] : meta[rec + LD_B] + C]  # (C,)
    peep = wbuf[meta[rec + LD_PEEP] : meta[rec + LD_PEEP] + 3 * hp]  # (3*Hp,) if the model has them
    for s in range(N):
        acc = sbuf[acc_off + s * C : acc_off + (s + 1) * C]  # (C,)
        for j in range(C):
            acc[j] += bias[j]
        c = sbuf[c_off + (l * N + s) * hp : c_off + (l * N + s + 1) * hp]  # (Hp,)
        m = sbuf[m_off + s * hp : m_off + (s + 1) * hp]  # (Hp,)
        _cells(acc, c, m, peep, 0, hp, hp, wbuf, meta, fpar, rec, F_LD + l * F_STRIDE)
        _finish_layer(l, s, wbuf, meta, sbuf, N)


@njit(**_FLAGS)
def batch_emit(N, wbuf, meta, sbuf, y):
    """y (N*O,) <- head(h[L-1]) or h[L-1]."""
    for s in range(N):
        _emit(s, wbuf, meta, sbuf, N, y)


# ---------------------------------------------------------------------------------------------
# Whole sequences: the recurrent part of one layer and direction
# ---------------------------------------------------------------------------------------------
@njit(**_FLAGS)
def _seq_product(q, R, t, l, d, xp, wbuf, meta, h, acc):
    """Task q = (stream group g, column range r) at time t: acc[s] (C,) <- (xp[t, s] + bias) +
    W_rec^T h[s] over columns [c0, c1) (recurrent rows only; xp holds the input projection)."""
    C, out, D = meta[M_C], meta[M_OUT], meta[M_D]
    B = h.shape[0]
    g = q // R
    c0, c1 = _range_bounds(q % R, R, C)
    s0 = 4 * g
    s1 = min(s0 + 4, B)
    rec = M_LD + (l * D + d) * LD_STRIDE
    A = acc[s0:s1]  # (g, C)
    bias = wbuf[meta[rec + LD_B] : meta[rec + LD_B] + C]  # (C,)
    for s in range(s0, s1):
        for j in range(c0, c1):
            A[s - s0, j] = xp[t, s, j] + bias[j]
    K = meta[rec + LD_K]
    w0 = meta[rec + LD_W] + (K - out) * C
    W = wbuf[w0 : w0 + out * C].reshape((out, C))  # (out, C) recurrent rows
    if R == 1:
        _gemm_rows(h[s0:s1], W, A)
    else:
        _gemm_cols(h[s0:s1], W, A, c0, c1)


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
    else:
        for j in range(out):
            h[s, j] = mb[s, j]
    for j in range(out):
        y[t, s, d * out + j] = h[s, j]


@njit(**_FLAGS)
def layer_sequence_serial(xp, R, wbuf, meta, fpar, l, d, lengths, h, c, y, acc, mb):
    """Run layer l, direction d over a sequence of B streams in one call.

    xp (T, B, C) input projections (no bias), in W's column order; lengths (B,) valid steps
    per sequence; h (B, out), c (B, Hp) the state, updated in place; y (T, B, D*out) the layer's
    outputs, pre-zeroed (steps past a sequence's length stay zero), direction d writing columns
    d*out:(d+1)*out; acc (B, C) and mb (B, Hp) scratch.
    Direction 1 (or a REVERSE model) runs backwards from each sequence's last valid step.
    Streams share the recurrent product in groups of four (:func:`_gemm_cols`), with the float
    order of a single stream: results do not depend on B (nor on R, the unit ranges).
    """
    T, B = xp.shape[0], xp.shape[1]
    tasks = ((B + 3) // 4) * R
    for step in range(T):
        t = T - 1 - step if (d == 1 or meta[M_REVERSE] != 0) else step
        for q in range(tasks):
            _seq_product(q, R, t, l, d, xp, wbuf, meta, h, acc)
            _seq_cells(q, R, t, l, d, wbuf, meta, fpar, lengths, c, acc, mb)
        for s in range(B):
            if t < lengths[s]:
                _seq_finish(t, s, l, d, wbuf, meta, h, y, mb)


@njit(parallel=True, **_FLAGS)
def layer_sequence_parallel(xp, R, wbuf, meta, fpar, l, d, lengths, h, c, y, acc, mb):
    """The parallel twin of :func:`layer_sequence_serial`: prange over (stream group, unit range)."""
    T, B = xp.shape[0], xp.shape[1]
    tasks = ((B + 3) // 4) * R
    for step in range(T):
        t = T - 1 - step if (d == 1 or meta[M_REVERSE] != 0) else step
        for q in prange(tasks):  # column ranges
            _seq_product(q, R, t, l, d, xp, wbuf, meta, h, acc)
        for q in prange(tasks):  # unit ranges
            _seq_cells(q, R, t, l, d, wbuf, meta, fpar, lengths, c, acc, mb)
        for s in range(B):
            if t < lengths[s]:
                _seq_finish(t, s, l, d, wbuf, meta, h, y, mb)


@njit(**_FLAGS)
def sequence_cells_serial(t, xp, wbuf, meta, fpar, l, d, lengths, h, c, y, acc, mb):
    """Time step t of a batched sequence whose recurrent product acc (B, C) = h @ W_rec was
    done by BLAS: add the input projection and bias, update the cells, write h and y[t]."""
    B = xp.shape[1]
    C, hp, D = meta[M_C], meta[M_HP], meta[M_D]
    rec = M_LD + (l * D + d) * LD_STRIDE
    bias = wbuf[meta[rec + LD_B] : meta[rec + LD_B] + C]  # (C,)
    peep = wbuf[meta[rec + LD_PEEP] : meta[rec + LD_PEEP] + 3 * hp]  # (3*Hp,) if the model has them
    for s in range(B):
        if t < lengths[s]:
            a = acc[s]  # (C,)
            for j in range(C):
                a[j] += xp[t, s, j] + bias[j]
            _cells(a, c[s], mb[s], peep, 0, hp, hp, wbuf, meta, fpar, rec,
                   F_LD + (l * D + d) * F_STRIDE)
            _seq_finish(t, s, l, d, wbuf, meta, h, y, mb)


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
