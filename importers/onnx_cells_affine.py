"""Affine forms: the weights of a gate pre-activation, read through the operators that compute it.

The affine form of a tensor is ``a = sum_s s @ M_s + b`` over the non-constant tensors ``s`` it is
computed from (:func:`affine`). It is computed by walking back through the linear operators
exporters write (MatMul / Gemm with transA/transB/alpha/beta, Transpose, Add / Sub of biases,
Mul / Div / Neg by constants, Concat / Split / Slice along the feature axis, Identity, float
Casts, Reshape / Squeeze / Unsqueeze / Flatten that keep the feature axis). Where the walk stops,
the tensor is a *source* (``x``, ``h``, or anything computed non-linearly). The form is exact:
weights are read, never probed, so the recovered weights are the file's.

Tensors handled by the walk are per-sample vectors ``(K,)`` or batches ``(N, K)`` whose last axis
holds the features (or, after a 2-D Transpose, ``(K, N)``: ``ff`` = feature-first). No operator
in the walk mixes samples of a batch; anything that would is left as a source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from lstm_cpu.errors import UnsupportedModelError


from .onnx_cells_graph import MAX_DIM, GraphIndex, _const_value, _ints, attrs_of, known_zeros

#: The affine walk back from a gate stops (the tensor becomes a source) this many operators deep.
MAX_AFFINE_DEPTH = 64
#: Operators the walk may visit over a whole graph (each cell's walk is bounded by the depth, this
#: bounds their sum on a hostile graph of many cells sharing a wide linear part).
MAX_AFFINE_VISITS = 4_000_000
#: Largest dense weight matrix (K_src x K float64 values) the walk builds: 2 GiB.
MAX_DENSE = 1 << 28


def _dense_ok(k_src: int, k: int):
    if k_src * k > MAX_DENSE:
        raise UnsupportedModelError(
            f"a weight matrix of {k_src} x {k} values is larger than the {MAX_DENSE} the cell "
            "finder builds")


# ---------------------------------------------------------------------------------------------
# Affine forms
# ---------------------------------------------------------------------------------------------
@dataclass
class Term:
    """How the K features of a tensor depend on source ``s`` (K_src features).

    Either a selection ``sel (K,)``: feature j is source feature ``sel[j]`` (-1: none), kept
    sparse through Concat/Split/Slice; or a dense ``M (K_src, K)``.
    """

    k_src: int
    sel: Optional[np.ndarray] = None  # (K,) int64
    M: Optional[np.ndarray] = None  # (K_src, K) float64

    def dense(self) -> np.ndarray:
        if self.M is not None:
            return self.M
        K = len(self.sel)
        _dense_ok(self.k_src, K)
        M = np.zeros((self.k_src, K))  # (K_src, K)
        j = np.nonzero(self.sel >= 0)[0]
        M[self.sel[j], j] = 1.0
        return M

    def cols(self, idx) -> "Term":
        if self.M is not None:
            return Term(self.k_src, M=self.M[:, idx])
        return Term(self.k_src, sel=self.sel[idx])

    def right(self, B) -> "Term":
        """Features mapped by a constant (K, K2): x @ B."""
        _dense_ok(self.k_src, B.shape[1])
        if self.M is not None:
            return Term(self.k_src, M=self.M @ B)
        M = np.zeros((self.k_src, B.shape[1]))  # (K_src, K2)
        j = np.nonzero(self.sel >= 0)[0]
        rows = self.sel[j]
        if len(np.unique(rows)) == len(rows):  # a permutation / selection: plain assignment
            M[rows] = B[j]
        else:  # a source feature used twice (Concat([x, x])): accumulate
            np.add.at(M, rows, B[j])
        return Term(self.k_src, M=M)


@dataclass
class Aff:
    """``sum_s s @ terms[s] + bias`` with K features; rank 1 (K,) or 2 ((N, K), or (K, N) if ff)."""

    terms: Dict[str, Term]
    bias: np.ndarray  # (K,) float64
    rank: int
    ff: bool = False
    sources_order: List[str] = field(default_factory=list)

    @property
    def K(self) -> int:
        return len(self.bias)

    def feature_axis(self) -> int:
        return 0 if self.ff else self.rank - 1


def _map_terms(a: Aff, fn, bias, rank=None, ff=None) -> Aff:
    return Aff({s: fn(t) for s, t in a.terms.items()}, bias, a.rank if rank is None else rank,
               a.ff if ff is None else ff)


def _per_feature(c: np.ndarray, a: Aff) -> Optional[np.ndarray]:
    """Constant ``c`` as a per-feature vector (K,) when it broadcasts against ``a`` without
    varying across samples, else None."""
    c = np.asarray(c, np.float64)
    if c.ndim > 2 or (c.ndim == 2 and a.rank == 1 and a.ff):
        return None
    if c.ndim == 0 or c.size == 1:
        return np.full(a.K, float(c.reshape(-1)[0]))
    if a.ff:  # (K, N): c must be (K, 1)
        if c.ndim == 2 and c.shape == (a.K, 1):
            return c[:, 0].copy()
        return None
    if c.shape[-1] != a.K or (c.ndim == 2 and c.shape[0] != 1):
        return None
    return c.reshape(a.K).copy()


def _sum(a: Aff, b: Aff, sign: float) -> Optional[Aff]:
    if a.K != b.K or a.ff != b.ff:
        return None
    terms = dict(a.terms)
    for s, t in b.terms.items():
        tb = Term(t.k_src, M=sign * t.dense())
        terms[s] = Term(t.k_src, M=terms[s].dense() + tb.M) if s in terms else tb
    return Aff(terms, a.bias + sign * b.bias, max(a.rank, b.rank), a.ff)


class AffineWalk:
    """Affine forms of tensors of one graph, memoised (each tensor's form is computed once)."""

    def __init__(self, gi: GraphIndex):
        self.gi = gi
        self.memo: Dict[str, object] = {}
        self.f64: Dict[tuple, np.ndarray] = {}  # (constant, transposed) -> float64 array
        self.visits = 0

    # A value is a numpy array (constant), an Aff, or None (cannot be a source: unknown shape).
    def value(self, name: str, depth: int = 0):
        if name in self.memo:
            return self.memo[name]
        self.visits += 1
        if self.visits > MAX_AFFINE_VISITS:
            raise UnsupportedModelError(
                f"{self.gi.label}: reading the cells' weights visited more than {MAX_AFFINE_VISITS} "
                "operators; the graph is too large or too convoluted for the cell finder")
        c = _const_value(self.gi, name)
        zeros = known_zeros(self.gi, name) if c is None else None
        if c is not None:
            v = c
        elif zeros is not None and zeros[0] in (1, 2) and 0 < zeros[1] <= MAX_DIM:
            v = Aff({}, np.zeros(zeros[1]), zeros[0])  # zeros of a run-time batch: no source
        else:
            v = None
            if depth < MAX_AFFINE_DEPTH and name in self.gi.producers:
                node, k = self.gi.producers[name]
                if node.domain in ("", "ai.onnx"):
                    handler = getattr(self, "_" + node.op_type, None)
                    if handler is not None:
                        self.memo[name] = None  # cycle guard
                        v = handler(node, k, depth + 1)
            if v is None:
                v = self.source(name)
        self.memo[name] = v
        return v

    def source(self, name: str) -> Optional[Aff]:
        shape = self.gi.shapes.get(name)
        if shape is None or len(shape) not in (1, 2) or shape[-1] is None or not 0 < shape[-1] <= MAX_DIM:
            return None
        K = shape[-1]
        return Aff({name: Term(K, sel=np.arange(K, dtype=np.int64))}, np.zeros(K), len(shape))

    def _in(self, node, j, depth, transpose=False):
        """Input j of ``node``: an Aff, or a constant (float64, transposed if asked: cached, as
        every step of an unrolled graph multiplies by the same weights)."""
        if len(node.input) <= j or not node.input[j]:
            return None
        v = self.value(node.input[j], depth)
        if isinstance(v, np.ndarray):
            key = (node.input[j], transpose)
            if key not in self.f64:
                c = np.asarray(v, np.float64)
                self.f64[key] = np.ascontiguousarray(c.T) if transpose else c
            return self.f64[key]
        if transpose and isinstance(v, Aff):
            return Aff(v.terms, v.bias, 2, not v.ff) if v.rank == 2 else None
        return v

    # -- operators ---------------------------------------------------------------------------
    def _Identity(self, node, k, depth):
        v = self._in(node, 0, depth)
        return v if isinstance(v, Aff) else None

    def _Cast(self, node, k, depth):
        from onnx import TensorProto as TP

        if attrs_of(node).get("to") not in (TP.FLOAT, TP.DOUBLE):
            return None
        return self._Identity(node, k, depth)

    def _Transpose(self, node, k, depth):
        a = self._in(node, 0, depth)
        if not isinstance(a, Aff):
            return None
        perm = list(attrs_of(node).get("perm", range(a.rank)[::-1]))
        if a.rank == 1:
            return a
        if perm == [1, 0]:
            return Aff(a.terms, a.bias, 2, not a.ff)
        if perm == [0, 1]:
            return a
        return None

    def _matmul(self, A, B) -> Optional[Aff]:
        if isinstance(A, Aff) and isinstance(B, np.ndarray) and not A.ff and B.ndim == 2 \
                and B.shape[0] == A.K:
            return _map_terms(A, lambda t: t.right(B), A.bias @ B)
        if isinstance(B, Aff) and isinstance(A, np.ndarray) and A.ndim == 2 and A.shape[1] == B.K \
                and (B.ff or B.rank == 1):
            At = A.T  # out_j = sum_k A[j, k] in_k
            return _map_terms(B, lambda t: t.right(At), B.bias @ At)
        return None

    def _MatMul(self, node, k, depth):
        return self._matmul(self._in(node, 0, depth), self._in(node, 1, depth))

    def _Gemm(self, node, k, depth):
        at = attrs_of(node)
        A = self._in(node, 0, depth, transpose=bool(at.get("transA", 0)))
        B = self._in(node, 1, depth, transpose=bool(at.get("transB", 0)))
        if A is None or B is None or isinstance(A, Aff) and A.rank != 2 or isinstance(B, Aff) and B.rank != 2:
            return None
        y = self._matmul(A, B)
        if y is None:
            return None
        alpha = float(at.get("alpha", 1.0))
        y = _map_terms(y, lambda t: Term(t.k_src, M=alpha * t.dense()), alpha * y.bias)
        if len(node.input) > 2 and node.input[2]:
            C = self._in(node, 2, depth)
            if not isinstance(C, np.ndarray):
                return None  # a non-constant C: leave the whole Gemm as a source
            v = _per_feature(C, y)
            if v is None:
                return None
            y.bias = y.bias + float(at.get("beta", 1.0)) * v
        return y

    def _addsub(self, node, depth, sign):
        a, b = self._in(node, 0, depth), self._in(node, 1, depth)
        if isinstance(a, Aff) and isinstance(b, Aff):
            return _sum(a, b, sign)
        if isinstance(a, Aff) and isinstance(b, np.ndarray):
            v = _per_feature(b, a)
            return None if v is None else Aff(a.terms, a.bias + sign * v, max(a.rank, min(b.ndim, 2)), a.ff)
        if isinstance(b, Aff) and isinstance(a, np.ndarray):
            v = _per_feature(a, b)
            if v is None:
                return None
            neg = _map_terms(b, lambda t: Term(t.k_src, M=sign * t.dense()), sign * b.bias)
            return Aff(neg.terms, neg.bias + v, max(b.rank, min(a.ndim, 2)), b.ff)
        return None

    def _Add(self, node, k, depth):
        return self._addsub(node, depth, 1.0)

    def _Sub(self, node, k, depth):
        return self._addsub(node, depth, -1.0)

    def _scale(self, a: Aff, v: np.ndarray) -> Aff:
        return _map_terms(a, lambda t: Term(t.k_src, M=t.dense() * v[None, :]), a.bias * v)

    def _Mul(self, node, k, depth):
        a, b = self._in(node, 0, depth), self._in(node, 1, depth)
        if isinstance(b, Aff) and isinstance(a, np.ndarray):
            a, b = b, a
        if isinstance(a, Aff) and isinstance(b, np.ndarray):
            v = _per_feature(b, a)
            return None if v is None else self._scale(a, v)
        return None

    def _Div(self, node, k, depth):
        a, b = self._in(node, 0, depth), self._in(node, 1, depth)
        if isinstance(a, Aff) and isinstance(b, np.ndarray):
            v = _per_feature(b, a)
            if v is None or not np.all(v != 0):
                return None
            return self._scale(a, 1.0 / v)
        return None

    def _Neg(self, node, k, depth):
        a = self._in(node, 0, depth)
        return self._scale(a, -np.ones(a.K)) if isinstance(a, Aff) else None

    def _axis(self, a: Aff, axis: int) -> Optional[int]:
        axis = axis + a.rank if axis < 0 else axis
        return axis if 0 <= axis < a.rank else None

    def _Concat(self, node, k, depth):
        parts = [self.value(i, depth) for i in node.input if i]
        affs = [p for p in parts if isinstance(p, Aff)]
        if not affs or any(p is None for p in parts):
            return None
        ref = affs[0]
        if self._axis(ref, int(attrs_of(node).get("axis", 0))) != ref.feature_axis():
            return None
        if any(p.ff != ref.ff or p.rank != ref.rank for p in affs):
            return None
        pieces = []  # (Aff) with constants turned into bias-only forms
        for p in parts:
            if isinstance(p, np.ndarray):
                p = np.asarray(p, np.float64)
                if p.ndim != ref.rank:
                    return None
                rows = p if not ref.ff else p.T  # (N, Kc)
                rows = rows.reshape(-1, rows.shape[-1]) if rows.ndim == 2 else rows[None]
                if not np.all(rows == rows[:1]):
                    return None
                p = Aff({}, rows[0].copy(), ref.rank, ref.ff)
            pieces.append(p)
        K = sum(p.K for p in pieces)
        srcs = []
        for p in pieces:
            srcs.extend(s for s in p.terms if s not in srcs)
        terms = {}
        for s in srcs:
            owners = [(p, o) for p, o in zip(pieces, np.cumsum([0] + [q.K for q in pieces])) if s in p.terms]
            k_src = owners[0][0].terms[s].k_src
            if all(p.terms[s].sel is not None for p, _ in owners):
                sel = np.full(K, -1, np.int64)
                for p, o in owners:
                    sel[o:o + p.K] = p.terms[s].sel
                terms[s] = Term(k_src, sel=sel)
            else:
                M = np.zeros((k_src, K))
                for p, o in owners:
                    M[:, o:o + p.K] = p.terms[s].dense()
                terms[s] = Term(k_src, M=M)
        return Aff(terms, np.concatenate([p.bias for p in pieces]), ref.rank, ref.ff)

    def _Split(self, node, k, depth):
        a = self._in(node, 0, depth)
        if not isinstance(a, Aff):
            return None
        at = attrs_of(node)
        if self._axis(a, int(at.get("axis", 0))) != a.feature_axis():
            return None
        n = len(node.output)
        sizes = _ints(self.gi, node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if sizes is None and "split" in at:
            sizes = [int(s) for s in at["split"]]
        if sizes is None:
            n = int(at.get("num_outputs", n))
            step = -(-a.K // n)  # ceil: ONNX's uneven split puts the remainder last
            sizes = [min(step, a.K - j * step) for j in range(n)]
        if len(sizes) != len(node.output) or sum(sizes) != a.K or min(sizes) < 0:
            return None
        off = int(np.sum(sizes[:k]))
        return self._select(a, np.arange(off, off + sizes[k]))

    def _select(self, a: Aff, idx) -> Aff:
        idx = np.asarray(idx, np.int64)
        if len(idx) and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
            idx = slice(int(idx[0]), int(idx[0]) + len(idx))  # a view, not a fancy-index copy
        return _map_terms(a, lambda t: t.cols(idx), a.bias[idx])

    def _Slice(self, node, k, depth):
        a = self._in(node, 0, depth)
        if not isinstance(a, Aff):
            return None
        shape = self.gi.shapes.get(node.input[0])
        if len(node.input) >= 3:
            starts, ends = _ints(self.gi, node.input[1]), _ints(self.gi, node.input[2])
            axes = _ints(self.gi, node.input[3]) if len(node.input) > 3 and node.input[3] else None
            steps = _ints(self.gi, node.input[4]) if len(node.input) > 4 and node.input[4] else None
        else:  # Slice-1: attributes
            at = attrs_of(node)
            starts, ends, axes, steps = at.get("starts"), at.get("ends"), at.get("axes"), None
        if starts is None or ends is None or len(starts) != len(ends):
            return None
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        if len(axes) != len(starts) or len(steps) != len(starts):
            return None
        idx = np.arange(a.K)
        for s, e, ax, st in zip(starts, ends, axes, steps):
            ax = self._axis(a, ax)
            if ax is None or st == 0:
                return None
            if ax == a.feature_axis():
                idx = idx[slice(s, e, st)]
                continue
            dim = shape[ax] if shape is not None and len(shape) == a.rank else None
            # Another axis: fine only when the slice keeps all of it.
            if st != 1 or s != 0 or dim is None or e < dim:
                return None
        return self._select(a, idx)

    def _reshape_like(self, node, k, depth):
        """Squeeze / Unsqueeze / Reshape / Flatten that keep the feature axis last and the samples."""
        a = self._in(node, 0, depth)
        if not isinstance(a, Aff) or a.ff:
            return None
        src = self.gi.static_shape(node.input[0])
        out = self.gi.static_shape(node.output[0])
        if src is None or out is None or len(out) not in (1, 2) or out[-1] != a.K:
            return None
        if int(np.prod(src[:-1])) != int(np.prod(out[:-1])):
            return None
        return Aff(a.terms, a.bias, len(out), False)

    _Squeeze = _Unsqueeze = _Reshape = _Flatten = _reshape_like


def affine(walk: AffineWalk, name: str) -> Optional[Aff]:
    """The affine form of ``name`` in its sources, or None (a constant, or an unknown shape)."""
    v = walk.value(name)
    return v if isinstance(v, Aff) else None


__all__ = ["AffineWalk", "Aff", "Term", "affine", "MAX_AFFINE_DEPTH"]
