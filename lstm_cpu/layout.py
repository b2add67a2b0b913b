"""The packed layout: how canonical weights become the flat buffers the kernels read.

This module is the one place that defines the packed layout; ``kernels.py`` reads the field
indices below and nothing else. (Numba's on-disk cache keys on the kernel file only: if you change
an index here, bump ``LAYOUT_VERSION`` in ``kernels.py`` too so old caches are not reused.)

Why this layout
---------------
A step must read every weight once, so the gate product is memory-bound. We fuse
``[W_ih | W_hh]`` into one matrix per layer and direction and store it *transposed* and split
into ``n`` column chunks::

    W   (n, K, C)      K = in + out rows (the concatenated [x | h_prev]), C = 4 * Uc columns
    W[b, k, g*Uc + u] = canonical_gate_g_weight[b*Uc + u, k]       g in GATE_ORDER (i, f, g, o)

Each chunk ``b`` owns ``Uc`` hidden units and all four gates of those units, so a thread can do
the product *and* the cell update of its units with no barrier in between. Within a chunk the
product is an axpy over rows (``acc[:] += W[b, k, :] * z[k]``), which vectorises across the C
contiguous columns without reassociating any sum (the float order is fixed, so results are
reproducible and do not depend on thread count). ``H`` is padded to ``Hp = n * Uc``; padded
units have zero weights and never feed a real unit.

Model buffers
-------------
``wbuf`` (float, 1-D) holds, per (layer l, direction d) at offsets in ``meta``::

    W      (n, K_l, C)   fused, transposed, chunked gate matrix
    bias   (n, C)        folded bias, same column order
    peep   (3, Hp)       peepholes i, f, o (only if HAS_PEEP)
    w_hr   (Hp, P)       projection, transposed (only if P > 0)

and once, after the stack, an optional linear head ``head_w (D*out, O)``, ``head_b (O,)``.

``meta`` (int64, 1-D): the header fields ``M_*`` below, then one ``LD_STRIDE`` record per
(layer, direction) at ``M_LD + (l*D + d) * LD_STRIDE`` with fields ``LD_*``.
``fpar`` (float64, 1-D): ``[clip, then per (l, d): alpha_f, beta_f, alpha_g, beta_g, alpha_h, beta_h]``.

Stream buffer ``sbuf`` (float, 1-D), for ``N`` streams (see :func:`sbuf_offsets`)::

    h    (L, N, out)     hidden state (projected if P > 0)
    c    (L, N, Hp)      cell state (padded)
    z    (N, Kmax)       [input | h_prev] of the layer being computed
    acc  (n, N, C)       gate pre-activations, per chunk then stream
    m    (N, Hp)         o * h_act(c), before the projection
"""

from __future__ import annotations

import numpy as np

from .spec import GATE_ORDER, LayerParams, is_default_activations

# ---------------------------------------------------------------------------------------------
# meta header fields (int64)
# ---------------------------------------------------------------------------------------------
M_L = 0  # layers
M_D = 1  # directions (1 or 2)
M_I = 2  # input size of layer 0
M_H = 3  # hidden units
M_OUT = 4  # out = P if projected else H
M_P = 5  # projection size, 0 if none
M_N = 6  # chunks n
M_UC = 7  # hidden units per chunk Uc
M_C = 8  # columns per chunk C = 4 * Uc
M_HP = 9  # padded hidden Hp = n * Uc
M_KMAX = 10  # max rows K over layers
M_PEEP = 11  # 1 if peepholes
M_COUPLED = 12  # 1 if input_forget (i = 1 - f)
M_GENERAL = 13  # 1 if any activation is not (Sigmoid, Tanh, Tanh): the general epilogue
M_APPROX = 14  # 1: float32 rational tanh/sigmoid; 0: libm (float64 models)
M_HEAD_O = 15  # head outputs O, 0 if no head
M_HEAD_W = 16  # offset of head_w (D*out, O)
M_HEAD_B = 17  # offset of head_b (O,)
M_REVERSE = 18  # 1: a one-direction model that runs backwards in time (ONNX direction="reverse")
M_LD = 20  # first (layer, direction) record

# per (layer, direction) record fields
LD_K = 0  # rows of W: in_l + out
LD_W = 1  # offset of W (n, K, C)
LD_B = 2  # offset of bias (n, C)
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

#: Units per chunk are a multiple of this, so a chunk's C = 4*Uc columns fill whole AVX2 vectors.
UNIT_ALIGN = 8


