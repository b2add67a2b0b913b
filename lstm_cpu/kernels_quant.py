"""Gate-product kernels over reduced-precision weights: int8 and 16-bit.

Each kernel computes a range of *panels* of the gate product ``acc (C,) = W (K, C)^T z (K,)``
for one (layer, direction); a panel is 16 consecutive columns of ``W`` (the packed layouts are
in ``quant.py``; the gate blocks i, f, g, o are each ``Hp`` wide, ``Hp`` a multiple of 16, so a
unit range of the lead's parallel split is four panel ranges). Kernels are plain ``@njit``
functions over arrays and scalars and trust their callers; ``quant.py`` validates.

Variants (numbered side by side, as bench/quant_probe.py times them)
--------------------------------------------------------------------
* ``i8_vnni``  int8 weights x uint8 activations -> int32 (the activations quantized per step,
  as onnxruntime's DynamicQuantizeLSTM does), one AVX-512 VNNI ``vpdpbusd`` per 16 columns x
  4 rows. Weights ``Wq4 (P, K4, 64)`` int8: panel-major, so one panel streams contiguously, and
  within a row quad the 16 columns x 4 consecutive rows that ``vpdpbusd`` wants. Four
  independent accumulators per panel (rows quads q, q+1, q+2, q+3 interleaved; integer sums,
  so the order does not matter and the result is exact). PERF_NOTES measured one dependency
  chain at 73 G MAC/s.
* ``i8_vnni256`` the same with 256-bit ``vpdpbusd`` (AVX512VL or AVX-VNNI; LLVM picks the
  VEX encoding when only AVX-VNNI is present), 8 columns per instruction.
* ``i8_portable`` the same arithmetic as plain loops (no intrinsic): for machines without VNNI
  and as the reference the VNNI path is tested against (int32 results are exactly equal).
* ``i8a16_vnni`` int8 weights x 16-bit activations: the activations quantized per step to
  16 bits and split into two byte digits, two ``vpdpbusd`` per weight load (one per digit).
  Activation error ~1/65534 of the range instead of 1/254: the accuracy of float activations
  at the speed of the int8 path where the product is memory-bound. ``i8a16_portable``: its
  plain twin.
* ``fma_panels`` weights converted in the loop, FMA with float32 activations; ``Wp (P, K, 16)``
  whose dtype tells the format: int8 values (sign-extend, convert), uint16 IEEE half bit
  patterns (LLVM ``fpext half`` -> F16C ``vcvtph2ps``) or int16 bfloat16 bit patterns
  (``<< 16``, exact).
* ``bf16_dp``  bfloat16 weights as pairs ``Wb2 (P, K2, 32)`` and AVX512_BF16 ``vdpbf16ps``;
  the float32 activations are split into ``hi + lo`` bfloat16 parts (two dot instructions),
  so the activations lose ~2^-16 instead of bf16's 2^-9.

Assembly (``dispatcher.inspect_asm(sig)``, LLVM 22, znver4 target, AMD EPYC with AVX-512)
----------------------------------------------------------------------------------------
:func:`asm_report` recompiles each kernel uncached and counts; what we saw (tests check it):

* ``i8_vnni``: 22 ``vpdpbusd`` on zmm, each with a ``vpbroadcastd`` of 4 activation bytes and
  the weights as a memory operand; the main loop keeps four accumulators in zmm0-3 (LLVM does
  not merge them: the intrinsic is opaque to it). ``i8a16_vnni``: 44, two per weight load.
* ``i8_vnni256``: 36 ``vpdpbusd`` on ymm (the EVEX form here; the VEX form on AVX-VNNI CPUs).
* ``bf16_dp``: 40 ``vdpbf16ps`` on zmm, the activation pairs by ``vbroadcastss``.
* ``fma_panels``: int8 -> ``vpmovsxbd`` + ``vcvtdq2ps`` + ``vfmadd``; float16 -> ``vcvtph2ps``
  zmm + ``vfmadd``; bfloat16 -> ``vpmovzxwd`` + ``vpslld`` + ``vfmadd``. The activation is a
  ``{1to16}`` broadcast memory operand of the FMA: the raw-pointer broadcast (``bcast_ld_f``)
  removed four scalar instructions per FMA that Numba's negative-index wraparound had added.
* N-stream twins (``*_batch``): ``i8a16_vnni_batch``'s main loop holds eight zmm accumulators
  (four streams x two digits) and issues 8 ``vpdpbusd`` per 64-byte weight load (LLVM unrolls
  it by two: 16 per iteration); ``bf16_dp_batch`` issues 16 ``vdpbf16ps`` per pair of weight
  loads (two panels x four streams x hi/lo); ``fma_panels_batch`` converts four weight vectors
  once and issues 16 ``vfmadd231ps`` with ``{1to16}`` activation broadcasts.
* ``i8_portable`` (plain loops): LLVM itself chose ``vpdpwssd`` (AVX512-VNNI on 16-bit words)
  here; on an AVX2 machine it becomes ``vpmaddwd`` code.

Which variant ships, and why (bench/quant_probe.py, 1 thread, one process, side by side)
--------------------------------------------------------------------------------------
* int8: ``i8a16_vnni``. Quantizing activations to 8 bits per step (``i8_vnni``, what
  onnxruntime does) is the fastest, but its error against the float32 torch model was *larger*
  than onnxruntime int8's (1.33e-3 vs 1.14e-3 at (128,256,2), 300 steps): it fails the accuracy
  target. 16-bit activations (two byte digits) cost a second ``vpdpbusd`` per weight load, which
  the memory-bound product mostly hides, and leave only the weight rounding: 6.6e-4, the same as
  float activations with weights dequantized in the loop (``fma_panels`` on int8), which is
  2-3x slower (it converts and multiplies 16 weights per 3 instructions, ``vpdpbusd`` 64 per 1).
* 16-bit: bfloat16 through ``vdpbf16ps`` with the activations split into bf16 hi + lo. float16
  (F16C convert + FMA) is 8x more accurate (3e-5 vs 2.3e-4 at (128,256,2), both far inside the
  2e-3 target) but compute-bound at ~30 G MAC/s here (one convert and one FMA per 16 weights),
  while ``vdpbf16ps`` does 32 MACs per instruction and keeps up with memory. Without
  AVX512_BF16 the bfloat16 path converts by ``<< 16`` in ``fma_panels`` (exact, any x86-64).

Runtime selection
-----------------
Instructions the host lacks make LLVM fail at compile time ("Cannot select") or the CPU fault at
run time, so a SIMD kernel is only ever *compiled* after :func:`host_features` (simd.py, where
the vector type and its operations live) says the target has the feature (Numba's own target features, which honour ``NUMBA_CPU_NAME`` /
``NUMBA_CPU_FEATURES``). :func:`select` returns the fastest variant the host supports.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from . import _config
from .kernels import _fma as _fma_scalar, _tanh_f32
from .simd import (  # noqa: F401  (host_features and has_* are part of this module's API)
    _V8,
    _V16,
    _f32_as_u32,
    _u32_as_f32,
    _vec_ops,
    has_avx512,
    has_bf16dp,
    has_f16c,
    has_vnni256,
    has_vnni512,
    host_features,
)

_FLAGS = dict(nogil=True, cache=_config.CACHE, fastmath=_config.FASTMATH, error_model="numpy")

#: columns per panel (one zmm of int32 or float32)
PANEL = 16

_zi, _zf, _ldi, _bc4, _dp = _V16["zero_i"], _V16["zero_f"], _V16["load_i"], _V16["bcast4"], _V16["dpbusd"]
_addi, _addf, _sti, _stf = _V16["add_i"], _V16["add_f"], _V16["store_i"], _V16["store_f"]
_bcl, _fma, _ldw, _dpbf = _V16["bcast_ld_f"], _V16["fma_f"], _V16["load_wf"], _V16["dpbf16"]
_zi8, _ldi8, _bc48, _dp8, _addi8, _sti8 = (_V8["zero_i"], _V8["load_i"], _V8["bcast4"], _V8["dpbusd"],
                                           _V8["add_i"], _V8["store_i"])


# ---------------------------------------------------------------------------------------------
# int8 x uint8 -> int32 (activations quantized per step)
# ---------------------------------------------------------------------------------------------
@njit(**_FLAGS)
def i8_vnni(Wq4, zq, q0, q1, p0, p1, out):
    """out[16p : 16p+16] (int32) = sum over row quads q in [q0, q1) of zq[4q:4q+4] . Wq4[p, q],
    for panels p in [p0, p1).

    Wq4 (P, K4, 64) int8: Wq4[p, q, 4j + r] = W[4q + r, 16p + j]; zq (4*K4,) uint8; out (16P,) int32.
    """
    K4 = Wq4.shape[1]
    W = Wq4.reshape(Wq4.size)  # (P*K4*64,) flat view: byte offsets below
    for p in range(p0, p1):
        base = p * K4 * 64
        a0 = _zi()
        a1 = _zi()
        a2 = _zi()
        a3 = _zi()
        q = q0
        while q + 4 <= q1:
            o = base + q * 64
            a0 = _dp(a0, _bc4(zq, 4 * q), _ldi(W, o))
            a1 = _dp(a1, _bc4(zq, 4 * q + 4), _ldi(W, o + 64))
            a2 = _dp(a2, _bc4(zq, 4 * q + 8), _ldi(W, o + 128))
            a3 = _dp(a3, _bc4(zq, 4 * q + 12), _ldi(W, o + 192))
            q += 4
        while q < q1:
            a0 = _dp(a0, _bc4(zq, 4 * q), _ldi(W, base + q * 64))
            q += 1
        _sti(out, 16 * p, _addi(_addi(a0, a1), _addi(a2, a3)))


@njit(**_FLAGS)
def i8_vnni256(Wq4, zq, q0, q1, p0, p1, out):
    """:func:`i8_vnni` with 256-bit ``vpdpbusd`` (two 8-column halves per panel)."""
    K4 = Wq4.shape[1]
    W = Wq4.reshape(Wq4.size)
    for p in range(p0, p1):
        base = p * K4 * 64
        a0 = _zi8()
        a1 = _zi8()
        b0 = _zi8()
        b1 = _zi8()
        q = q0
        while q + 2 <= q1:
            o = base + q * 64
            z0 = _bc48(zq, 4 * q)
            z1 = _bc48(zq, 4 * q + 4)
            a0 = _dp8(a0, z0, _ldi8(W, o))
            b0 = _dp8(b0, z0, _ldi8(W, o + 32))
            a1 = _dp8(a1, z1, _ldi8(W, o + 64))
            b1 = _dp8(b1, z1, _ldi8(W, o + 96))
            q += 2
        while q < q1:
            o = base + q * 64
            z0 = _bc48(zq, 4 * q)
            a0 = _dp8(a0, z0, _ldi8(W, o))
            b0 = _dp8(b0, z0, _ldi8(W, o + 32))
            q += 1
        _sti8(out, 16 * p, _addi8(a0, a1))
        _sti8(out, 16 * p + 8, _addi8(b0, b1))


@njit(**_FLAGS)
def i8_portable(Wq4, zq, q0, q1, p0, p1, out):
    """:func:`i8_vnni` as plain loops: any CPU. Same int32 results, exactly."""
    for p in range(p0, p1):
        acc = np.zeros(16, dtype=np.int32)
        for q in range(q0, q1):
            for j in range(16):
                s = np.int32(0)
                for r in range(4):
                    s += np.int32(zq[4 * q + r]) * np.int32(Wq4[p, q, 4 * j + r])
                acc[j] += s
        for j in range(16):
            out[16 * p + j] = acc[j]


@njit(**_FLAGS)
def quantize_u8(z, k0, k1, zq, d0):
    """zq[d0 : d0 + k1-k0] = rint(z[k0:k1] / s) + 128 (uint8, symmetric, zero point 128), with
    s = max|z[k0:k1]| / 127; returns s (1.0 for an all-zero segment; NaN/Inf as
    :func:`quantize_a16`)."""
    m = _absmax(z, k0, k1)
    s = np.float32(1.0) if m == 0 else m / np.float32(127.0)
    inv = np.float32(1.0) / s
    lo_ = np.float32(-127.0)
    hi_ = np.float32(127.0)
    zs = z[k0:k1]  # slices indexed from 0: no negative-index wraparound, so the loop vectorises
    oq = zq[d0 : d0 + k1 - k0]
    for i in range(k1 - k0):
        v = np.rint(zs[i] * inv)
        v = lo_ if v < lo_ else v
        v = hi_ if v > hi_ else v
        oq[i] = np.uint8(np.int32(v) + 128)
    return s


@njit(**_FLAGS)
def _absmax(z, k0, k1):
    """max |z[k0:k1]| as float32; NaN if any element is NaN. An integer max over the bit patterns
    with the sign cleared (ordered like the floats, NaN above Inf), which vectorises."""
    b = z.view(np.uint32)
    m = np.uint32(0)
    for k in range(k0, k1):
        v = b[k] & np.uint32(0x7FFFFFFF)
        m = v if v > m else m
    return _u32_as_f32(m)


# ---------------------------------------------------------------------------------------------
# int8 weights x 16-bit activations (two byte digits; activation error ~1/65534 of the range)
# ---------------------------------------------------------------------------------------------
@njit(**_FLAGS)
def i8a16_vnni(Wq4, zhi, zlo, qrows, p0, p1, ohi, olo):
    """int8 weights x 16-bit activations as two byte digits, one weight load for both:
    ohi[s, 16p + j] = sum over the row quads q of segment s (qrows[s] <= q < qrows[s+1]) of
    zhi[4q:4q+4] . Wq4[p, q, 4j:4j+4], and olo likewise with zlo, for panels p in [p0, p1).
    Wq4 (P, K4, 64) int8; zhi, zlo (4*K4,) uint8 (see :func:`quantize_a16`); qrows (S+1,);
    ohi, olo (S, 16P) int32. Each panel is streamed once, all segments in one contiguous pass
    (one call per segment cost ~25% more at (256, 512)). Eight independent accumulators."""
    K4 = Wq4.shape[1]
    W = Wq4.reshape(Wq4.size)
    C = ohi.shape[1]
    oh = ohi.reshape(ohi.size)
    ol = olo.reshape(olo.size)
    for p in range(p0, p1):
        base = p * K4 * 64
        for s in range(qrows.shape[0] - 1):
            h0 = _zi()
            h1 = _zi()
            h2 = _zi()
            h3 = _zi()
            l0 = _zi()
            l1 = _zi()
            l2 = _zi()
            l3 = _zi()
            q = qrows[s]
            q1 = qrows[s + 1]
            while q + 4 <= q1:
                o = base + q * 64
                w0 = _ldi(W, o)
                w1 = _ldi(W, o + 64)
                w2 = _ldi(W, o + 128)
                w3 = _ldi(W, o + 192)
                h0 = _dp(h0, _bc4(zhi, 4 * q), w0)
                l0 = _dp(l0, _bc4(zlo, 4 * q), w0)
                h1 = _dp(h1, _bc4(zhi, 4 * q + 4), w1)
                l1 = _dp(l1, _bc4(zlo, 4 * q + 4), w1)
                h2 = _dp(h2, _bc4(zhi, 4 * q + 8), w2)
                l2 = _dp(l2, _bc4(zlo, 4 * q + 8), w2)
                h3 = _dp(h3, _bc4(zhi, 4 * q + 12), w3)
                l3 = _dp(l3, _bc4(zlo, 4 * q + 12), w3)
                q += 4
            while q < q1:
                w0 = _ldi(W, base + q * 64)
                h0 = _dp(h0, _bc4(zhi, 4 * q), w0)
                l0 = _dp(l0, _bc4(zlo, 4 * q), w0)
                q += 1
            _sti(oh, s * C + 16 * p, _addi(_addi(h0, h1), _addi(h2, h3)))
            _sti(ol, s * C + 16 * p, _addi(_addi(l0, l1), _addi(l2, l3)))


@njit(**_FLAGS)
def i8a16_portable(Wq4, zhi, zlo, qrows, p0, p1, ohi, olo):
    """:func:`i8a16_vnni` as plain loops (:func:`i8_portable` per segment and digit): any CPU,
    the same int32 results."""
    for s in range(qrows.shape[0] - 1):
        i8_portable(Wq4, zhi, qrows[s], qrows[s + 1], p0, p1, ohi[s])
        i8_portable(Wq4, zlo, qrows[s], qrows[s + 1], p0, p1, olo[s])


@njit(**_FLAGS)
def quantize_a16(z, k0, k1, zhi, zlo, d0):
    """16-bit symmetric quantization of z[k0:k1] as two byte digits at zhi/zlo[d0 : d0 + k1-k0]:
    v = rint(z / s) in [-32767, 32767], s = max|z| / 32767, v = 256 * hi + lo with lo in
    [0, 255]; zhi = hi + 128 (uint8), zlo = lo. Then sum_k v_k w_k = 256 * (dot(zhi, w) - 128 *
    colsum) + dot(zlo, w), exactly. Returns s: 1.0 for an all-zero segment; NaN or Inf if z holds
    one (the digits are then meaningless and the caller's s * dot is NaN: a non-finite input
    makes the quantized step NaN)."""
    m = _absmax(z, k0, k1)
    s = np.float32(1.0) if m == 0 else m / np.float32(32767.0)
    inv = np.float32(1.0) / s
    lo_ = np.float32(-32767.0)
    hi_ = np.float32(32767.0)
    # slices indexed from 0: without Numba's negative-index wraparound (z[d0 + k - k0] might be
    # negative for all it knows) the loop vectorises, 4.4 -> 0.35 us per 1,024 values
    zs = z[k0:k1]
    oh = zhi[d0 : d0 + k1 - k0]
    ol = zlo[d0 : d0 + k1 - k0]
    for i in range(k1 - k0):
        v = np.rint(zs[i] * inv)
        v = lo_ if v < lo_ else v
        v = hi_ if v > hi_ else v
        iv = np.int32(v) + 32768  # [1, 65535]: hi + 128 = iv >> 8, lo = iv & 255
        oh[i] = np.uint8(iv >> 8)
        ol[i] = np.uint8(iv & 255)
    return s


# ---------------------------------------------------------------------------------------------
# Reduced weights x float32 activations (weights converted in the loop)
# ---------------------------------------------------------------------------------------------
@njit(**_FLAGS)
def fma_panels(Wp, z, k0, k1, p0, p1, out):
    """out[16p : 16p+16] (float32) = sum over rows k in [k0, k1) of z[k] * float(Wp[p, k]), for
    panels p in [p0, p1). Wp (P, K, 16): int8 values (the caller applies the column scales),
    uint16 IEEE half or int16 bfloat16 bit patterns (the dtype says which); z (K,) float32."""
    K = Wp.shape[1]
    W = Wp.reshape(Wp.size)
    for p in range(p0, p1):
        base = p * K * 16
        a0 = _zf()
        a1 = _zf()
        a2 = _zf()
        a3 = _zf()
        k = k0
        while k + 4 <= k1:
            o = base + k * 16
            a0 = _fma(_ldw(W, o), _bcl(z, k), a0)
            a1 = _fma(_ldw(W, o + 16), _bcl(z, k + 1), a1)
            a2 = _fma(_ldw(W, o + 32), _bcl(z, k + 2), a2)
            a3 = _fma(_ldw(W, o + 48), _bcl(z, k + 3), a3)
            k += 4
        while k < k1:
            a0 = _fma(_ldw(W, base + k * 16), _bcl(z, k), a0)
            k += 1
        _stf(out, 16 * p, _addf(_addf(a0, a1), _addf(a2, a3)))


@njit(**_FLAGS)
def bf16_dp(Wb2, zhi, zlo, q0, q1, p0, p1, out):
    """out[16p : 16p+16] = sum over row pairs q in [q0, q1) of (zhi + zlo)[2q:2q+2] . Wb2[p, q],
    with ``vdpbf16ps``. Wb2 (P, K2, 32) uint16 bfloat16: Wb2[p, q, 2j + r] = W[2q + r, 16p + j];
    zhi, zlo (2*K2,) uint16 bfloat16: the activations' rounded high part and the rest.

    Four panels at a time: each broadcast pair of activations feeds four panels, and the
    4 panels x (hi, lo) accumulators are eight independent chains (``vdpbf16ps`` has a latency
    of several cycles; one chain per panel measured ~1.4x slower)."""
    K2 = Wb2.shape[1]
    W = Wb2.reshape(Wb2.size)
    n = K2 * 32  # elements per panel
    p = p0
    while p < p1:
        b0 = p * n
        b1 = b0 + n if p + 1 < p1 else b0  # past the range end: recompute panel p, store nothing
        b2 = b0 + 2 * n if p + 2 < p1 else b0
        b3 = b0 + 3 * n if p + 3 < p1 else b0
        a0 = _zf()
        a1 = _zf()
        a2 = _zf()
        a3 = _zf()
        c0 = _zf()
        c1 = _zf()
        c2 = _zf()
        c3 = _zf()
        for q in range(q0, q1):
            o = q * 32
            hi = _bc4(zhi, 2 * q)
            lo = _bc4(zlo, 2 * q)
            w0 = _ldi(W, b0 + o)
            w1 = _ldi(W, b1 + o)
            w2 = _ldi(W, b2 + o)
            w3 = _ldi(W, b3 + o)
            a0 = _dpbf(a0, hi, w0)
            c0 = _dpbf(c0, lo, w0)
            a1 = _dpbf(a1, hi, w1)
            c1 = _dpbf(c1, lo, w1)
            a2 = _dpbf(a2, hi, w2)
            c2 = _dpbf(c2, lo, w2)
            a3 = _dpbf(a3, hi, w3)
            c3 = _dpbf(c3, lo, w3)
        _stf(out, 16 * p, _addf(a0, c0))
        if p + 1 < p1:
            _stf(out, 16 * p + 16, _addf(a1, c1))
        if p + 2 < p1:
            _stf(out, 16 * p + 32, _addf(a2, c2))
        if p + 3 < p1:
            _stf(out, 16 * p + 48, _addf(a3, c3))
        p += 4


@njit(**_FLAGS)
def split_bf16(z, k0, k1, zhi, zlo, d0):
    """zhi/zlo[d0 : d0 + k1-k0] <- z[k0:k1] as bfloat16 hi + lo (uint16 bit patterns, round to
    nearest even): hi = bf16(z), lo = bf16(z - hi), so hi + lo = z to ~2^-16 relative. Inf and
    NaN pass through hi (lo is then NaN or 0)."""
    b = z[k0:k1].view(np.uint32)  # slices indexed from 0 (no negative-index wraparound)
    zs = z[k0:k1]
    oh = zhi[d0 : d0 + k1 - k0]
    ol = zlo[d0 : d0 + k1 - k0]
    for i in range(k1 - k0):
        u = b[i]
        h = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: keep it quiet, not Inf
            h = (u >> 16) | np.uint32(0x40)
        oh[i] = np.uint16(h)
        r = zs[i] - _u32_as_f32(h << 16)
        v = _f32_as_u32(r)
        ol[i] = np.uint16((v + np.uint32(0x7FFF) + ((v >> 16) & np.uint32(1))) >> 16)


@njit(**_FLAGS)
def bf16_gates(Wb2, z, krows, prows, bias, zhi, zlo, facc, acc):
    """acc (C,) <- bias + W^T z with :func:`bf16_dp`; z split into bf16 hi + lo per step.
    Wb2 (P, K2, 32); krows, prows (S+1,) segment bounds in rows and row pairs; zhi, zlo (2*K2,)
    uint16 scratch (pair padding: 0); facc (C,) float32 scratch."""
    C = acc.shape[0]
    acc[:] = bias
    for s in range(krows.shape[0] - 1):
        split_bf16(z, krows[s], krows[s + 1], zhi, zlo, 2 * prows[s])
    bf16_dp(Wb2, zhi, zlo, 0, prows[-1], 0, C // PANEL, facc)
    for j in range(C):
        acc[j] += facc[j]


@njit(**_FLAGS)
def deq_portable(W16, z, k0, k1, p0, p1, out):
    """:func:`fma_panels` on float32 weights (P, K, 16) already converted: any CPU."""
    for p in range(p0, p1):
        acc = np.zeros(16, dtype=np.float32)
        for k in range(k0, k1):
            zk = z[k]
            for j in range(16):
                acc[j] += W16[p, k, j] * zk
        for j in range(16):
            out[16 * p + j] = acc[j]


# ---------------------------------------------------------------------------------------------
# Gate pre-activations of one (layer, direction) and a whole unidirectional stack step
# ---------------------------------------------------------------------------------------------
# The product kernel is passed in as an argument (a Numba dispatcher): each choice compiles its
# own specialization, so a host without VNNI never compiles (or runs) the VNNI code.
@njit(**_FLAGS)
def i8_gates(kern, Wq4, z, krows, qrows, sw, colsum, bias, zq, iacc, acc):
    """acc (C,) <- bias + sum over row segments s of sz_s * sw[s] * (dot_s - 128 * colsum[s]),
    the activations z (K,) quantized per segment (:func:`quantize_u8`) into zq (4*K4,) uint8.

    krows, qrows (S+1,) segment bounds in rows and in row quads; sw (S, C) float32 weight scales;
    colsum (S, C) int32; bias (C,) float32; iacc (C,) int32 scratch; kern: i8_vnni | i8_vnni256 |
    i8_portable. Quad padding bytes of zq: any value (their weights are 0)."""
    C = acc.shape[0]
    acc[:] = bias
    for s in range(krows.shape[0] - 1):
        sz = quantize_u8(z, krows[s], krows[s + 1], zq, 4 * qrows[s])
        kern(Wq4, zq, qrows[s], qrows[s + 1], 0, C // PANEL, iacc)
        for j in range(C):
            acc[j] += (sz * sw[s, j]) * np.float32(iacc[j] - 128 * colsum[s, j])


@njit(**_FLAGS)
def i8a16_gates(kern, Wq4, z, krows, qrows, sw, colsum, bias, zhi, zlo, ihi, ilo, acc):
    """:func:`i8_gates` with 16-bit activations (:func:`quantize_a16`): acc (C,) <- bias + sum
    over segments s of sz_s * sw[s] * (256 * (dot_hi - 128 * colsum[s]) + dot_lo). kern:
    i8a16_vnni | i8a16_portable; zhi, zlo (4*K4,) uint8; ihi, ilo (S, C) int32 scratch."""
    C = acc.shape[0]
    S = krows.shape[0] - 1
    acc[:] = bias
    sz = np.empty(S, np.float32)
    for s in range(S):
        sz[s] = quantize_a16(z, krows[s], krows[s + 1], zhi, zlo, 4 * qrows[s])
    kern(Wq4, zhi, zlo, qrows, 0, C // PANEL, ihi, ilo)
    for s in range(S):
        for j in range(C):
            d = np.float32(256.0) * np.float32(ihi[s, j] - 128 * colsum[s, j]) + np.float32(ilo[s, j])
            acc[j] += (sz[s] * sw[s, j]) * d


@njit(**_FLAGS)
def w_gates(kern, Wp, z, krows, sw, bias, facc, acc):
    """acc (C,) <- bias + sum over row segments s of sw[s] * (Wp^T z over the segment's rows)
    with float32 activations: ``fma_panels`` (int8 with sw the column scales, or 16-bit with sw
    ones) or ``deq_portable``. Wp (P, K, 16); facc (C,) float32 scratch."""
    C = acc.shape[0]
    acc[:] = bias
    for s in range(krows.shape[0] - 1):
        kern(Wp, z, krows[s], krows[s + 1], 0, C // PANEL, facc)
        for j in range(C):
            acc[j] += sw[s, j] * facc[j]


@njit(**_FLAGS)
def cells(acc, c, h):
    """Default LSTM cell (sigmoid, tanh, tanh; gates i, f, g, o each Hp wide in acc (4*Hp,)):
    c (Hp,) updated in place, h (H,) <- o * tanh(c)[:H]. The float32 rational tanh of kernels.py."""
    hp = c.shape[0]
    H = h.shape[0]  # padded units never feed a real one: skipped
    half = np.float32(0.5)
    # per-gate slices indexed from 0: acc[hp + u] would carry Numba's negative-index
    # wraparound, which kept the loop scalar (1.3 -> 0.8 us for 500 units, the same bits)
    gi = acc[0:H]
    gf = acc[hp : hp + H]
    gg = acc[2 * hp : 2 * hp + H]
    go = acc[3 * hp : 3 * hp + H]
    # activations in place (acc is scratch), then the cell: as kernels._epilogue_common
    for u in range(H):
        gi[u] = half * _tanh_f32(half * gi[u]) + half
        gf[u] = half * _tanh_f32(half * gf[u]) + half
        gg[u] = _tanh_f32(gg[u])
        go[u] = half * _tanh_f32(half * go[u]) + half
    for u in range(H):
        cn = _fma_scalar(gf[u], c[u], gi[u] * gg[u])
        c[u] = cn
        h[u] = go[u] * _tanh_f32(cn)


@njit(**_FLAGS)
def load_z(l, x, h, z):
    """z <- [input of layer l | h[l]]: x (I,) for layer 0, else h[l-1]; h (L, H)."""
    H = h.shape[1]
    kin = x.shape[0] if l == 0 else H
    for k in range(kin):
        z[k] = x[k] if l == 0 else h[l - 1, k]
    for k in range(H):
        z[kin + k] = h[l, k]


# Whole steps of a unidirectional stack, for the probe and the tests: x (I,); per layer l
# (tuples): weights, sws[l] (S, C), colsums[l] (S, C) int32, biases[l] (C,); krows, qrows (L, S+1);
# h (L, H), c (L, Hp) the state, updated (the output is h[L-1]); the rest scratch: z (Kmax,)
# float32, zq/zhi/zlo (4*K4max,) uint8, iacc (C,) and ihi/ilo (S, C) int32, facc/acc (C,) float32.
@njit(**_FLAGS)
def i8_stack_step(kern, x, Wq4s, krows, qrows, sws, colsums, biases, h, c, z, zq, iacc, acc):
    for l in range(h.shape[0]):
        load_z(l, x, h, z)
        i8_gates(kern, Wq4s[l], z, krows[l], qrows[l], sws[l], colsums[l], biases[l], zq, iacc, acc)
        cells(acc, c[l], h[l])


@njit(**_FLAGS)
def i8a16_stack_step(kern, x, Wq4s, krows, qrows, sws, colsums, biases, h, c, z, zhi, zlo, ihi, ilo, acc):
    for l in range(h.shape[0]):
        load_z(l, x, h, z)
        i8a16_gates(kern, Wq4s[l], z, krows[l], qrows[l], sws[l], colsums[l], biases[l], zhi, zlo,
                    ihi, ilo, acc)
        cells(acc, c[l], h[l])


@njit(**_FLAGS)
def bf16_stack_step(x, Wb2s, krows, prows, biases, h, c, z, zhi, zlo, facc, acc):
    for l in range(h.shape[0]):
        load_z(l, x, h, z)
        bf16_gates(Wb2s[l], z, krows[l], prows[l], biases[l], zhi, zlo, facc, acc)
        cells(acc, c[l], h[l])


@njit(**_FLAGS)
def w_stack_step(kern, x, Wps, krows, sws, biases, h, c, z, facc, acc):
    for l in range(h.shape[0]):
        load_z(l, x, h, z)
        w_gates(kern, Wps[l], z, krows[l], sws[l], biases[l], facc, acc)
        cells(acc, c[l], h[l])


# ---------------------------------------------------------------------------------------------
# N streams at once: every weight vector loaded once for four streams
# ---------------------------------------------------------------------------------------------
# N batched streams, or the B sequences of ``run``, share every weight load: the product kernels
# below walk the panels once and, inside a panel, apply each loaded weight vector to four streams
# (the rest of the panel's streams re-read it from L1: a panel is 4-16 KB). Activations are
# quantized (int8) or split (bfloat16) per stream and per segment, and every stream's sums run in
# the order of the lone kernels (int8: exact int32, any order; bfloat16: the same hi and lo
# chains over the row pairs; weights converted in the loop: the same four accumulators over
# k mod 4, the same final (a0 + a1) + (a2 + a3)). So a stream gets the same bits whatever N is,
# wherever it sits in the batch, and whether it steps, runs a chunk or runs a whole sequence.
@njit(**_FLAGS)
def i8a16_vnni_batch(Wq4, zhi, zlo, qrows, p0, p1, ohi, olo):
    """:func:`i8a16_vnni` for N streams: ohi[n, s, 16p + j] = sum over the row quads q of
    segment s of zhi[n, 4q:4q+4] . Wq4[p, q, 4j:4j+4], and olo likewise with zlo, for panels p
    in [p0, p1). Wq4 (P, K4, 64) int8; zhi, zlo (N, ZW) uint8 with ZW >= 4*K4; qrows (S+1,);
    ohi, olo (N, S, C) int32. Four streams per weight load (eight accumulators: hi and lo of
    each); the last N % 4 streams one at a time, four row quads per pass (eight accumulators,
    as :func:`i8a16_vnni`). One stream alone is :func:`i8a16_vnni` itself (its loop measured
    ~4% faster than the same loop nested here; the sums are exact either way)."""
    if zhi.shape[0] == 1:
        i8a16_vnni(Wq4, zhi[0], zlo[0], qrows, p0, p1, ohi[0], olo[0])
        return
    K4 = Wq4.shape[1]
    W = Wq4.reshape(Wq4.size)  # (P*K4*64,) flat: byte offsets below
    N, ZW = zhi.shape[0], zhi.shape[1]
    zh = zhi.reshape(zhi.size)  # (N*ZW,) stream n's digits at n*ZW
    zl = zlo.reshape(zlo.size)
    S = qrows.shape[0] - 1
    C = ohi.shape[2]
    SC = S * C
    oh = ohi.reshape(ohi.size)  # (N*S*C,)
    ol = olo.reshape(olo.size)
    for p in range(p0, p1):
        base = p * K4 * 64
        for s in range(S):
            q0 = qrows[s]
            q1 = qrows[s + 1]
            n = 0
            while n + 4 <= N:
                z0 = n * ZW
                z1 = z0 + ZW
                z2 = z1 + ZW
                z3 = z2 + ZW
                h0 = _zi()
                h1 = _zi()
                h2 = _zi()
                h3 = _zi()
                l0 = _zi()
                l1 = _zi()
                l2 = _zi()
                l3 = _zi()
                for q in range(q0, q1):
                    w = _ldi(W, base + q * 64)
                    h0 = _dp(h0, _bc4(zh, z0 + 4 * q), w)
                    l0 = _dp(l0, _bc4(zl, z0 + 4 * q), w)
                    h1 = _dp(h1, _bc4(zh, z1 + 4 * q), w)
                    l1 = _dp(l1, _bc4(zl, z1 + 4 * q), w)
                    h2 = _dp(h2, _bc4(zh, z2 + 4 * q), w)
                    l2 = _dp(l2, _bc4(zl, z2 + 4 * q), w)
                    h3 = _dp(h3, _bc4(zh, z3 + 4 * q), w)
                    l3 = _dp(l3, _bc4(zl, z3 + 4 * q), w)
                o = n * SC + s * C + 16 * p
                _sti(oh, o, h0)
                _sti(ol, o, l0)
                _sti(oh, o + SC, h1)
                _sti(ol, o + SC, l1)
                _sti(oh, o + 2 * SC, h2)
                _sti(ol, o + 2 * SC, l2)
                _sti(oh, o + 3 * SC, h3)
                _sti(ol, o + 3 * SC, l3)
                n += 4
            while n < N:
                z0 = n * ZW
                h0 = _zi()
                h1 = _zi()
                h2 = _zi()
                h3 = _zi()
                l0 = _zi()
                l1 = _zi()
                l2 = _zi()
                l3 = _zi()
                q = q0
                while q + 4 <= q1:
                    o = base + q * 64
                    w0 = _ldi(W, o)
                    w1 = _ldi(W, o + 64)
                    w2 = _ldi(W, o + 128)
                    w3 = _ldi(W, o + 192)
                    zo = z0 + 4 * q
                    h0 = _dp(h0, _bc4(zh, zo), w0)
                    l0 = _dp(l0, _bc4(zl, zo), w0)
                    h1 = _dp(h1, _bc4(zh, zo + 4), w1)
                    l1 = _dp(l1, _bc4(zl, zo + 4), w1)
                    h2 = _dp(h2, _bc4(zh, zo + 8), w2)
                    l2 = _dp(l2, _bc4(zl, zo + 8), w2)
                    h3 = _dp(h3, _bc4(zh, zo + 12), w3)
                    l3 = _dp(l3, _bc4(zl, zo + 12), w3)
                    q += 4
                while q < q1:
                    w0 = _ldi(W, base + q * 64)
                    h0 = _dp(h0, _bc4(zh, z0 + 4 * q), w0)
                    l0 = _dp(l0, _bc4(zl, z0 + 4 * q), w0)
                    q += 1
                o = n * SC + s * C + 16 * p
                _sti(oh, o, _addi(_addi(h0, h1), _addi(h2, h3)))
                _sti(ol, o, _addi(_addi(l0, l1), _addi(l2, l3)))
                n += 1


@njit(**_FLAGS)
def i8a16_portable_batch(Wq4, zhi, zlo, qrows, p0, p1, ohi, olo):
    """:func:`i8a16_vnni_batch` as plain loops (:func:`i8a16_portable` per stream): any CPU,
    the same int32 results. zhi, zlo (N, ZW) uint8; ohi, olo (N, S, C) int32."""
    for n in range(zhi.shape[0]):
        i8a16_portable(Wq4, zhi[n], zlo[n], qrows, p0, p1, ohi[n], olo[n])


@njit(**_FLAGS)
def bf16_dp_batch(Wb2, zhi, zlo, q0, q1, p0, p1, out):
    """:func:`bf16_dp` for N streams: out[n, 16p : 16p+16] = sum over row pairs q in [q0, q1)
    of (zhi + zlo)[n, 2q:2q+2] . Wb2[p, q]. Wb2 (P, K2, 32) uint16 bfloat16; zhi, zlo (N, ZW)
    uint16 bfloat16, ZW >= 2*K2; out (N, C) float32.

    Two panels x four streams per pass: each loaded weight vector feeds four streams, each
    broadcast activation pair two panels, and the 2 x 4 x (hi, lo) accumulators are sixteen
    independent chains (eight chains ran at 41 G MAC/s, sixteen at 57: ``vdpbf16ps`` waits on
    its latency with fewer). The last N % 4 streams go through :func:`bf16_dp` (four panels at
    a time). Every stream's hi and lo chains run over q in order from zero, then hi + lo: the
    bits of :func:`bf16_dp`."""
    K2 = Wb2.shape[1]
    W = Wb2.reshape(Wb2.size)
    m = K2 * 32  # elements per panel
    N, ZW = zhi.shape[0], zhi.shape[1]
    zh = zhi.reshape(zhi.size)  # (N*ZW,) stream n's pairs at n*ZW
    zl = zlo.reshape(zlo.size)
    C = out.shape[1]
    of = out.reshape(out.size)  # (N*C,)
    N4 = N - N % 4
    p = p0
    while p < p1:
        b0 = p * m
        b1 = b0 + m if p + 1 < p1 else b0  # past the range end: recompute panel p, store nothing
        n = 0
        while n < N4:
            z0 = n * ZW
            z1 = z0 + ZW
            z2 = z1 + ZW
            z3 = z2 + ZW
            a0 = _zf()  # panel p: hi chains a*, lo chains c*, one per stream
            a1 = _zf()
            a2 = _zf()
            a3 = _zf()
            c0 = _zf()
            c1 = _zf()
            c2 = _zf()
            c3 = _zf()
            d0 = _zf()  # panel p + 1: hi chains d*, lo chains e*
            d1 = _zf()
            d2 = _zf()
            d3 = _zf()
            e0 = _zf()
            e1 = _zf()
            e2 = _zf()
            e3 = _zf()
            for q in range(q0, q1):
                w = _ldi(W, b0 + q * 32)
                v = _ldi(W, b1 + q * 32)
                h0 = _bc4(zh, z0 + 2 * q)
                g0 = _bc4(zl, z0 + 2 * q)
                h1 = _bc4(zh, z1 + 2 * q)
                g1 = _bc4(zl, z1 + 2 * q)
                h2 = _bc4(zh, z2 + 2 * q)
                g2 = _bc4(zl, z2 + 2 * q)
                h3 = _bc4(zh, z3 + 2 * q)
                g3 = _bc4(zl, z3 + 2 * q)
                a0 = _dpbf(a0, h0, w)
                c0 = _dpbf(c0, g0, w)
                a1 = _dpbf(a1, h1, w)
                c1 = _dpbf(c1, g1, w)
                a2 = _dpbf(a2, h2, w)
                c2 = _dpbf(c2, g2, w)
                a3 = _dpbf(a3, h3, w)
                c3 = _dpbf(c3, g3, w)
                d0 = _dpbf(d0, h0, v)
                e0 = _dpbf(e0, g0, v)
                d1 = _dpbf(d1, h1, v)
                e1 = _dpbf(e1, g1, v)
                d2 = _dpbf(d2, h2, v)
                e2 = _dpbf(e2, g2, v)
                d3 = _dpbf(d3, h3, v)
                e3 = _dpbf(e3, g3, v)
            o = n * C + 16 * p
            _stf(of, o, _addf(a0, c0))
            _stf(of, o + C, _addf(a1, c1))
            _stf(of, o + 2 * C, _addf(a2, c2))
            _stf(of, o + 3 * C, _addf(a3, c3))
            if p + 1 < p1:
                o += 16
                _stf(of, o, _addf(d0, e0))
                _stf(of, o + C, _addf(d1, e1))
                _stf(of, o + 2 * C, _addf(d2, e2))
                _stf(of, o + 3 * C, _addf(d3, e3))
            n += 4
        p += 2
    for n in range(N4, N):
        bf16_dp(Wb2, zhi[n], zlo[n], q0, q1, p0, p1, out[n])


@njit(**_FLAGS)
def fma_panels_batch(Wp, z, k0, k1, p0, p1, out):
    """:func:`fma_panels` for N streams: out[n, 16p : 16p+16] = sum over rows k in [k0, k1) of
    z[n, k] * float(Wp[p, k]). Wp (P, K, 16) int8 | uint16 half | int16 bfloat16; z (N, KZ)
    float32; out (N, C) float32. Four streams per converted weight vector (sixteen
    accumulators: four per stream over k mod 4, the remainder rows into the first, summed as
    (a0 + a1) + (a2 + a3): the bits of :func:`fma_panels`); the last N % 4 streams one at a time
    (one stream alone: :func:`fma_panels` itself)."""
    if z.shape[0] == 1:
        fma_panels(Wp, z[0], k0, k1, p0, p1, out[0])
        return
    K = Wp.shape[1]
    W = Wp.reshape(Wp.size)
    N, KZ = z.shape[0], z.shape[1]
    zf = z.reshape(z.size)  # (N*KZ,)
    C = out.shape[1]
    of = out.reshape(out.size)
    for p in range(p0, p1):
        base = p * K * 16
        n = 0
        while n + 4 <= N:
            z0 = n * KZ
            z1 = z0 + KZ
            z2 = z1 + KZ
            z3 = z2 + KZ
            a00 = _zf()
            a01 = _zf()
            a02 = _zf()
            a03 = _zf()
            a10 = _zf()
            a11 = _zf()
            a12 = _zf()
            a13 = _zf()
            a20 = _zf()
            a21 = _zf()
            a22 = _zf()
            a23 = _zf()
            a30 = _zf()
            a31 = _zf()
            a32 = _zf()
            a33 = _zf()
            k = k0
            while k + 4 <= k1:
                o = base + k * 16
                w0 = _ldw(W, o)
                w1 = _ldw(W, o + 16)
                w2 = _ldw(W, o + 32)
                w3 = _ldw(W, o + 48)
                a00 = _fma(w0, _bcl(zf, z0 + k), a00)
                a01 = _fma(w1, _bcl(zf, z0 + k + 1), a01)
                a02 = _fma(w2, _bcl(zf, z0 + k + 2), a02)
                a03 = _fma(w3, _bcl(zf, z0 + k + 3), a03)
                a10 = _fma(w0, _bcl(zf, z1 + k), a10)
                a11 = _fma(w1, _bcl(zf, z1 + k + 1), a11)
                a12 = _fma(w2, _bcl(zf, z1 + k + 2), a12)
                a13 = _fma(w3, _bcl(zf, z1 + k + 3), a13)
                a20 = _fma(w0, _bcl(zf, z2 + k), a20)
                a21 = _fma(w1, _bcl(zf, z2 + k + 1), a21)
                a22 = _fma(w2, _bcl(zf, z2 + k + 2), a22)
                a23 = _fma(w3, _bcl(zf, z2 + k + 3), a23)
                a30 = _fma(w0, _bcl(zf, z3 + k), a30)
                a31 = _fma(w1, _bcl(zf, z3 + k + 1), a31)
                a32 = _fma(w2, _bcl(zf, z3 + k + 2), a32)
                a33 = _fma(w3, _bcl(zf, z3 + k + 3), a33)
                k += 4
            while k < k1:
                w0 = _ldw(W, base + k * 16)
                a00 = _fma(w0, _bcl(zf, z0 + k), a00)
                a10 = _fma(w0, _bcl(zf, z1 + k), a10)
                a20 = _fma(w0, _bcl(zf, z2 + k), a20)
                a30 = _fma(w0, _bcl(zf, z3 + k), a30)
                k += 1
            o = n * C + 16 * p
            _stf(of, o, _addf(_addf(a00, a01), _addf(a02, a03)))
            _stf(of, o + C, _addf(_addf(a10, a11), _addf(a12, a13)))
            _stf(of, o + 2 * C, _addf(_addf(a20, a21), _addf(a22, a23)))
            _stf(of, o + 3 * C, _addf(_addf(a30, a31), _addf(a32, a33)))
            n += 4
        while n < N:
            z0 = n * KZ
            a0 = _zf()
            a1 = _zf()
            a2 = _zf()
            a3 = _zf()
            k = k0
            while k + 4 <= k1:
                o = base + k * 16
                a0 = _fma(_ldw(W, o), _bcl(zf, z0 + k), a0)
                a1 = _fma(_ldw(W, o + 16), _bcl(zf, z0 + k + 1), a1)
                a2 = _fma(_ldw(W, o + 32), _bcl(zf, z0 + k + 2), a2)
                a3 = _fma(_ldw(W, o + 48), _bcl(zf, z0 + k + 3), a3)
                k += 4
            while k < k1:
                a0 = _fma(_ldw(W, base + k * 16), _bcl(zf, z0 + k), a0)
                k += 1
            _stf(of, n * C + 16 * p, _addf(_addf(a0, a1), _addf(a2, a3)))
            n += 1


# Gate pre-activations of N streams for one (layer, direction). Each format's gate arguments
# travel as one tuple ``prm`` (one per (layer, direction)) and its scratch as one tuple ``scr``
# sized for Nmax streams, so that the drivers below are written once for every format; rows
# [0, N) of z, scr and acc are used. ``kern`` is the product kernel (a *_batch function above).
@njit(**_FLAGS)
def a16_segment(ihi, ilo, sz, sw, colsum, acc):
    """acc (C,) += (sz * sw) * (256 * (ihi - 128 * colsum) + ilo): one row segment's term of
    the int8 x 16-bit epilogue (:func:`i8a16_gates`); ihi, ilo (C,) int32, sw (C,) float32,
    colsum (C,) int32, sz the segment's activation scale. One function for every path, so the
    float operations (and their FMA contraction) are the same everywhere."""
    for j in range(acc.shape[0]):
        d = np.float32(256.0) * np.float32(ihi[j] - 128 * colsum[j]) + np.float32(ilo[j])
        acc[j] += (sz * sw[j]) * d


@njit(**_FLAGS)
def i8a16_gates_batch(kern, prm, z, scr, acc, N):
    """acc[n] (C,) <- bias + sum over segments s of sz[n, s] * sw[s] * (256 * (dot_hi -
    128 * colsum[s]) + dot_lo), for streams n < N, the activations z[n] (K,) quantized to 16
    bits per stream and segment (:func:`quantize_a16`).

    prm = (Wq4 (P, K4, 64) int8, krows (S+1,), qrows (S+1,), sw (S, C) float32, colsum (S, C)
    int32, bias (C,) float32); z (Nmax, KZ) float32; scr = (zhi, zlo (Nmax, ZW) uint8,
    sz (Nmax, S) float32, ihi, ilo (Nmax, S, C) int32); acc (Nmax, C) float32; kern:
    i8a16_vnni_batch | i8a16_portable_batch."""
    Wq4, krows, qrows, sw, colsum, bias = prm
    zhi, zlo, sz, ihi, ilo = scr
    C = acc.shape[1]
    S = krows.shape[0] - 1
    for n in range(N):
        for s in range(S):
            sz[n, s] = quantize_a16(z[n], krows[s], krows[s + 1], zhi[n], zlo[n], 4 * qrows[s])
    kern(Wq4, zhi[:N], zlo[:N], qrows, 0, C // PANEL, ihi[:N], ilo[:N])
    for n in range(N):
        a = acc[n]
        a[:] = bias
        for s in range(S):
            a16_segment(ihi[n, s], ilo[n, s], sz[n, s], sw[s], colsum[s], a)


@njit(**_FLAGS)
def bf16_gates_batch(kern, prm, z, scr, acc, N):
    """acc[n] (C,) <- bias + W^T z[n] for streams n < N, z[n] split into bfloat16 hi + lo
    (:func:`split_bf16`); the pair padding of each segment is written as zeros.

    prm = (Wb2 (P, K2, 32) uint16, krows (S+1,), prows (S+1,) segment bounds in rows and row
    pairs, bias (C,) float32); z (Nmax, KZ) float32; scr = (zhi, zlo (Nmax, ZW) uint16,
    facc (Nmax, C) float32); acc (Nmax, C) float32; kern: bf16_dp_batch."""
    Wb2, krows, prows, bias = prm
    zhi, zlo, facc = scr
    C = acc.shape[1]
    S = krows.shape[0] - 1
    for n in range(N):
        for s in range(S):
            split_bf16(z[n], krows[s], krows[s + 1], zhi[n], zlo[n], 2 * prows[s])
            for k in range(2 * prows[s] + krows[s + 1] - krows[s], 2 * prows[s + 1]):
                zhi[n, k] = 0
                zlo[n, k] = 0
    kern(Wb2, zhi[:N], zlo[:N], 0, prows[S], 0, C // PANEL, facc[:N])
    for n in range(N):
        a = acc[n]
        a[:] = bias
        f = facc[n]
        for j in range(C):
            a[j] += f[j]


@njit(**_FLAGS)
def w_gates_batch(kern, prm, z, scr, acc, N):
    """acc[n] (C,) <- bias + sum over segments s of sw[s] * (Wp^T z[n] over the segment's
    rows), float32 activations, weights converted in the loop (:func:`w_gates`), streams n < N.

    prm = (Wp (P, K, 16) int8 | int16 bfloat16, krows (S+1,), sw (S, C) float32 (column
    scales, or ones), bias (C,) float32); z (Nmax, KZ) float32; scr = (facc (Nmax, C)
    float32,); acc (Nmax, C) float32; kern: fma_panels_batch."""
    Wp, krows, sw, bias = prm
    facc = scr[0]
    C = acc.shape[1]
    for n in range(N):
        acc[n, :] = bias
    for s in range(krows.shape[0] - 1):
        kern(Wp, z[:N], krows[s], krows[s + 1], 0, C // PANEL, facc[:N])
        for n in range(N):
            a = acc[n]
            f = facc[n]
            for j in range(C):
                a[j] += sw[s, j] * f[j]


# Drivers, written once for every format: ``gates`` is one of the *_gates_batch functions,
# ``kern`` its product kernel, ``prms`` a tuple of its per-(layer, direction) ``prm`` tuples.
@njit(**_FLAGS)
def load_z_batch(l, x, h, z, n0, n1):
    """z[n - n0, :K_l] <- [input of layer l | h[l, n]] for the streams n0 <= n < n1: x (N*I,)
    float32 (stream n's input at n*I) for layer 0, else h[l-1, n]; h (L, N, H); z (n1-n0, KZ)
    float32."""
    N, H = h.shape[1], h.shape[2]
    I = x.shape[0] // N
    for n in range(n0, n1):
        zn = z[n - n0]
        # copies between 1-D views indexed from 0: an offset index (x[n * I + k]) carries
        # Numba's negative-index wraparound and stays scalar
        src = x[n * I : (n + 1) * I] if l == 0 else h[l - 1, n]
        kin = src.shape[0]
        zi = zn[:kin]
        for k in range(kin):
            zi[k] = src[k]
        hs = h[l, n]
        zh = zn[kin : kin + H]
        for k in range(H):
            zh[k] = hs[k]


@njit(**_FLAGS)
def stack_step_batch(gates, kern, x, prms, h, c, y, z, scr, acc, n0, n1):
    """One step of the streams n0 <= n < n1 of a batch of N, unidirectional stack. x (N*I,)
    float32, stream-major; prms: per layer the format's gate arguments; h (L, N, H), c (L, N, Hp)
    the whole batch's state, updated in place for these streams; y (N*H,) <- h[L-1] for them;
    z (n1-n0, Kmax) float32, scr, acc (n1-n0, C) float32 scratch of this range. Ranges of one
    batch may run at once on different threads (``quant.ReducedBatch``): they share no scratch
    and write disjoint streams, and every stream's arithmetic is the same whatever its range."""
    L, H = h.shape[0], h.shape[2]
    for l in range(L):
        load_z_batch(l, x, h, z, n0, n1)
        gates(kern, prms[l], z, scr, acc, n1 - n0)
        for n in range(n0, n1):
            cells(acc[n - n0], c[l, n], h[l, n])
    for n in range(n0, n1):
        ys = y[n * H : (n + 1) * H]  # indexed from 0 (see load_z_batch)
        hs = h[L - 1, n]
        for k in range(H):
            ys[k] = hs[k]


@njit(**_FLAGS)
def stack_run_batch(gates, kern, xs, prms, h, c, ys, z, scr, acc, n0, n1):
    """T steps of :func:`stack_step_batch`: xs (T, N*I) float32, ys (T, N*H) float32."""
    for t in range(xs.shape[0]):
        stack_step_batch(gates, kern, xs[t], prms, h, c, ys[t], z, scr, acc, n0, n1)


@njit(**_FLAGS)
def layer_run_batch(gates, kern, xs, backward, lengths, prm, h, c, y, y0, z, scr, acc, live):
    """One (layer, direction) over a whole batch of sequences (``LSTMModel.run``).

    xs (T, B, kin) float32 the layer's input; backward: run from each sequence's last valid
    step down to 0; lengths (B,) int64 valid steps per sequence; prm the format's gate
    arguments; h (B, H), c (B, Hp) float32 the state, updated; y (T, B, D*H) float32 outputs,
    pre-zeroed, this direction writing columns [y0, y0 + H) at valid steps; z (B, kin + H)
    float32, scr, acc (B, C) float32 scratch; live (B,) int64 scratch. At each step only the
    sequences still inside their length are computed, packed into the first rows (a stream's
    bits do not depend on its row)."""
    T, B, kin = xs.shape[0], xs.shape[1], xs.shape[2]
    H = h.shape[1]
    for step in range(T):
        t = T - 1 - step if backward else step
        N = 0
        for n in range(B):
            if t < lengths[n]:
                live[N] = n
                zn = z[N]  # 1-D views indexed from 0 (see load_z_batch)
                xn = xs[t, n]
                hn = h[n]
                zh = zn[kin : kin + H]
                for k in range(kin):
                    zn[k] = xn[k]
                for k in range(H):
                    zh[k] = hn[k]
                N += 1
        if N == 0:
            continue
        gates(kern, prm, z, scr, acc, N)
        for r in range(N):
            n = live[r]
            cells(acc[r], c[n], h[n])
            yn = y[t, n, y0 : y0 + H]
            hn = h[n]
            for k in range(H):
                yn[k] = hn[k]


# ---------------------------------------------------------------------------------------------
# Runtime selection
# ---------------------------------------------------------------------------------------------
def select_int8(feats=None):
    """The int8 gate product for this host: ``("a16", i8a16_vnni)`` with AVX-512 VNNI (int8
    weights x per-step 16-bit activations, exact int32 sums), else ``("deq", fma_panels)``
    (int8 weights converted in the loop, float32 activations; plain LLVM vector code that any
    x86-64 runs, split into 256-bit halves on AVX2). ``i8a16_portable`` is the exact twin of
    the VNNI kernel, for tests; it is too slow to ship."""
    if has_vnni512(feats):
        return "a16", i8a16_vnni
    return "deq", fma_panels


def batch_kernel(kern):
    """The N-stream twin of a lone product kernel (what ``ReducedStack.kern`` holds)."""
    return {i8a16_vnni: i8a16_vnni_batch, i8a16_portable: i8a16_portable_batch,
            fma_panels: fma_panels_batch, bf16_dp: bf16_dp_batch}[kern]


def select_16bit(fmt, feats=None):
    """The 16-bit gate product: ``fma_panels`` converts in the loop (F16C for float16); without
    F16C a float16 model should be widened to float32 at load (returns None)."""
    if fmt == "float16" and not has_f16c(feats):
        return None
    return fma_panels


def asm_report(feats=None) -> dict:
    """Compile each SIMD kernel the host supports on tiny arrays and count, in its assembly,
    the instructions that matter: {kernel: {"vpdpbusd": n, "vdpbf16ps": n, "vcvtph2ps": n,
    "vfmadd": n, "zmm": bool}}. For checking (tests, the docstring), not for the hot path."""
    import re

    f = host_features() if feats is None else feats
    i32 = np.zeros(64, np.int32)
    f32 = np.zeros(64, np.float32)
    u8 = np.zeros(64, np.uint8)
    cases = {}
    if has_vnni512(f):
        q = np.zeros((4, 4, 64), np.int8)
        cases["i8_vnni"] = (i8_vnni, (q, u8, 0, 4, 0, 4, i32))
        i2 = np.zeros((2, 64), np.int32)
        cases["i8a16_vnni"] = (i8a16_vnni, (q, u8, u8, np.array([0, 2, 4]), 0, 4, i2, i2.copy()))
        u8n = np.zeros((5, 16), np.uint8)
        i3 = np.zeros((5, 2, 64), np.int32)
        cases["i8a16_vnni_batch"] = (i8a16_vnni_batch, (q, u8n, u8n.copy(), np.array([0, 2, 4]), 0, 4, i3, i3.copy()))
    if has_vnni256(f):
        cases["i8_vnni256"] = (i8_vnni256, (np.zeros((4, 4, 64), np.int8), u8, 0, 4, 0, 4, i32))
    if has_bf16dp(f):
        cases["bf16_dp"] = (bf16_dp, (np.zeros((4, 4, 32), np.uint16), np.zeros(8, np.uint16),
                                      np.zeros(8, np.uint16), 0, 4, 0, 4, f32))
        z16 = np.zeros((5, 8), np.uint16)
        cases["bf16_dp_batch"] = (bf16_dp_batch, (np.zeros((4, 4, 32), np.uint16), z16, z16.copy(), 0, 4, 0, 4,
                                                  np.zeros((5, 64), np.float32)))
    for name, dt in (("int8", np.int8), ("float16", np.uint16), ("bfloat16", np.int16)):
        cases[f"fma_panels[{name}]"] = (fma_panels, (np.zeros((4, 8, 16), dt), f32, 0, 8, 0, 4, f32))
    cases["fma_panels_batch[int8]"] = (fma_panels_batch, (np.zeros((4, 8, 16), np.int8), np.zeros((5, 8), np.float32),
                                                          0, 8, 0, 4, np.zeros((5, 64), np.float32)))
    out = {}
    flags = dict(_FLAGS, cache=False)  # Numba cannot show the assembly of cached code
    for name, (fn, args) in cases.items():
        fresh = njit(**flags)(fn.py_func)
        fresh(*args)
        asm = fresh.inspect_asm(fresh.signatures[0])
        out[name] = {k: len(re.findall(rf"\b{k}\w*\b", asm)) for k in ("vpdpbusd", "vdpbf16ps", "vcvtph2ps", "vfmadd")}
        out[name]["zmm"] = "zmm" in asm
    return out
