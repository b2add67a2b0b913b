"""Register-blocked gate products over packed panels: the probe's alternatives (issue 12).

The engine's own product is ``kernels._product`` over the panels of ``layout.py`` (layout 7);
this module keeps the variants ``bench/gemm_probe.py`` measures it against (other panel widths,
stream blocks, fused cell updates). They sum row quads, the engine's former per-element
expression; the engine now chains one FMA per row (see kernels.py), so results agree to
rounding, not bit for bit. The notes below describe the register blocking both use.

The batched gate product is ``A (N, C) += Z (N, K) @ W (K, C)``: N streams (or sequences of a
batch), K = I + H inputs (or H for the recurrent part of ``run``), C = 4H gate columns.
The kernels here compute every element as::

    a += w0*z0 + w1*z1 + w2*z2 + w3*z3        over k-quads, ascending k (fastmath: contract only)

(the engine's expression up to layout 6, when it read and wrote ``a`` in memory once per k-quad)
and hold a block of R streams x P columns of ``a`` in vector registers across all of K, writing
it back once; every variant gives the same bits as every other whatever R, P and N.

Packed panels
-------------
``Wp (n_panels, K, P)``: panel p holds columns ``p*P .. p*P+P`` of W, K rows of P contiguous
floats (:func:`pack_panels`). Choose the column order at packing time so that a panel holds whole
units of all four gates, ``[i(U) | f(U) | g(U) | o(U)]`` of U = P/4 units (:func:`pack_gate_panels`):
the cell update of those U units can then run right after the panel's product, while its
pre-activations are still in L1. A kernel may also take G adjacent panels as one block of G*P
columns (``_g2``): one packed layout (P = 32, U = 8 units) serves 256-bit vectors with G = 1
and 512-bit vectors with G = 2, at the speed of a P = 64 layout (measured in the probe).

Register blocking
-----------------
The R x G*P accumulator block is a stack array (:func:`_stack_f32`, an ``alloca`` of a
compile-time size) copied in from ``A`` before the k loop and out after it. Numba passes arrays
that may alias, so accumulating straight into ``A`` keeps a load and a store of every accumulator
in each k-quad; a stack array cannot alias ``Z`` or ``Wp``, and once the column loop is
vectorised and unrolled LLVM promotes it to registers (check: ``inspect_asm`` shows the k loop
with only ``Wp`` loads and ``Z`` broadcasts, see bench/gemm_probe.py). The block must fit the
register file with room for the four W rows of a quad and the Z broadcasts: on AVX-512 (32 zmm)
p64_r2, p32_r2_g2 and p32_r4 keep everything in registers; on AVX2 (16 ymm) every candidate
spills some (bench/gemm_probe.py reports the stack moves in the k loop).

Every kernel here trusts its caller: C-contiguous float32 arrays (the stack block is
float32), ``Wp.shape[2] == P``, ``A.shape[1] == n_panels * P``, ``Z.shape[1] == Wp.shape[1]``.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_FLAGS = dict(nogil=True, fastmath={"contract"}, error_model="numpy")


@intrinsic
def _stack_f32(typingctx, n):
    """A pointer to ``n`` float32 (``n`` a compile-time constant) in the caller's stack frame.

    The ``alloca`` goes in the entry block of the function it is inlined into, so a loop may call
    the function holding it without growing the stack."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    size = n.literal_value

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(types.float32),
                                   size=context.get_constant(types.intp, size))

    return types.CPointer(types.float32)(n), codegen