def choose_chunks(hidden_size: int, n_threads: int, min_units_per_chunk: int = 64) -> int:
    """How many column chunks to pack: one per thread, but never chunks under ~64 units.

    Small layers get one chunk: they run serially anyway, and one chunk is the fastest serial form.
    """
    n = max(1, min(int(n_threads), hidden_size // min_units_per_chunk))
    return n


def chunk_units(hidden_size: int, n: int) -> int:
    uc = -(-hidden_size // n)
    return -(-uc // UNIT_ALIGN) * UNIT_ALIGN


def _chunk_columns(mat: np.ndarray, H: int, n: int, uc: int) -> np.ndarray:
    """(4H, K) canonical gate-major rows -> (n, K, C) transposed chunks (zero-padded units)."""
    K = mat.shape[1]
    gates = np.zeros((4, n * uc, K), dtype=np.float64)  # (gate, Hp, K)
    gates[:, :H, :] = mat.reshape(4, H, K)
    # (gate, n, uc, K) -> (n, K, gate, uc) -> (n, K, C)
    return gates.reshape(4, n, uc, K).transpose(1, 3, 0, 2).reshape(n, K, 4 * uc)


def plan(L, D, I, H, P, n, *, has_peep, coupled, general, approx, head_o=0, act_codes=None,
         reverse=False):
    """The meta header and offsets for a model of these sizes, and the length of its wbuf.

    ``pack`` fills a buffer by this plan; ``packed.load`` recomputes it from the file's stated
    sizes and refuses a file whose stored meta differs, so the kernels never see an offset that
    was not derived here (they do no bounds checks).
    """
    out = P if P else H
    uc = chunk_units(H, n)
    C, Hp = 4 * uc, n * uc
    meta = np.zeros(M_LD + L * D * LD_STRIDE, dtype=np.int64)
    offset = W_CONSTS
    kmax = 0
    for l in range(L):
        for d in range(D):
            rec = M_LD + (l * D + d) * LD_STRIDE
            K = (I if l == 0 else D * out) + out
            kmax = max(kmax, K)
            meta[rec + LD_K] = K
            meta[rec + LD_W] = offset
            offset += n * K * C
            meta[rec + LD_B] = offset
            offset += n * C
            if has_peep:
                meta[rec + LD_PEEP] = offset
                offset += 3 * Hp
            if P:
                meta[rec + LD_HR] = offset
                offset += Hp * P
            if act_codes is not None:
                meta[rec + LD_ACT : rec + LD_ACT + 3] = act_codes[l * D + d]
    if head_o:
        meta[M_HEAD_O] = head_o
        meta[M_HEAD_W] = offset
        offset += D * out * head_o
        meta[M_HEAD_B] = offset
        offset += head_o
    meta[M_L], meta[M_D], meta[M_I], meta[M_H] = L, D, I, H
    meta[M_OUT], meta[M_P], meta[M_N], meta[M_UC], meta[M_C], meta[M_HP] = out, P, n, uc, C, Hp
    meta[M_KMAX], meta[M_PEEP], meta[M_COUPLED] = kmax, int(has_peep), int(coupled)
    meta[M_GENERAL], meta[M_APPROX] = int(general), int(approx)
    meta[M_REVERSE] = int(reverse)
    return meta, offset


def pack(layers, *, clip, input_forget, dtype, head=None, n_threads=1, reverse=False):
    """Canonical ``layers[l][d]`` -> ``(wbuf, meta, fpar)``. All validation happens before this."""
    L, D = len(layers), len(layers[0])
    p0: LayerParams = layers[0][0]
    H, out, I = p0.hidden_size, p0.output_size, p0.input_size
    P = 0 if p0.w_hr is None else out
    n = choose_chunks(H, n_threads)
    has_peep = any(p.peephole is not None for row in layers for p in row)
    general = not all(is_default_activations(p.activations) for row in layers for p in row)
    codes = [[a.code for a in p.activations] for row in layers for p in row]
    head_o = 0 if head is None else int(np.shape(head[0])[0])
    meta, total = plan(L, D, I, H, P, n, has_peep=has_peep, coupled=bool(input_forget),
                       general=general, approx=np.dtype(dtype) == np.float32, head_o=head_o,
                       act_codes=codes, reverse=reverse)
    uc, Hp = int(meta[M_UC]), int(meta[M_HP])
    wbuf = np.zeros(total, dtype=np.float64)
    wbuf[W_HALF], wbuf[W_ONE] = 0.5, 1.0
    wbuf[W_CLIP] = 0.0 if not clip else float(clip)

    def put(off, a):
        a = np.asarray(a, dtype=np.float64).ravel()
        wbuf[off : off + a.size] = a

    fpar = np.zeros(F_LD + L * D * F_STRIDE, dtype=np.float64)
    fpar[F_CLIP] = wbuf[W_CLIP]
    for l, row in enumerate(layers):
        for d, p in enumerate(row):
            rec = M_LD + (l * D + d) * LD_STRIDE
            w_cat = np.concatenate([np.asarray(p.w_ih, np.float64), np.asarray(p.w_hh, np.float64)], axis=1)
            put(meta[rec + LD_W], _chunk_columns(w_cat, H, n, uc))
            bias = np.zeros(4 * H) if p.bias is None else np.asarray(p.bias, np.float64)
            put(meta[rec + LD_B], _chunk_columns(bias[:, None], H, n, uc))
            if has_peep:
                peep = np.zeros((3, Hp))
                if p.peephole is not None:
                    peep[:, :H] = np.asarray(p.peephole, np.float64).reshape(3, H)
                put(meta[rec + LD_PEEP], peep)
            if P:
                w_hr_t = np.zeros((Hp, P))
                w_hr_t[:H, :] = np.asarray(p.w_hr, np.float64).T
                put(meta[rec + LD_HR], w_hr_t)
            for j, a in enumerate(p.activations):
                fpar[F_LD + (l * D + d) * F_STRIDE + 2 * j] = a.alpha
                fpar[F_LD + (l * D + d) * F_STRIDE + 2 * j + 1] = a.beta
    if head is not None:
        hw, hb = head
        put(meta[M_HEAD_W], np.asarray(hw, np.float64).T)  # (D*out, O)
        if hb is not None:
            put(meta[M_HEAD_B], hb)
    return wbuf.astype(dtype), meta, fpar


def sbuf_offsets(meta, N):
    """Offsets in ``sbuf`` of h (L,N,out), c (L,N,Hp), z (N,K_l), acc (n,N,C), m (N,Hp), and its length.

    The one definition of the stream buffer: the Python side sizes and views it with this, and
    ``kernels`` compiles this very function with ``njit`` (plain arithmetic on ``meta``).
    """
    L, out, hp = meta[M_L], meta[M_OUT], meta[M_HP]
    h_off = 0
    c_off = h_off + L * N * out
    z_off = c_off + L * N * hp
    acc_off = z_off + N * meta[M_KMAX]
    m_off = acc_off + N * meta[M_N] * meta[M_C]
    return h_off, c_off, z_off, acc_off, m_off, m_off + N * hp


def unpack_layer(wbuf, meta, l, d):
    """Packed buffers -> canonical (w_cat (4H, K), bias (4H,), peep (3H,)|None, w_hr (P,H)|None).

    The inverse of :func:`pack` for one (layer, direction); used by ``save``-free introspection,
    ``layer_params()`` and the ONNX exporter.
    """
    D, H = int(meta[M_D]), int(meta[M_H])
    n, uc, C, Hp, P = int(meta[M_N]), int(meta[M_UC]), int(meta[M_C]), int(meta[M_HP]), int(meta[M_P])
    rec = M_LD + (l * D + d) * LD_STRIDE
    K = int(meta[rec + LD_K])

    def unchunk(a, K):  # (n, K, C) -> (4H, K)
        a = a.reshape(n, K, 4, uc).transpose(2, 0, 3, 1).reshape(4, Hp, K)
        return a[:, :H, :].reshape(4 * H, K)

    w = wbuf[meta[rec + LD_W] : meta[rec + LD_W] + n * K * C].reshape(n, K, C)
    b = wbuf[meta[rec + LD_B] : meta[rec + LD_B] + n * C].reshape(n, 1, C)
    peep = None
    if meta[M_PEEP]:
        peep = wbuf[meta[rec + LD_PEEP] : meta[rec + LD_PEEP] + 3 * Hp].reshape(3, Hp)[:, :H].ravel()
    w_hr = None
    if P:
        w_hr = wbuf[meta[rec + LD_HR] : meta[rec + LD_HR] + Hp * P].reshape(Hp, P)[:H].T
    return unchunk(w, K), unchunk(b, 1)[:, 0], peep, w_hr


assert GATE_ORDER == ("i", "f", "g", "o")  # the kernels' gate offsets 0..3 * Uc follow this order
