"""The packed layout: how canonical weights become the flat buffers the kernels read.

This module is the one place that defines the packed layout. The kernels read the field indices
below; Python reads a frozen :class:`Plan`, whose view helpers are the only place offsets are
computed. (Numba's on-disk cache keys on the kernel file: when a constant here changes, bump
:data:`LAYOUT_VERSION`, and ``kernels.py`` must be edited to match it, which invalidates the cache.
``tests/test_layout.py`` hashes the constants and fails on a change without a bump.)

Why this layout
---------------
A step must read every weight once, so the gate product is memory-bound. We fuse
``[W_ih | W_hh]`` into one matrix per layer and direction, *transposed*, and store it as
column panels of :data:`PANEL` columns::

    W   (K, C)      K = in + out rows (the concatenated [x | h_prev]), C = 4 * Hp columns
    W[k, g*Hp + u] = canonical_gate_g_weight[u, k]          g in GATE_ORDER (i, f, g, o)
    Wp  (C / PANEL, K, PANEL)      Wp[p, k, j] = W[k, p*PANEL + j]   (what wbuf holds)

``H`` is padded to ``Hp``, a multiple of :data:`UNIT_ALIGN` (16 float32 = one AVX-512 vector, two
AVX2 vectors), so C is a multiple of PANEL; padded units have zero weights and never feed a real
unit. A panel is K rows of 64 contiguous floats: the kernels keep a block of streams x 64
columns of the gate pre-activations in vector registers while they stream the whole panel once
(``kernels._block``), and a range of panels is one contiguous stretch of memory, so a thread
splitting the columns reads its own part of W sequentially. Each output element gets the same
sums in the same order whichever panels a thread computes and however many streams share the
pass, so results do not depend on the thread count or the batch. (Stored row-major, a register
block would walk W down a column at a stride of 4*C bytes, one page per row at C = 1024:
measured 3x-6x slower than the packed panel on the same kernel.)

Model buffers
-------------
``wbuf`` (float, 1-D) holds typed constants (``W_*``), then per (layer l, direction d)::

    Wp     (C/PANEL, K_l, PANEL)   fused, transposed gate matrix in column panels
    bias   (C,)         folded bias, same column order
    peep   (3, Hp)      peepholes i, f, o (only if the model has peepholes)
    w_hr   (Hp, P)      projection, transposed (only if P > 0)

and once, after the stack, an optional linear head ``head_w (D*out, O)``, ``head_b (O,)``.

``meta`` (int64, 1-D): the header fields ``M_*`` below, then one ``LD_STRIDE`` record per
(layer, direction) at ``M_LD + (l*D + d) * LD_STRIDE`` with fields ``LD_*``. Kernels read it;
Python reads the :class:`Plan` it was made from.
``fpar`` (float64, 1-D): ``[clip, then per (l, d): alpha_f, beta_f, alpha_g, beta_g, alpha_h, beta_h]``.

Stream buffer ``sbuf`` (float, 1-D), for ``N`` streams (see :func:`sbuf_offsets`)::

    h    (L, N, out)     hidden state (projected if P > 0)
    c    (L, N, Hp)      cell state (padded)
    z    (N, Kmax)       [input | h_prev] of the layer being computed
    acc  (N, C)          gate pre-activations
    m    (N, Hp)         o * h_act(c), before the projection
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from .spec import GATE_ORDER, LayerParams, is_default_activations

#: Bump on any change to the constants or offsets below (see the module docstring).
LAYOUT_VERSION = 7

# ---------------------------------------------------------------------------------------------
# meta header fields (int64)
# ---------------------------------------------------------------------------------------------
M_L = 0  # layers
M_D = 1  # directions (1 or 2)
M_I = 2  # input size of layer 0
M_H = 3  # hidden units
M_OUT = 4  # out = P if projected else H
M_P = 5  # projection size, 0 if none
M_HP = 6  # padded hidden Hp, a multiple of UNIT_ALIGN
M_C = 7  # columns C = 4 * Hp
M_KMAX = 8  # max rows K over layers
M_PEEP = 9  # 1 if peepholes
M_COUPLED = 10  # 1 if input_forget (f = 1 - i, as onnxruntime computes it)
M_GENERAL = 11  # 1 if any activation is not (Sigmoid, Tanh, Tanh): the general epilogue
M_APPROX = 12  # 1: float32 rational tanh/sigmoid; 0: libm (float64 models)
M_HEAD_O = 13  # head outputs O, 0 if no head
M_HEAD_W = 14  # offset of head_w (D*out, O)
M_HEAD_B = 15  # offset of head_b (O,)
M_REVERSE = 16  # 1: a one-direction model that runs backwards in time (ONNX direction="reverse")
M_LD = 20  # first (layer, direction) record

# per (layer, direction) record fields
LD_K = 0  # rows of W: in_l + out
LD_W = 1  # offset of W (K, C)
LD_B = 2  # offset of bias (C,)
LD_PEEP = 3  # offset of peep (3, Hp)
LD_HR = 4  # offset of w_hr (Hp, P)
LD_ACT = 5  # activation codes f, g, h at LD_ACT + 0..2
LD_STRIDE = 8

# typed constants at the start of wbuf, so kernels get them in the model's own float type
# (a float64 Python literal would silently promote float32 arithmetic to float64)
W_ZERO = 0
W_HALF = 1
W_ONE = 2
W_CLIP = 3  # cell clip, 0 if none
W_CONSTS = 4  # pieces start here

# fpar
F_CLIP = 0
F_LD = 1
F_STRIDE = 6

#: Hidden units are padded to a multiple of this: each gate block is whole 512-bit vectors.
UNIT_ALIGN = 16

#: Columns per panel of the gate matrix (C = 4 * Hp is a multiple of it).
PANEL = 64

#: A parallel kernel gives each thread at least this many units (fewer costs more in wake-ups
#: than it saves); ranges start at multiples of UNIT_ALIGN. Decided at run time, not packed.
MIN_RANGE_UNITS = 64

#: Limits on the sizes a plan may state (a packed file's header is untrusted).
MAX_DIM = 1 << 24
MAX_LAYERS = 4096


def padded_units(hidden_size: int) -> int:
    return -(-int(hidden_size) // UNIT_ALIGN) * UNIT_ALIGN


def layout_fingerprint() -> str:
    """SHA-256 of every layout constant: a change here must come with a LAYOUT_VERSION bump."""
    names = sorted(k for k, v in globals().items()
                   if k.isupper() and k != "LAYOUT_VERSION" and isinstance(v, int))
    text = ";".join(f"{k}={globals()[k]}" for k in names)
    return hashlib.sha256(text.encode()).hexdigest()


class PlanError(ValueError):
    """Stated sizes or offsets that no model of this layout has (the packed loader names the file)."""


@dataclass(frozen=True)
class Record:
    """Offsets in ``wbuf`` of one (layer, direction), and its row count K."""

    K: int
    w: int  # Wp (C/PANEL, K, PANEL)
    b: int  # bias (C,)
    peep: int  # peep (3, Hp), 0 if none
    hr: int  # w_hr (Hp, P), 0 if none


@dataclass(frozen=True, eq=False)
class Plan:
    """The typed, immutable description of one packed model: sizes, flags and offsets.

    Built once (by :func:`pack`, or :meth:`from_meta` for a packed file); ``meta`` is the flat
    int64 form the kernels read, made from the same fields.
    """

    L: int
    D: int
    I: int  # noqa: E741 - the input size, as everywhere in the equations
    H: int
    P: int  # projection size, 0 if none
    has_peep: bool
    coupled: bool
    general: bool
    approx: bool
    reverse: bool
    head_o: int
    act_codes: Tuple[Tuple[int, int, int], ...]  # per (l, d): f, g, h codes
    records: Tuple[Record, ...]  # per (l, d), index l*D + d
    head_w: int
    head_b: int
    total: int  # wbuf length
    meta: np.ndarray  # (M_LD + L*D*LD_STRIDE,) int64, read-only

    # -- derived sizes -----------------------------------------------------------------------
    @property
    def out(self) -> int:
        return self.P or self.H

    @property
    def Hp(self) -> int:
        return padded_units(self.H)

    @property
    def C(self) -> int:
        return 4 * self.Hp

    @property
    def kmax(self) -> int:
        return max(r.K for r in self.records)

    @property
    def output_size(self) -> int:
        return self.head_o or self.D * self.out

    def record(self, l: int, d: int) -> Record:
        return self.records[l * self.D + d]

    def input_rows(self, l: int) -> int:
        """Rows of layer l's W that multiply its input (the rest multiply h_prev)."""
        return self.record(l, 0).K - self.out

    # -- views of wbuf: the only place offsets are turned into arrays ---------------------------
    def gate_panels(self, wbuf: np.ndarray, l: int, d: int) -> np.ndarray:
        """Wp (C/PANEL, K, PANEL) of layer l, direction d, the form wbuf holds (a view)."""
        r = self.record(l, d)
        return wbuf[r.w : r.w + r.K * self.C].reshape(self.C // PANEL, r.K, PANEL)

    def gate_matrix(self, wbuf: np.ndarray, l: int, d: int) -> np.ndarray:
        """W (K, C) of layer l, direction d (a copy): rows [x | h_prev], columns gates i, f, g, o x Hp."""
        wp = self.gate_panels(wbuf, l, d)
        return np.ascontiguousarray(wp.transpose(1, 0, 2)).reshape(wp.shape[1], self.C)

    def bias(self, wbuf: np.ndarray, l: int, d: int) -> np.ndarray:
        """bias (C,) of layer l, direction d, in W's column order."""
        r = self.record(l, d)
        return wbuf[r.b : r.b + self.C]

    def peephole(self, wbuf: np.ndarray, l: int, d: int) -> Optional[np.ndarray]:
        """peep (3, Hp) rows i, f, o, or None."""
        if not self.has_peep:
            return None
        r = self.record(l, d)
        return wbuf[r.peep : r.peep + 3 * self.Hp].reshape(3, self.Hp)

    def projection(self, wbuf: np.ndarray, l: int, d: int) -> Optional[np.ndarray]:
        """w_hr transposed (Hp, P), or None."""
        if not self.P:
            return None
        r = self.record(l, d)
        return wbuf[r.hr : r.hr + self.Hp * self.P].reshape(self.Hp, self.P)

    def head(self, wbuf: np.ndarray):
        """(head_w (D*out, O), head_b (O,)) views, or None."""
        if not self.head_o:
            return None
        n = self.D * self.out * self.head_o
        return (wbuf[self.head_w : self.head_w + n].reshape(self.D * self.out, self.head_o),
                wbuf[self.head_b : self.head_b + self.head_o])

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def build(cls, L, D, I, H, P, *, has_peep, coupled, general, approx, head_o=0,  # noqa: E741
              act_codes=None, reverse=False) -> "Plan":
        """The offsets for a model of these sizes (sizes are trusted: check them first)."""
        L, D, I, H, P, head_o = (int(v) for v in (L, D, I, H, P, head_o))
        out = P or H
        Hp = padded_units(H)
        C = 4 * Hp
        if act_codes is None:
            act_codes = [(0, 1, 1)] * (L * D)
        act_codes = tuple(tuple(int(v) for v in a) for a in act_codes)
        offset = W_CONSTS
        records = []
        for l in range(L):
            for _d in range(D):
                K = (I if l == 0 else D * out) + out
                w = offset
                offset += K * C
                b = offset
                offset += C
                peep = hr = 0
                if has_peep:
                    peep = offset
                    offset += 3 * Hp
                if P:
                    hr = offset
                    offset += Hp * P
                records.append(Record(K, w, b, peep, hr))
        head_w = head_b = 0
        if head_o:
            head_w = offset
            offset += D * out * head_o
            head_b = offset
            offset += head_o
        meta = np.zeros(M_LD + L * D * LD_STRIDE, dtype=np.int64)
        meta[M_L], meta[M_D], meta[M_I], meta[M_H], meta[M_OUT], meta[M_P] = L, D, I, H, out, P
        meta[M_HP], meta[M_C], meta[M_KMAX] = Hp, C, max(r.K for r in records)
        meta[M_PEEP], meta[M_COUPLED] = int(has_peep), int(coupled)
        meta[M_GENERAL], meta[M_APPROX], meta[M_REVERSE] = int(general), int(approx), int(reverse)
        meta[M_HEAD_O], meta[M_HEAD_W], meta[M_HEAD_B] = head_o, head_w, head_b
        for j, r in enumerate(records):
            rec = M_LD + j * LD_STRIDE
            meta[rec + LD_K], meta[rec + LD_W], meta[rec + LD_B] = r.K, r.w, r.b
            meta[rec + LD_PEEP], meta[rec + LD_HR] = r.peep, r.hr
            meta[rec + LD_ACT : rec + LD_ACT + 3] = act_codes[j]
        meta.flags.writeable = False
        return cls(L, D, I, H, P, bool(has_peep), bool(coupled), bool(general), bool(approx),
                   bool(reverse), head_o, act_codes, tuple(records), head_w, head_b, offset, meta)

    @classmethod
    def from_meta(cls, meta: np.ndarray, n_activations: int = 11) -> "Plan":
        """Rebuild the plan from an untrusted ``meta`` (a packed file's): every size is bounded,
        the offsets are recomputed, and any entry that differs raises :class:`PlanError`."""
        meta = np.asarray(meta)
        if meta.dtype != np.int64 or meta.ndim != 1 or meta.size < M_LD:
            raise PlanError(f"meta must be 1-D int64 with at least {M_LD} entries, "
                            f"got {meta.dtype} {meta.shape}")
        L, D, I, H, P, head_o = (int(meta[k]) for k in (M_L, M_D, M_I, M_H, M_P, M_HEAD_O))
        for what, v, lo, hi in (("layers", L, 1, MAX_LAYERS), ("input size", I, 1, MAX_DIM),
                                ("hidden size", H, 1, MAX_DIM), ("projection", P, 0, MAX_DIM),
                                ("head size", head_o, 0, MAX_DIM), ("directions", D, 1, 2)):
            if not lo <= v <= hi:
                raise PlanError(f"{what} {v} is outside [{lo}, {hi}]")
        if meta.size != M_LD + L * D * LD_STRIDE:
            raise PlanError(f"meta has {meta.size} entries, expected {M_LD + L * D * LD_STRIDE} "
                            f"for {L} layer(s) x {D} direction(s)")
        codes = meta[M_LD:].reshape(L * D, LD_STRIDE)[:, LD_ACT:LD_ACT + 3]
        if np.any(codes < 0) or np.any(codes >= n_activations):
            raise PlanError(f"activation codes must be 0..{n_activations - 1}, got {codes.tolist()}")
        flags = {k: int(meta[i]) for k, i in (("has_peep", M_PEEP), ("coupled", M_COUPLED),
                                               ("general", M_GENERAL), ("approx", M_APPROX),
                                               ("reverse", M_REVERSE))}
        if any(v not in (0, 1) for v in flags.values()):
            raise PlanError(f"flags must be 0 or 1, got {flags}")
        plan = cls.build(L, D, I, H, P, head_o=head_o, act_codes=codes.tolist(),
                         **{k: bool(v) for k, v in flags.items()})
        if not np.array_equal(plan.meta, meta):
            bad = int(np.flatnonzero(plan.meta != meta)[0])
            raise PlanError(f"layout entry {bad} is {int(meta[bad])}, expected {int(plan.meta[bad])} "
                            f"for a model of these sizes")
        return plan


# ---------------------------------------------------------------------------------------------
# Packing and unpacking
# ---------------------------------------------------------------------------------------------
def _columns(mat: np.ndarray, H: int, Hp: int) -> np.ndarray:
    """(4H, K) canonical gate-major rows -> (K, 4*Hp) transposed columns (zero-padded units)."""
    K = mat.shape[1]
    gates = np.zeros((4, Hp, K), dtype=np.float64)  # (gate, Hp, K)
    gates[:, :H, :] = mat.reshape(4, H, K)
    return gates.reshape(4 * Hp, K).T  # (K, C)


def to_panels(W: np.ndarray) -> np.ndarray:
    """W (K, C) -> Wp (C/PANEL, K, PANEL), the order wbuf holds a gate matrix in (a copy)."""
    K, C = W.shape
    return np.ascontiguousarray(W.reshape(K, C // PANEL, PANEL).transpose(1, 0, 2))


def pack(layers: Sequence[Sequence[LayerParams]], *, clip, input_forget, dtype, head=None,
         reverse=False):
    """Canonical ``layers[l][d]`` -> ``(plan, wbuf, fpar)``. All validation happens before this."""
    L, D = len(layers), len(layers[0])
    p0: LayerParams = layers[0][0]
    H, out, I = p0.hidden_size, p0.output_size, p0.input_size
    P = 0 if p0.w_hr is None else out
    has_peep = any(p.peephole is not None for row in layers for p in row)
    general = not all(is_default_activations(p.activations) for row in layers for p in row)
    codes = [[a.code for a in p.activations] for row in layers for p in row]
    head_o = 0 if head is None else int(np.shape(head[0])[0])
    plan = Plan.build(L, D, I, H, P, has_peep=has_peep, coupled=bool(input_forget),
                      general=general, approx=np.dtype(dtype) == np.float32, head_o=head_o,
                      act_codes=codes, reverse=reverse)
    Hp = plan.Hp
    wbuf = np.zeros(plan.total, dtype=np.float64)
    wbuf[W_HALF], wbuf[W_ONE] = 0.5, 1.0
    wbuf[W_CLIP] = 0.0 if not clip else float(clip)
    fpar = np.zeros(F_LD + L * D * F_STRIDE, dtype=np.float64)
    fpar[F_CLIP] = np.dtype(dtype).type(wbuf[W_CLIP])
    for l, row in enumerate(layers):
        for d, p in enumerate(row):
            w_cat = np.concatenate([np.asarray(p.w_ih, np.float64), np.asarray(p.w_hh, np.float64)], axis=1)
            plan.gate_panels(wbuf, l, d)[...] = to_panels(_columns(w_cat, H, Hp))
            bias = np.zeros(4 * H) if p.bias is None else np.asarray(p.bias, np.float64)
            plan.bias(wbuf, l, d)[...] = _columns(bias[:, None], H, Hp)[0]
            if has_peep and p.peephole is not None:
                plan.peephole(wbuf, l, d)[:, :H] = np.asarray(p.peephole, np.float64).reshape(3, H)
            if P:
                plan.projection(wbuf, l, d)[:H, :] = np.asarray(p.w_hr, np.float64).T
            for j, a in enumerate(p.activations):  # in the model's precision, as ONNX stores them
                fpar[F_LD + (l * D + d) * F_STRIDE + 2 * j] = np.dtype(dtype).type(a.alpha)
                fpar[F_LD + (l * D + d) * F_STRIDE + 2 * j + 1] = np.dtype(dtype).type(a.beta)
    if head is not None:
        hw, hb = head
        head_w, head_b = plan.head(wbuf)
        head_w[...] = np.asarray(hw, np.float64).T  # (D*out, O)
        if hb is not None:
            head_b[...] = hb
    return plan, wbuf.astype(dtype), fpar


def unpack_layer(plan: Plan, wbuf: np.ndarray, l: int, d: int):
    """Packed buffers -> canonical (w_cat (4H, K), bias (4H,), peep (3H,)|None, w_hr (P,H)|None).

    The inverse of :func:`pack` for one (layer, direction); used by ``layer_params()`` and the
    ONNX exporter.
    """
    H, Hp = plan.H, plan.Hp

    def gates(a):  # (K, C) -> (4H, K)
        K = a.shape[0]
        return a.T.reshape(4, Hp, K)[:, :H, :].reshape(4 * H, K)

    peep = plan.peephole(wbuf, l, d)
    w_hr = plan.projection(wbuf, l, d)
    return (gates(plan.gate_matrix(wbuf, l, d)), gates(plan.bias(wbuf, l, d)[None, :])[:, 0],
            None if peep is None else peep[:, :H].ravel(),
            None if w_hr is None else w_hr[:H].T)


def sbuf_offsets(meta, N):
    """Offsets in ``sbuf`` of h (L,N,out), c (L,N,Hp), z (N,Kmax), acc (N,C), m (N,Hp), and its length.

    The one definition of the stream buffer: the Python side sizes and views it with this, and
    ``kernels`` compiles this very function with ``njit`` (plain arithmetic on ``meta``).
    """
    L, out, hp = meta[M_L], meta[M_OUT], meta[M_HP]
    h_off = 0
    c_off = h_off + L * N * out
    z_off = c_off + L * N * hp
    acc_off = z_off + N * meta[M_KMAX]
    m_off = acc_off + N * meta[M_C]
    return h_off, c_off, z_off, acc_off, m_off, m_off + N * hp


def unit_ranges(hp: int, threads: int) -> int:
    """How many unit ranges a parallel kernel splits Hp units into on ``threads`` threads."""
    return max(1, min(int(threads), int(hp) // MIN_RANGE_UNITS))


assert GATE_ORDER == ("i", "f", "g", "o")  # the kernels' gate offsets 0..3 * Hp follow this order