def _make_product(P, R, G):
    """``product(Z, s, Wp, p, acc)``: acc (R, G*P) += Z[s:s+R] @ panels p..p+G-1 of Wp (n, K, P),
    in ``kernels._product``'s per-element order (R, P, G compile-time constants: the loops unroll)."""

    @njit(inline="always", **_FLAGS)
    def product(Z, s, Wp, p, acc):
        K = Wp.shape[1]
        k = 0
        while k + 4 <= K:
            for g in range(G):
                for j in range(P):
                    w0 = Wp[p + g, k, j]
                    w1 = Wp[p + g, k + 1, j]
                    w2 = Wp[p + g, k + 2, j]
                    w3 = Wp[p + g, k + 3, j]
                    for r in range(R):
                        acc[r, g * P + j] += (w0 * Z[s + r, k] + w1 * Z[s + r, k + 1]
                                              + w2 * Z[s + r, k + 2] + w3 * Z[s + r, k + 3])
            k += 4
        while k < K:
            for g in range(G):
                for j in range(P):
                    w0 = Wp[p + g, k, j]
                    for r in range(R):
                        acc[r, g * P + j] += w0 * Z[s + r, k]
            k += 1

    return product


def _make_block(P, R, G):
    """``block(Z, s, Wp, p, A)``: A[s:s+R, p*P:(p+G)*P] += Z[s:s+R] @ panels p..p+G-1 of Wp
    (n, K, P), the R x G*P accumulators held in registers across all of K."""
    RGP = R * G * P
    product = _make_product(P, R, G)

    @njit(inline="always", **_FLAGS)
    def block(Z, s, Wp, p, A):
        c0 = p * P
        acc = carray(_stack_f32(RGP), (R, G * P))  # (R, G*P) register block; stack storage
        for r in range(R):
            for j in range(G * P):
                acc[r, j] = A[s + r, c0 + j]
        product(Z, s, Wp, p, acc)
        for r in range(R):
            for j in range(G * P):
                A[s + r, c0 + j] = acc[r, j]

    return block


def _make_gemm(P, R, G=1):
    """``gemm(Z, Wp, A)``: A (N, n*P) += Z (N, K) @ W, with W packed as Wp (n, K, P), in register
    blocks of R streams x G panels. Streams past the last full block of R go one at a time and a
    panel past the last group of G alone, with the same per-element expression."""
    wide, one_panel = _make_block(P, R, G), _make_block(P, R, 1)
    single, single_panel = _make_block(P, 1, G), _make_block(P, 1, 1)

    @njit(**_FLAGS)
    def gemm(Z, Wp, A):
        N = Z.shape[0]
        n = Wp.shape[0]
        p = 0
        while p < n:  # panels outer: their K*G*P floats stay in L1/L2 for all streams
            g = G if p + G <= n else 1
            s = 0
            while s + R <= N:
                if g == G:
                    wide(Z, s, Wp, p, A)
                else:
                    one_panel(Z, s, Wp, p, A)
                s += R
            while s < N:
                if g == G:
                    single(Z, s, Wp, p, A)
                else:
                    single_panel(Z, s, Wp, p, A)
                s += 1
            p += g

    name = f"p{P}_r{R}" + (f"_g{G}" if G > 1 else "")
    gemm.__doc__ = (f"A (N, n*{P}) += Z (N, K) @ W, W packed as Wp (n, K, {P}); blocks of {R} "
                    f"streams x {G} panel(s).")
    gemm.__name__ = gemm.__qualname__ = f"gemm_{name}"
    return name, gemm


#: Candidates, named by panel width P, stream block R and panels per block G (when > 1).
KERNELS = dict(_make_gemm(P, R, G) for P, R, G in (
    (64, 2, 1), (64, 4, 1), (32, 2, 1), (32, 4, 1), (32, 6, 1), (16, 4, 1), (16, 8, 1), (8, 8, 1),
    (32, 2, 2), (16, 4, 2)))


