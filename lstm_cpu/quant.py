"""Reduced-precision weights: int8 quantization, float16 / bfloat16 conversion and the packed
layouts that the kernels in ``kernels_quant.py`` read.

Everything starts from one fused, transposed gate matrix per (layer, direction), the form the
float32 kernels read (``layout.py``)::

    W (K, C)   K = in + out rows (the concatenated [x | h_prev]), C = 4 * Hp columns,
               gate blocks i, f, g, o each Hp wide, Hp a multiple of 16 (PANEL)

int8
----
Symmetric, per output channel: one scale per column of ``W`` over all its K fused rows,
``scale[c] = max_k |W[k, c]| / 127`` and ``Wq = rint(W / scale)`` in [-127, 127] (round half to
even; -128 is never used, so ``-Wq`` is representable and the VNNI sums cannot overflow: see
:func:`check_int32_range`). An all-zero column gets scale 1.

onnxruntime's ``DynamicQuantizeLSTM`` scales the input rows (``W``) and the recurrent rows
(``R``) separately, so a quantized matrix here carries *segment* scales: ``scale (S, C)`` for
``S`` row segments (1 for our own conversion, 2 for an imported node), with the segment bounds
``rows (S + 1,)``. The kernels compute each segment's int32 (or float) sum separately and the
float epilogue combines them.

Activations (the ``i8_vnni`` path) are quantized per step and per segment, symmetric with zero
point 128 (``kernels_quant.quantize_u8``): ``zq = rint(z / sz) + 128``, ``sz = max|z| / 127``. Then
``sum_k zq[k] Wq[k, c] = sum_k (z[k]/sz) Wq[k, c] + 128 * colsum[c]``, so the product is
``sz * scale[c] * (dot[c] - 128 * colsum[c])``.

16-bit
------
``to_bf16`` and ``to_f16`` round to nearest, ties to even, and return bit patterns (Numba's CPU
target refuses float16 arrays): IEEE half as uint16, bfloat16 as int16, so that a kernel
knows the format from the dtype.

Packed layouts (P = C / 16 panels of 16 columns; each panel contiguous so one panel streams)
------------------------------------------------------------------------------------------
    quads   Wq4 (P, K4, 64) int8     Wq4[p, q, 4j + r] = Wq[4q + r, 16p + j]   (vpdpbusd)
            each segment padded to whole quads (K4 = sum ceil(rows_s / 4)), zero rows
    panels  Wp  (P, K, 16) int8 | uint16 half | int16 bf16    Wp[p, k, j] = W[k, 16p + j]
    pairs   Wb2 (P, K2, 32) uint16 bf16  Wb2[p, q, 2j + r] = W[2q + r, 16p + j]   (vdpbf16ps)
"""

from __future__ import annotations

import threading

import numpy as np

from .aligned import aligned
from .errors import UnsupportedModelError

PANEL = 16
I8_MAX = 127
F16_MAX = 65504.0


# ---------------------------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------------------------
def quantize_columns(W, rows=None):
    """Symmetric per-column int8 quantization of W (K, C), per row segment.

    rows (S + 1,) segment bounds (default: one segment, [0, K]). Returns ``Wq (K, C) int8`` and
    ``scale (S, C) float32``: ``W[k, c] ~= scale[s, c] * Wq[k, c]`` for k in segment s.
    """
    W = np.asarray(W, dtype=np.float64)  # (K, C)
    K, C = W.shape
    rows = np.array([0, K] if rows is None else rows, dtype=np.int64)
    if not np.all(np.isfinite(W)):
        raise UnsupportedModelError("weights must be finite to be quantized")
    S = rows.size - 1
    scale = np.ones((S, C), dtype=np.float32)
    Wq = np.zeros((K, C), dtype=np.int8)
    for s in range(S):
        seg = W[rows[s] : rows[s + 1]]
        if seg.shape[0] == 0:
            continue
        m = np.abs(seg).max(axis=0)  # (C,)
        sc = np.where(m > 0, m / I8_MAX, 1.0).astype(np.float32)
        scale[s] = sc
        q = np.rint(seg / sc.astype(np.float64))
        Wq[rows[s] : rows[s + 1]] = np.clip(q, -I8_MAX, I8_MAX).astype(np.int8)
    return Wq, scale


def dequantize(Wq, scale, rows):
    """Wq (K, C) int8, scale (S, C), rows (S + 1,) -> W (K, C) float64."""
    W = np.asarray(Wq, dtype=np.float64).copy()
    for s in range(len(rows) - 1):
        W[rows[s] : rows[s + 1]] *= np.asarray(scale[s], np.float64)
    return W