def pack_panels(W: np.ndarray, P: int) -> np.ndarray:
    """W (K, C) -> Wp (C // P, K, P), C-contiguous: panel p is W[:, p*P:(p+1)*P]."""
    K, C = W.shape
    if C % P:
        raise ValueError(f"C={C} is not a multiple of the panel width P={P}")
    return np.ascontiguousarray(W.reshape(K, C // P, P).transpose(1, 0, 2))


def gate_panel_order(H: int, U: int) -> np.ndarray:
    """Column order (4H,) putting U whole units of all four gates in each panel of P = 4U columns.

    W's columns are [i(H) | f(H) | g(H) | o(H)]; panel q gets ``[i | f | g | o]`` of units
    q*U .. q*U+U, so its epilogue reads gate g of unit u at column g*U + u of the panel."""
    if H % U:
        raise ValueError(f"H={H} is not a multiple of U={U} units per panel")
    q = np.arange(H // U)[:, None, None]  # (panels, 1, 1)
    g = np.arange(4)[None, :, None]  # (1, 4, 1) gate
    u = np.arange(U)[None, None, :]  # (1, 1, U) unit within the panel
    return (g * H + q * U + u).reshape(-1)  # (4H,) source column of each packed column


def pack_gate_panels(W: np.ndarray, U: int) -> np.ndarray:
    """W (K, 4H) in [i|f|g|o] column order -> Wp (H // U, K, 4U): whole units per panel."""
    return pack_panels(W[:, gate_panel_order(W.shape[1] // 4, U)], 4 * U)


# ---------------------------------------------------------------------------------------------
# Product and cell update fused per panel
# ---------------------------------------------------------------------------------------------
def _make_cells(U, R):
    """``cells(Z, Wp, bias, c, m)``: one LSTM step of N streams over gate panels of U units.

    Z (N, K) [input | h_prev] per stream; Wp (H/U, K, 4U) gate panels (:func:`pack_gate_panels`);
    bias (H/U, 4U) the folded bias in the same order; c (N, H) cell state, updated in place;
    m (N, H) <- o * tanh(c_new). Sigmoid/Tanh/Tanh in float32 with the rational tanh of
    ``kernels._tanh_f32`` and the formulas of ``kernels._epilogue``'s fast path, so c and m are
    bit-identical to lstm-cpu's step; the epilogue of a panel's U units runs while its
    R x 4U pre-activations are still in registers."""
    from .kernels import _tanh_f32

    P = 4 * U

    def make(RR):
        RRP = RR * P
        product = _make_product(P, RR, 1)

        @njit(inline="always", **_FLAGS)
        def block(Z, s, Wp, p, bias, c, m):
            half = np.float32(0.5)
            acc = carray(_stack_f32(RRP), (RR, P))  # (RR, 4U) gate pre-activations [i|f|g|o]
            for r in range(RR):
                for j in range(P):
                    acc[r, j] = bias[p, j]
            product(Z, s, Wp, p, acc)
            u0 = p * U
            for r in range(RR):
                for u in range(U):
                    f = half * _tanh_f32(half * acc[r, U + u]) + half
                    i = half * _tanh_f32(half * acc[r, u]) + half
                    cn = f * c[s + r, u0 + u] + i * _tanh_f32(acc[r, 2 * U + u])
                    c[s + r, u0 + u] = cn
                    m[s + r, u0 + u] = (half * _tanh_f32(half * acc[r, 3 * U + u]) + half) * _tanh_f32(cn)

        return block

    wide, single = make(R), make(1)

    @njit(**_FLAGS)
    def cells(Z, Wp, bias, c, m):
        N = Z.shape[0]
        for p in range(Wp.shape[0]):
            s = 0
            while s + R <= N:
                wide(Z, s, Wp, p, bias, c, m)
                s += R
            while s < N:
                single(Z, s, Wp, p, bias, c, m)
                s += 1

    cells.__name__ = cells.__qualname__ = f"lstm_cells_u{U}_r{R}"
    return cells


#: Fused product + cell update: U units (4U columns) per panel, R streams per register block.
#: All are batch-invariant (a stream's bits do not depend on N). u16_* also matches today's
#: ``kernels._epilogue`` bit for bit on AVX-512; u8_* rounds up to 1 ulp differently there (its
#: epilogue vectorises at another width, and LLVM's FMA contraction follows the code shape), so
#: whichever U is chosen must serve every path, single streams included.
CELLS = {f"u{U}_r{R}": _make_cells(U, R) for U, R in ((16, 2), (8, 4), (8, 2))}