def check_int32_range(K):
    """vpdpbusd sums K products u8 x s8 (|.| <= 255 * 127) into int32 without saturation."""
    if K * 255 * 128 >= 2**31:
        raise UnsupportedModelError(f"{K} rows overflow the int32 accumulator (at most {2**31 // (255 * 128)})")


def quad_rows(rows):
    """Segment bounds in row quads: each segment padded to whole quads. rows (S+1,) -> (S+1,)."""
    q = [0]
    for s in range(len(rows) - 1):
        q.append(q[-1] + -(-(int(rows[s + 1]) - int(rows[s])) // 4))
    return np.array(q, dtype=np.int64)


def pack_quads(Wq, rows):
    """Wq (K, C) int8 -> Wq4 (P, K4, 64) int8, each row segment padded to whole quads."""
    Wq = np.asarray(Wq, dtype=np.int8)
    K, C = Wq.shape
    _check_panels(C)
    qr = quad_rows(rows)
    padded = np.zeros((4 * int(qr[-1]), C), dtype=np.int8)  # (4*K4, C)
    for s in range(len(rows) - 1):
        n = int(rows[s + 1] - rows[s])
        padded[4 * qr[s] : 4 * qr[s] + n] = Wq[rows[s] : rows[s + 1]]
    K4 = int(qr[-1])
    # (K4, 4, P, 16) -> (P, K4, 16, 4)
    # on a 64-byte boundary (aligned.py): each panel row is one line, one zmm load
    return aligned(padded.reshape(K4, 4, C // PANEL, PANEL).transpose(2, 0, 3, 1)).reshape(
        C // PANEL, K4, 64)


def column_sums(Wq, rows):
    """Per-segment column sums of Wq: (S, C) int32 (the zero-point correction)."""
    Wq = np.asarray(Wq, dtype=np.int64)
    return np.stack([Wq[rows[s] : rows[s + 1]].sum(axis=0) for s in range(len(rows) - 1)]).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# 16-bit
# ---------------------------------------------------------------------------------------------
def to_bf16(W):
    """float -> bfloat16 bit patterns as **int16**, round to nearest, ties to even (NaN stays
    NaN). int16, not uint16: the dtype tells the kernels the format (uint16 is IEEE half)."""
    u = np.ascontiguousarray(W, dtype=np.float32).view(np.uint32).astype(np.uint64)  # (...)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = np.where(nan, (u >> 16) | 0x40, r)  # a quiet NaN, never rounded into Inf
    return r.astype(np.uint16).view(np.int16)


def from_bf16(B):
    """bfloat16 bit patterns (int16 or uint16) -> float32 (exact)."""
    return (np.asarray(B).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_f16(W):
    """float -> IEEE half bit patterns (uint16), round to nearest, ties to even. Values beyond
    half's range are refused (they would become infinite)."""
    W = np.asarray(W, dtype=np.float32)
    m = float(np.abs(W).max()) if W.size else 0.0
    if not np.isfinite(m) or m > F16_MAX:
        raise UnsupportedModelError(f"float16 weights need |w| <= {F16_MAX}, got a max of {m}")
    return W.astype(np.float16).view(np.uint16)


def from_f16(B):
    return np.asarray(B, dtype=np.uint16).view(np.float16).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------
def _check_panels(C):
    if C % PANEL:
        raise UnsupportedModelError(f"the gate matrix needs a multiple of {PANEL} columns, got {C}")


def pack_panels(W):
    """W (K, C) -> (P, K, 16), any dtype (int8 values, uint16 bit patterns, float32)."""
    W = np.asarray(W)
    K, C = W.shape
    _check_panels(C)
    return aligned(W.reshape(K, C // PANEL, PANEL).transpose(1, 0, 2))  # 64-byte aligned


def pack_pairs(B, rows):
    """bfloat16 bit patterns B (K, C) -> Wb2 (P, K2, 32) uint16, each row segment padded to
    whole pairs; also the segment bounds in pairs (S+1,)."""
    B = np.asarray(B).view(np.uint16)
    K, C = B.shape
    _check_panels(C)
    pr = [0]
    for s in range(len(rows) - 1):
        pr.append(pr[-1] + -(-(int(rows[s + 1]) - int(rows[s])) // 2))
    padded = np.zeros((2 * pr[-1], C), dtype=np.uint16)
    for s in range(len(rows) - 1):
        n = int(rows[s + 1] - rows[s])
        padded[2 * pr[s] : 2 * pr[s] + n] = B[rows[s] : rows[s + 1]]
    K2 = pr[-1]
    return aligned(padded.reshape(K2, 2, C // PANEL, PANEL).transpose(2, 0, 3, 1)).reshape(
        C // PANEL, K2, 32), np.array(pr, dtype=np.int64)  # 64-byte aligned


def unpack_quads(Wq4, rows):
    """:func:`pack_quads` undone: Wq4 (P, K4, 64) -> Wq (K, C), rows (S+1,) segment bounds."""
    P, K4 = Wq4.shape[0], Wq4.shape[1]
    padded = Wq4.reshape(P, K4, PANEL, 4).transpose(1, 3, 0, 2).reshape(4 * K4, P * PANEL)  # (4*K4, C)
    qr = quad_rows(rows)
    return np.concatenate([padded[4 * qr[s] : 4 * qr[s] + int(rows[s + 1] - rows[s])] for s in range(len(rows) - 1)])


def unpack_panels(Wp):
    """:func:`pack_panels` undone: (P, K, 16) -> W (K, C)."""
    P, K = Wp.shape[0], Wp.shape[1]
    return Wp.transpose(1, 0, 2).reshape(K, P * PANEL)


def unpack_pairs(Wb2, K):
    """:func:`pack_pairs` of one segment [0, K] undone: (P, K2, 32) -> B (K, C) uint16."""
    P, K2 = Wb2.shape[0], Wb2.shape[1]
    return Wb2.reshape(P, K2, PANEL, 2).transpose(1, 3, 0, 2).reshape(2 * K2, P * PANEL)[:K]


def split_bf16(z):
    """float32 z -> (hi, lo) bfloat16 bit patterns with hi + lo ~= z to ~2^-16 relative."""
    z = np.asarray(z, dtype=np.float32)
    hi = to_bf16(z)
    lo = to_bf16(z - from_bf16(hi))
    return hi, lo


# ---------------------------------------------------------------------------------------------
# Canonical gate rows -> the fused, transposed W (K, C)
# ---------------------------------------------------------------------------------------------
def padded_units(H: int) -> int:
    return -(-H // PANEL) * PANEL


def fuse_gates(w_ih, w_hh):
    """Canonical (4H, in) and (4H, out) gate rows (i, f, g, o) -> W (in + out, 4*Hp) float64, the
    layout of the float32 kernels with one chunk (padded units are zero columns)."""
    w_cat = np.concatenate([np.asarray(w_ih, np.float64), np.asarray(w_hh, np.float64)], axis=1)  # (4H, K)
    H4, K = w_cat.shape
    H = H4 // 4
    Hp = padded_units(H)
    g = np.zeros((4, Hp, K))
    g[:, :H] = w_cat.reshape(4, H, K)
    return np.ascontiguousarray(g.reshape(4 * Hp, K).T)


def unfuse_gates(W, H):
    """:func:`fuse_gates` undone (any dtype): W (K, 4*Hp) -> canonical rows (4H, K)."""
    K, C = W.shape
    return np.ascontiguousarray(W.T.reshape(4, C // 4, K)[:, :H].reshape(4 * H, K))


def unfuse_vector(v, H):
    """:func:`fuse_vector` undone: (4*Hp,) -> (4H,)."""
    return np.ascontiguousarray(np.asarray(v).reshape(4, -1)[:, :H].reshape(4 * H))


def fuse_vector(b, H):
    """(4H,) gate vector -> (4*Hp,) in W's column order."""
    Hp = padded_units(H)
    g = np.zeros((4, Hp))
    g[:, :H] = np.asarray(b, np.float64).reshape(4, H)
    return g.ravel()




# ---------------------------------------------------------------------------------------------
# One (layer, direction) in the form of the int8 kernels
# ---------------------------------------------------------------------------------------------
def pack_int8(w_ih, w_hh, s_ih, s_hh, bias=None) -> dict:
    """Canonical int8 gate rows and their per-row scales -> the arrays ``kernels_quant``'s int8
    gate functions take, with the input rows and the recurrent rows as two segments (their
    activations are quantized separately, and imported weights have a scale per segment).

    w_ih (4H, in) int8, w_hh (4H, out) int8, s_ih / s_hh (4H,) scales, bias (4H,) or None ->
    ``Wq4 (P, K4, 64)`` int8, ``Wp (P, K, 16)`` int8 (the float-activation layout), ``krows``
    and ``qrows`` (3,) segment bounds in rows and quads, ``sw (2, C)`` float32, ``colsum (2, C)``
    int32, ``bias (C,)`` float32; C = 4 * Hp columns in W's gate-major order.
    """
    w_ih = np.asarray(w_ih)
    w_hh = np.asarray(w_hh)
    H = w_ih.shape[0] // 4
    kin, out = w_ih.shape[1], w_hh.shape[1]
    Wq = fuse_gates(w_ih, w_hh).astype(np.int8)  # (K, C), exact: small integers through float64
    rows = np.array([0, kin, kin + out], dtype=np.int64)
    check_int32_range(kin + out)
    sw = np.stack([fuse_vector(s_ih, H), fuse_vector(s_hh, H)]).astype(np.float32)  # (2, C)
    return dict(Wq4=pack_quads(Wq, rows), Wp=pack_panels(Wq), krows=rows, qrows=quad_rows(rows),
                sw=sw, colsum=column_sums(Wq, rows),
                bias=fuse_vector(np.zeros(4 * H) if bias is None else bias, H).astype(np.float32))


def quantize_layer(w_ih, w_hh, bias=None):
    """Float canonical gate rows -> (:func:`pack_int8` arrays, w_ih_q, w_hh_q, scale (4H,)):
    symmetric per-output-channel int8, one scale per gate row over its fused [w_ih | w_hh] row."""
    q = ReducedLayer.convert(w_ih, w_hh, "int8")
    return pack_int8(q.w_ih, q.w_hh, q.s_ih, q.s_hh, bias), q.w_ih, q.w_hh, q.s_ih


# ---------------------------------------------------------------------------------------------
# A reduced stack, its stream and the conversion error (building blocks for weights=)
# ---------------------------------------------------------------------------------------------
#: Weight formats: float32 (the engine's own), int8 (per-column scales; VNNI with per-step
#: 16-bit activations where the CPU has it) and bfloat16 (the 16-bit format: fastest here).
FORMATS = ("float32", "int8", "bfloat16")


def check_format(weights) -> str:
    if weights not in FORMATS:
        from .errors import InputError

        raise InputError(f"weights must be one of {FORMATS}, got {weights!r}")
    return weights


class ReducedLayer:
    """The gate matrices of one (layer, direction) in a reduced format, canonical gate rows.

    int8: ``w_ih (4H, in)``, ``w_hh (4H, out)`` int8 and per-row scales ``s_ih``, ``s_hh (4H,)``
    float32 (equal for our own conversion: one scale per gate row over the fused [w_ih | w_hh]
    row; separate for an imported DynamicQuantizeLSTM). bfloat16: int16 bit patterns, no scales.
    """

    def __init__(self, fmt, w_ih, w_hh, s_ih=None, s_hh=None):
        self.fmt, self.w_ih, self.w_hh, self.s_ih, self.s_hh = fmt, w_ih, w_hh, s_ih, s_hh

    @classmethod
    def convert(cls, w_ih, w_hh, fmt) -> "ReducedLayer":
        """Float canonical rows -> int8 (symmetric per gate row) or bfloat16 (RNE)."""
        if fmt == "int8":
            w_cat = np.concatenate([np.asarray(w_ih, np.float64), np.asarray(w_hh, np.float64)], axis=1)
            q, sc = quantize_columns(w_cat.T)  # (K, 4H), (1, 4H)
            kin = np.shape(w_ih)[1]
            qt = np.ascontiguousarray(q.T)  # (4H, K)
            return cls(fmt, np.ascontiguousarray(qt[:, :kin]), np.ascontiguousarray(qt[:, kin:]), sc[0], sc[0])
        return cls(fmt, to_bf16(w_ih), to_bf16(w_hh))

    def weights(self):
        """What these weights stand for, as float64 (w_ih (4H, in), w_hh (4H, out))."""
        if self.fmt == "int8":
            return (self.s_ih.astype(np.float64)[:, None] * self.w_ih,
                    self.s_hh.astype(np.float64)[:, None] * self.w_hh)
        return from_bf16(self.w_ih).astype(np.float64), from_bf16(self.w_hh).astype(np.float64)

    @property
    def nbytes(self) -> int:
        scales = 0 if self.s_ih is None else self.s_ih.nbytes + self.s_hh.nbytes
        return int(self.w_ih.nbytes + self.w_hh.nbytes + scales)


def reduced_run_supported(layers, *, head=None, clip=None, input_forget=False) -> bool:
    """Whether :class:`ReducedStack` can run this model's whole sequences (``run``): one or two
    directions, forward or reverse, default activations, no peepholes, projection, head, clip or
    coupled gates (what :func:`kernels_quant.cells` is)."""
    if head is not None or clip or input_forget:
        return False
    for row in layers:
        for p in row:
            if p.peephole is not None or p.w_hr is not None or (
                    p.activations is not None and [a.name for a in p.activations] != ["Sigmoid", "Tanh", "Tanh"]):
                return False
    return True


def reduced_stream_supported(layers, *, head=None, clip=None, input_forget=False, reverse=False) -> bool:
    """Whether :class:`ReducedStack` can step this model: :func:`reduced_run_supported` with
    one direction, forward."""
    return not reverse and all(len(row) == 1 for row in layers) and reduced_run_supported(
        layers, head=head, clip=clip, input_forget=input_forget)


class ReducedStack:
    """The gate matrices of a stack in a reduced format, biases in float32, with the host's
    kernels (:func:`kernels_quant.select_int8`; ``feats`` or ``kernel`` override).

    ``layers[l][d]`` canonical :class:`~lstm_cpu.spec.LayerParams` (biases; and the weights to
    convert when ``reduced`` is None); ``reduced[l][d]`` (or ``reduced[l]`` for one direction):
    the :class:`ReducedLayer` when the weights are already reduced (a loaded file, an imported
    quantized node). Models outside :func:`reduced_run_supported` are refused with
    :class:`UnsupportedModelError`; one-direction stacks also step (:attr:`streamable`).

    Per (layer, direction) ``i = l * D + d``, ``prms[i]`` is the tuple of gate arguments that the
    format's ``kernels_quant.*_gates_batch`` takes; ``gates`` is that function and ``kern`` the
    lone product kernel (``batch`` its N-stream twin).
    """

    def __init__(self, layers, fmt, feats=None, kernel=None, reduced=None):
        from . import kernels_quant as KQ

        if fmt not in ("int8", "bfloat16"):
            raise UnsupportedModelError(f"reduced weights are 'int8' or 'bfloat16', got {fmt!r}")
        if not reduced_run_supported(layers):
            raise UnsupportedModelError(
                f"{fmt} weights need default activations and no peepholes or projection (for now)")
        D = len(layers[0])
        if reduced is None:
            reduced = [[ReducedLayer.convert(p.w_ih, p.w_hh, fmt) for p in row] for row in layers]
        reduced = [list(r) if isinstance(r, (list, tuple)) else [r] for r in reduced]
        flat = [q for row in reduced for q in row]  # (L*D,) index l*D + d
        self.fmt = fmt
        self._kin = [int(np.shape(q.w_ih)[1]) for q in flat]  # input rows per (layer, direction)
        self.L = len(layers)
        self.D = D
        #: one direction: N streams can step it (a bidirectional model only runs; LSTMModel
        #: refuses streams of a reverse one)
        self.streamable = D == 1
        self.H = layers[0][0].hidden_size
        self.I = np.shape(layers[0][0].w_ih)[1]
        self.C = 4 * padded_units(self.H)
        self._biases = [np.zeros(4 * self.H) if p.bias is None else p.bias for row in layers for p in row]
        biases = self._biases
        if fmt == "int8":
            self.kind, self.kern = KQ.select_int8(feats) if kernel is None else kernel
            packed = [pack_int8(q.w_ih, q.w_hh, q.s_ih, q.s_hh, b) for q, b in zip(flat, biases)]
            self.W = tuple(p["Wq4"] if self.kind == "a16" else p["Wp"] for p in packed)
            self.sw = tuple(p["sw"] for p in packed)
            self.colsum = tuple(p["colsum"] for p in packed)
            self.krows = np.stack([p["krows"] for p in packed])
            self.qrows = np.stack([p["qrows"] for p in packed])
            self.bias = tuple(p["bias"] for p in packed)
            if self.kind == "a16":
                self.gates = KQ.i8a16_gates_batch
                self.prms = tuple((w, k, q, sw, cs, b) for w, k, q, sw, cs, b in zip(
                    self.W, self.krows, self.qrows, self.sw, self.colsum, self.bias))
            else:
                self.gates = KQ.w_gates_batch
                self.prms = tuple((w, k, sw, b) for w, k, sw, b in zip(self.W, self.krows, self.sw, self.bias))
        else:
            dp = KQ.has_bf16dp(feats) if kernel is None else kernel[0] == "dp"
            self.kind, self.kern = ("dp", KQ.bf16_dp) if dp else ("fma", KQ.fma_panels)
            B = [fuse_gates(q.w_ih, q.w_hh).astype(np.int16) for q in flat]  # (K, C) bit patterns
            pairs = [pack_pairs(b, np.array([0, b.shape[0]])) for b in B]
            self.W = tuple(p[0] for p in pairs) if dp else tuple(pack_panels(b) for b in B)
            self.krows = np.stack([np.array([0, b.shape[0]]) for b in B])
            self.qrows = np.stack([p[1] for p in pairs])
            self.sw = tuple(np.ones((1, self.C), np.float32) for _ in B)
            self.bias = tuple(fuse_vector(b, self.H).astype(np.float32) for b in biases)
            if dp:
                self.gates = KQ.bf16_gates_batch
                self.prms = tuple((w, k, q, b) for w, k, q, b in zip(self.W, self.krows, self.qrows, self.bias))
            else:
                self.gates = KQ.w_gates_batch
                self.prms = tuple((w, k, sw, b) for w, k, sw, b in zip(self.W, self.krows, self.sw, self.bias))
        self.batch = KQ.batch_kernel(self.kern)

    @property
    def deq(self):
        """What the reduced weights stand for: ``[[LayerParams per direction] per layer]``, float64
        weights with the float32 biases (built on demand: the stack keeps only reduced weights)."""
        from .spec import LayerParams

        it = iter(self._biases)
        return [[LayerParams(*q.weights(), bias=np.asarray(next(it), np.float32).astype(np.float64))
                 for q in row] for row in self.canonical()]

    def canonical(self):
        """The reduced gate matrices as canonical rows, ``[[ReducedLayer per direction] per
        layer]``, unpacked from the kernels' layouts (exactly: a stack keeps no other copy)."""
        flat = []
        for i, kin in enumerate(self._kin):
            if self.fmt == "int8":
                W = unpack_quads(self.W[i], self.krows[i]) if self.kind == "a16" else unpack_panels(self.W[i])
                g = unfuse_gates(W, self.H)  # (4H, K) int8
                q = ReducedLayer("int8", np.ascontiguousarray(g[:, :kin]), np.ascontiguousarray(g[:, kin:]),
                                 unfuse_vector(self.sw[i][0], self.H), unfuse_vector(self.sw[i][1], self.H))
            else:
                K = int(self.krows[i, -1])
                B = unpack_pairs(self.W[i], K) if self.kind == "dp" else unpack_panels(self.W[i])
                g = unfuse_gates(B.view(np.int16), self.H)  # (4H, K) bfloat16 bit patterns
                q = ReducedLayer("bfloat16", np.ascontiguousarray(g[:, :kin]), np.ascontiguousarray(g[:, kin:]))
            flat.append(q)
        return [flat[l * self.D : (l + 1) * self.D] for l in range(self.L)]

    @property
    def canonical_nbytes(self) -> int:
        """``ReducedLayer.nbytes`` summed over :meth:`canonical` (without unpacking)."""
        per = 1 if self.fmt == "int8" else 2
        scales = 2 * 4 * self.H * 4 if self.fmt == "int8" else 0
        return int(sum(4 * self.H * int(self.krows[i, -1]) * per + scales for i in range(len(self._kin))))

    @property
    def nbytes(self) -> int:
        """Bytes of the reduced gate matrices and their scales (what a step reads)."""
        return int(sum(w.nbytes for w in self.W) + sum(s.nbytes for s in self.sw))

    def scratch(self, N):
        """``(z (N, Kmax) float32, scr, acc (N, C) float32)``: the scratch of N streams, zeroed.
        ``scr`` is the format's tuple (see the ``*_gates_batch`` functions): a16 ``(zhi, zlo
        (N, 4*K4max) uint8, sz (N, S) float32, ihi, ilo (N, S, C) int32)``; dp ``(zhi, zlo
        (N, 2*K2max) uint16, facc (N, C) float32)``; deq / fma ``(facc (N, C) float32,)``."""
        Kmax = int(self.krows[:, -1].max())
        S = self.krows.shape[1] - 1
        z = np.zeros((N, Kmax), np.float32)
        acc = np.zeros((N, self.C), np.float32)
        if self.kind == "a16":
            n = 4 * int(self.qrows[:, -1].max())
            scr = (np.zeros((N, n), np.uint8), np.zeros((N, n), np.uint8), np.zeros((N, S), np.float32),
                   np.zeros((N, S, self.C), np.int32), np.zeros((N, S, self.C), np.int32))
        elif self.kind == "dp":
            n = 2 * int(self.qrows[:, -1].max())
            scr = (np.zeros((N, n), np.uint16), np.zeros((N, n), np.uint16), np.zeros((N, self.C), np.float32))
        else:
            scr = (np.zeros((N, self.C), np.float32),)
        return z, scr, acc

    def stream(self, h=None, c=None) -> "ReducedStream":
        return ReducedStream(self, h, c)

    def streams(self, N, h=None, c=None, groups=1) -> "ReducedBatch":
        """N streams stepped together (state ``h (L, N, H)``, ``c (L, N, Hp)``: views the caller
        passes, or new zeros), in ``groups`` ranges on threads at once."""
        return ReducedBatch(self, N, h, c, groups)

    def run_groups(self, x, h0, c0, lengths, reverse=False, groups=1):
        """:meth:`run` with the B sequences in ``groups`` ranges on threads at once (sequences
        are independent; each range is run as its own batch, which gives every sequence the bits
        it gets in any batch)."""
        bounds = group_bounds(x.shape[1], groups)
        if len(bounds) == 1:
            return self.run(x, h0, c0, lengths, reverse)
        parts = run_on_threads([(self.run, (x[:, a:b], h0[:, a:b], c0[:, a:b], lengths[a:b], reverse))
                                for a, b in bounds])
        return tuple(np.concatenate([p[k] for p in parts], axis=1) for k in range(3))

    def run(self, x, h0, c0, lengths, reverse=False):
        """Whole sequences through the reduced kernels, layer by layer (``LSTMModel.run``).

        x (T, B, I) float32; h0, c0 (L*D, B, H) float32; lengths (B,) int64 in [0, T] ->
        ``y (T, B, D*H)``, ``hN``, ``cN (L*D, B, H)``: outputs past a sequence's length are zero,
        its final state is the state at its last valid step, the backward direction (d = 1, or
        ``reverse``) starts from that step, and a sequence of length 0 ends in a zero state (as
        onnxruntime). A one-direction forward stack gives each sequence the bits its stream gets
        step by step (:class:`ReducedBatch`), whatever B is."""
        from . import kernels_quant as KQ

        T, B = x.shape[0], x.shape[1]
        L, D, H, Hp = self.L, self.D, self.H, self.C // 4
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        hN = np.empty((L * D, B, H), np.float32)
        cN = np.empty((L * D, B, H), np.float32)
        z, scr, acc = self.scratch(B)
        live = np.zeros(B, np.int64)
        inp = np.ascontiguousarray(x, dtype=np.float32)  # (T, B, I), then (T, B, D*H)
        if not inp.flags.writeable:  # a read-only array would be another Numba type
            inp = inp.copy()
        for l in range(L):
            y = np.zeros((T, B, D * H), np.float32)  # (T, B, D*H) direction d: columns d*H..
            for d in range(D):
                i = l * D + d
                h = np.array(h0[i], dtype=np.float32, order="C")  # (B, H) a copy
                c = np.zeros((B, Hp), np.float32)  # (B, Hp) padded cell state
                c[:, :H] = c0[i]
                if z.shape[1] != self.krows[i, -1]:
                    z = np.zeros((B, int(self.krows[i, -1])), np.float32)  # (B, K) this layer's rows
                KQ.layer_run_batch(self.gates, self.batch, inp, d == 1 or bool(reverse), lengths, self.prms[i],
                                   h, c, y, d * H, z, scr, acc, live)
                hN[i], cN[i] = h, c[:, :H]
            empty = lengths == 0  # onnxruntime: a sequence of length 0 ends in a zero state
            if empty.any():
                hN[l * D:(l + 1) * D, empty] = 0
                cN[l * D:(l + 1) * D, empty] = 0
            inp = y
        return inp, hN, cN


# ---------------------------------------------------------------------------------------------
# Groups of streams on threads. The reduced kernels are serial, nogil Numba functions, and
# streams (or sequences) are independent, so G ranges of one batch run at once on G threads:
# each range has its own scratch and writes only its streams of the shared, contiguous state,
# with each stream's arithmetic unchanged (its bits too). Numba's prange cannot take the
# formats' tuples of arrays ("scalar type Tuple(...) given for non scalar argument"), hence
# threads of our own.
# ---------------------------------------------------------------------------------------------
_pool = None
_pool_lock = threading.Lock()


def run_on_threads(calls):
    """Run ``calls`` [(fn, args)] at once: the first on this thread, the rest on lstm-cpu's own
    pool (no other library's thread settings are touched). Returns their results in order."""
    global _pool
    if len(calls) == 1:
        fn, args = calls[0]
        return [fn(*args)]
    from concurrent.futures import ThreadPoolExecutor

    with _pool_lock:
        if _pool is None or _pool._max_workers < len(calls) - 1:
            _pool = ThreadPoolExecutor(max_workers=len(calls) - 1, thread_name_prefix="lstm-cpu")
        pool = _pool
    futures = [pool.submit(fn, *args) for fn, args in calls[1:]]
    first = calls[0][0](*calls[0][1])
    return [first] + [f.result() for f in futures]


def group_bounds(n: int, groups: int):
    """[(n0, n1)]: ``groups`` contiguous ranges of n streams, cut at multiples of four (the
    kernels' blocks), as even as that allows; fewer if n is small."""
    quads = -(-n // 4)
    groups = max(1, min(int(groups), quads))
    cuts = [min(n, 4 * (quads * g // groups)) for g in range(groups + 1)]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


class ReducedBatch:
    """N streams over a one-direction :class:`ReducedStack`, stepped together: every weight
    vector is loaded once for four streams. The state ``h (L, N, H)``, ``c (L, N, Hp)`` float32
    C-contiguous is its own, or views the caller passes (``Stream`` passes its state buffer, so
    ``state``/``reset`` work unchanged). A stream's outputs do not depend on N, on its place in
    the batch, nor on stepping one sample at a time or a chunk at a time."""

    def __init__(self, stack: ReducedStack, N: int, h=None, c=None, groups: int = 1):
        from . import kernels as K0
        from . import kernels_quant as KQ

        s = stack
        if not s.streamable:
            raise UnsupportedModelError("only a one-direction stack steps; a bidirectional one runs whole sequences")
        self.stack, self.N = s, N
        Hp = s.C // 4
        self.h = np.zeros((s.L, N, s.H), np.float32) if h is None else h  # (L, N, H)
        self.c = np.zeros((s.L, N, Hp), np.float32) if c is None else c  # (L, N, Hp)
        z, scr, acc = s.scratch(N)
        self._lead = (s.gates, s.batch)
        self._args = (s.prms, self.h, self.c)
        #: per range of streams (``groups`` of them, run at once on threads): (n0, n1, its
        #: scratch: row slices of one allocation, C-contiguous like the whole)
        self._ranges = [(n0, n1, (z[n0:n1], tuple(a[n0:n1] for a in scr), acc[n0:n1]))
                        for n0, n1 in group_bounds(N, groups)]
        self.groups = len(self._ranges)
        x0 = np.zeros(N * s.I, np.float32)
        y0 = np.zeros(N * s.H, np.float32)
        self._step = K0.compiled_entry(KQ.stack_step_batch, (*self._lead, x0, *self._args, y0,
                                                             *self._ranges[0][2], 0, N))
        self._run = KQ.stack_run_batch

    def reset(self):
        self.h[...] = 0
        self.c[...] = 0

    def step_into(self, x, y):
        """The hot path for ``Stream``: x (N*I,) float32 C-contiguous, writable, stream-major;
        y (N*H,) float32 <- h[L-1]."""
        if self.groups == 1:
            self._step(*self._lead, x, *self._args, y, *self._ranges[0][2], 0, self.N)
            return
        run_on_threads([(self._step, (*self._lead, x, *self._args, y, *scratch, n0, n1))
                        for n0, n1, scratch in self._ranges])

    def run_into(self, xs, ys):
        """T steps: xs (T, N*I), ys (T, N*H) float32 C-contiguous, writable (each range of
        streams runs all T steps on its thread: one hand-over per chunk)."""
        run_on_threads([(self._run, (*self._lead, xs, *self._args, ys, *scratch, n0, n1))
                        for n0, n1, scratch in self._ranges])


class ReducedStream:
    """One stream over a :class:`ReducedStack`: ``step(x (I,)) -> h (H,)`` float32 (a
    :class:`ReducedBatch` of one). The state ``h (L, H)``, ``c (L, Hp)`` float32 C-contiguous
    is its own, or views the caller passes."""

    def __init__(self, stack: ReducedStack, h=None, c=None):
        s = stack
        Hp = s.C // 4
        self.stack = s
        self.h = np.zeros((s.L, s.H), np.float32) if h is None else h  # (L, H)
        self.c = np.zeros((s.L, Hp), np.float32) if c is None else c  # (L, Hp)
        self._b = ReducedBatch(s, 1, self.h.reshape(s.L, 1, s.H), self.c.reshape(s.L, 1, Hp))

    def reset(self):
        self.h[...] = 0
        self.c[...] = 0

    def step(self, x):
        x = np.array(x, dtype=np.float32).reshape(self.stack.I)
        y = np.empty(self.stack.H, np.float32)
        self._b.step_into(x, y)
        return y

    def step_into(self, x, y):
        self._b.step_into(x, y)


def error_estimate(reference, model, steps=1000, seed=0) -> float:
    """The max abs output error of ``model`` (reduced weights) against ``reference`` (the same
    model in float32) over a fixed random input: ``steps`` inputs N(0, 1) from
    ``numpy.random.default_rng(seed)``, state fed back (issue 11's definition). Streamed step by
    step when the model streams (so the reduced step kernels are what is measured), else one
    whole sequence through ``run``."""
    xs = np.random.default_rng(seed).standard_normal((steps, model.input_size)).astype(np.float32)
    if model.num_directions == 1 and not model.reverse:
        a, b = reference.stream(kernel="serial"), model.stream(kernel="serial")
        return float(max(np.abs(a.step(x) - b.step(x)).max() for x in xs))
    ya, _ = reference.run(xs)
    yb, _ = model.run(xs)
    return float(np.abs(ya - yb).max())
