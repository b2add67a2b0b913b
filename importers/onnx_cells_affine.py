"""Graph index, constant folding and affine forms for the decomposed-cell finder.

The finder (:mod:`importers.onnx_cells`) needs three things from a graph:

* an index: who produces and who consumes each tensor, which tensors are graph inputs, and the
  static shapes derived from the graph inputs (:class:`GraphIndex`);
* the value of any tensor that is computed from constants only (:func:`_const_value`), folded by
  onnx's own ``ReferenceEvaluator`` on the extracted constant subgraph;
* the *affine form* of a gate pre-activation: ``a = sum_s s @ M_s + b`` over the non-constant
  tensors ``s`` it is computed from (:func:`affine`). The form is computed by walking back
  through the linear operators exporters write (MatMul / Gemm with transA/transB/alpha/beta,
  Transpose, Add / Sub of biases, Mul / Div / Neg by constants, Concat / Split / Slice along the
  feature axis, Identity, float Casts, Reshape / Squeeze / Unsqueeze that keep the feature axis).
  Where the walk stops, the tensor is a *source* (``x``, ``h``, or anything computed non-linearly).
  The form is exact: weights are read, never probed, so recovered weights equal the file's.

Tensors handled by the walk are per-sample vectors ``(K,)`` or batches ``(N, K)`` whose last axis
holds the features (or, after a 2-D Transpose, ``(K, N)``: ``ff`` = feature-first). No operator
in the walk mixes samples of a batch; anything that would is left as a source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from lstm_cpu.errors import FormatError, UnsupportedModelError

#: The cell finder refuses graphs with more nodes than this (its work is linear in the graph
#: size, but a bound keeps a hostile file from taking minutes).
MAX_NODES = 100_000
#: A constant subgraph folded in one go may have at most this many nodes.
MAX_CONST_NODES = 4096
#: The affine walk back from a gate stops (the tensor becomes a source) this many operators deep.
MAX_AFFINE_DEPTH = 64

# Operators a constant subgraph may contain to be folded: deterministic, no subgraphs, and none
# that can create a large tensor from a small one (Expand, Tile, ConstantOfShape, Range, Pad, ...).
_FOLDABLE = frozenset({
    "Identity", "Cast", "CastLike", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten",
    "Slice", "Gather", "Concat", "Split", "Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Abs",
    "MatMul", "Gemm", "Constant", "Shape", "Size",
})


# ---------------------------------------------------------------------------------------------
# Graph index
# ---------------------------------------------------------------------------------------------
class GraphIndex:
    """The main graph of ``model``: producers, consumers, inputs, static shapes, constant-ness."""

    def __init__(self, model, folder, label):
        g = model.graph
        self.model, self.folder, self.label = model, folder, label
        self.nodes = list(g.node)
        if len(self.nodes) > MAX_NODES:
            raise UnsupportedModelError(
                f"{label}: the graph has {len(self.nodes)} nodes; the cell finder examines at most "
                f"{MAX_NODES}")
        self.init = {t.name: t for t in g.initializer}
        self.inputs = [vi.name for vi in g.input if vi.name not in self.init]  # graph order
        self.outputs = [vi.name for vi in g.output]
        self.order = {}  # node id -> position (ONNX lists nodes in topological order)
        self.producers: Dict[str, Tuple[object, int]] = {}
        self.consumers: Dict[str, List[object]] = {}
        for pos, node in enumerate(self.nodes):
            self.order[id(node)] = pos
            for k, o in enumerate(node.output):
                if o:
                    self.producers.setdefault(o, (node, k))
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
        self.shapes: Dict[str, Tuple[Optional[int], ...]] = {}
        self.elem: Dict[str, int] = {}
        self._consts: Dict[str, Optional[np.ndarray]] = {}
        self.is_const: Dict[str, bool] = {}
        self._index()

    def static_shape(self, name) -> Optional[Tuple[int, ...]]:
        s = self.shapes.get(name)
        return s if s is not None and all(d is not None for d in s) else None

    def _index(self):
        """Constant-ness and static shapes of every tensor, in one pass in node order.

        Shapes come from the graph inputs and initializers and are propagated here, for the few
        operators a cell is written with (:func:`_out_shapes`); onnx's C++ shape inference is not
        used because a malformed node can abort the process inside it (seen: ``Split`` with a
        ``num_outputs`` that disagrees with its outputs). A tensor whose shape is not derived
        simply has none. A node whose input is defined later in the list (a cycle, or an
        unsorted graph) is conservatively not constant.
        """
        g = self.model.graph
        for vi in g.input:
            tt = vi.type.tensor_type
            if vi.type.HasField("tensor_type"):
                self.elem[vi.name] = tt.elem_type
                if tt.HasField("shape"):
                    self.shapes[vi.name] = tuple(
                        int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim)
        for name, t in self.init.items():
            self.shapes[name] = tuple(int(d) for d in t.dims)
            self.elem[name] = t.data_type
            self.is_const[name] = True
        for node in self.nodes:
            ok = node.domain in ("", "ai.onnx") and node.op_type in _FOLDABLE and not any(
                a.type in (5, 10) for a in node.attribute)  # GRAPH / GRAPHS attributes
            if ok and node.op_type in ("Shape", "Size"):
                ok = bool(node.input) and self.static_shape(node.input[0]) is not None
            elif ok:
                ok = all(self.is_const.get(i, False) for i in node.input if i)
            for o in node.output:
                if o:
                    self.is_const.setdefault(o, ok)
            try:
                shapes = _out_shapes(self, node)
            except Exception:  # a malformed node: its outputs just have no known shape
                shapes = None
            if node.input and node.input[0] in self.elem and node.op_type != "Cast":
                for o in node.output:
                    self.elem.setdefault(o, self.elem[node.input[0]])
            if shapes:
                for o, sh in zip(node.output, shapes):
                    if o and sh is not None and o not in self.shapes:
                        self.shapes[o] = tuple(sh)


_UNARY = frozenset({"Identity", "Cast", "Sigmoid", "Tanh", "Relu", "Neg", "Abs", "Sqrt", "Exp", "Log",
                    "HardSigmoid", "Softsign", "Softplus", "Elu", "LeakyRelu", "Selu", "Erf", "Gelu",
                    "ThresholdedRelu", "HardSwish", "Sin", "Cos", "Reciprocal"})
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})


def _out_shapes(gi: "GraphIndex", node) -> Optional[List[Optional[Tuple]]]:
    """Static output shapes of ``node`` for the operators a cell is written with, else None."""
    op, ins = node.op_type, [gi.shapes.get(i) if i else None for i in node.input]
    at = attrs_of(node)
    x = ins[0] if ins else None
    if op == "Constant":
        t = at.get("value")
        if t is not None:
            return [tuple(int(d) for d in t.dims)]
        v = next((val for k, val in at.items() if k.startswith("value_")), None)
        return [(len(v),) if isinstance(v, (list, tuple)) else ()]
    if op == "Shape":
        return [(len(x),)] if x is not None else None
    if x is None or any(d is not None and d < 0 for d in x):
        return None
    r = len(x)
    if op in _UNARY:
        return [x]
    if op in _BINARY and len(ins) == 2 and ins[1] is not None:
        y = ins[1]
        out = []
        for a, b in zip(((1,) * (len(y) - r) + x)[::-1], ((1,) * (r - len(y)) + y)[::-1]):
            out.append(b if a == 1 else a if b == 1 or b == a or b is None else None)
        return [tuple(out[::-1])]
    if op == "MatMul" and len(ins) == 2 and ins[1] is not None and r in (1, 2) and len(ins[1]) in (1, 2):
        y = ins[1]
        return [tuple(([x[0]] if r == 2 else []) + ([y[1]] if len(y) == 2 else []))]
    if op == "Gemm" and len(ins) >= 2 and ins[1] is not None and r == 2 and len(ins[1]) == 2:
        y = ins[1]
        return [(x[1] if at.get("transA", 0) else x[0], y[0] if at.get("transB", 0) else y[1])]
    if op == "Transpose":
        perm = list(at.get("perm", range(r)[::-1]))
        return [tuple(x[p] for p in perm)] if sorted(perm) == list(range(r)) else None
    if op == "Concat" and all(s is not None and len(s) == r for s in ins if s is not None):
        if any(s is None for s in ins):
            return None
        ax = int(at.get("axis", 0)) % r
        tot = sum(s[ax] for s in ins) if all(s[ax] is not None for s in ins) else None
        return [x[:ax] + (tot,) + x[ax + 1:]]
    if op == "Split":
        ax = int(at.get("axis", 0)) % r
        n = len(node.output)
        sizes = _ints(gi, node.input[1]) if len(node.input) > 1 and node.input[1] else None
        sizes = sizes or ([int(v) for v in at["split"]] if "split" in at else None)
        if sizes is None and x[ax] is not None and int(at.get("num_outputs", n)) == n:
            step = -(-x[ax] // n)
            sizes = [min(step, x[ax] - j * step) for j in range(n)]
        if sizes is None or len(sizes) != n:
            return None
        return [x[:ax] + (s,) + x[ax + 1:] for s in sizes]
    if op == "Slice" and len(node.input) >= 3:
        starts, ends = _ints(gi, node.input[1]), _ints(gi, node.input[2])
        axes = _ints(gi, node.input[3]) if len(node.input) > 3 and node.input[3] else None
        steps = _ints(gi, node.input[4]) if len(node.input) > 4 and node.input[4] else None
        if starts is None or ends is None:
            return None
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        out = list(x)
        for s, e, a, st in zip(starts, ends, axes, steps):
            a = a % r
            out[a] = None if x[a] is None or st == 0 else len(range(x[a])[slice(s, e, st)])
        return [tuple(out)]
    if op == "Gather" and len(node.input) == 2:
        idx = _const_value(gi, node.input[1])
        ax = int(at.get("axis", 0)) % r
        return None if idx is None else [x[:ax] + tuple(np.shape(idx)) + x[ax + 1:]]
    if op in ("Squeeze", "Unsqueeze"):
        axes = _ints(gi, node.input[1]) if len(node.input) > 1 and node.input[1] else (
            [int(a) for a in at["axes"]] if "axes" in at else None)
        if op == "Squeeze":
            if axes is None:
                return [tuple(d for d in x if d != 1)] if None not in x else None
            axes = {a % r for a in axes}
            return [tuple(d for k, d in enumerate(x) if k not in axes)]
        if axes is None:
            return None
        out, R = list(x), r + len(axes)
        for a in sorted(a % R for a in axes):
            out.insert(a, 1)
        return [tuple(out)]
    if op == "Reshape" and len(node.input) == 2:
        target = _ints(gi, node.input[1])
        if target is None or None in x:
            return None
        out = [x[k] if v == 0 and not at.get("allowzero", 0) and k < r else v for k, v in enumerate(target)]
        if out.count(-1) == 1:
            known = int(np.prod([v for v in out if v != -1]))
            out[out.index(-1)] = int(np.prod(x)) // known if known else 0
        return [tuple(out)] if int(np.prod(out)) == int(np.prod(x)) and min(out) >= 0 else None
    if op == "Flatten" and None not in x:
        ax = int(at.get("axis", 1)) % (r + 1)
        return [(int(np.prod(x[:ax])), int(np.prod(x[ax:])))]
    return None


# ---------------------------------------------------------------------------------------------
# Constant values
# ---------------------------------------------------------------------------------------------
def _tensor_value(gi: GraphIndex, t, what: str) -> np.ndarray:
    """A TensorProto -> array: float tensors through the ONNX importer's checked reader (size
    limits, external data only inside the model's folder), others after the same size checks."""
    from onnx import TensorProto, numpy_helper

    from .onnx_lstm import _check_dims, _Const, _float_types, _read_const

    if t.data_type in _float_types():
        return _read_const(_Const(t, what), gi.folder)
    _check_dims([int(d) for d in t.dims], what)
    if t.data_location == TensorProto.EXTERNAL:
        raise UnsupportedModelError(f"{what}: non-float tensor {t.name!r} in external data")
    try:
        return numpy_helper.to_array(t)
    except Exception as exc:
        raise FormatError(f"{what}: unreadable tensor {t.name!r}: {exc}") from None


def _constant_attr(gi: GraphIndex, node, what: str) -> np.ndarray:
    from onnx import helper

    for a in node.attribute:
        if a.name == "value":
            return _tensor_value(gi, a.t, what)
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            v = helper.get_attribute_value(a)
            return np.asarray(v, np.float32 if "float" in a.name else np.int64)
    raise UnsupportedModelError(f"{what}: Constant node {node.name!r} holds no numeric value")


def _const_value(gi: GraphIndex, name: str) -> Optional[np.ndarray]:
    """The value of tensor ``name`` if it is computed from constants only, else None.

    Initializers and ``Constant`` nodes are read directly; any other constant-only subgraph is
    extracted (``Shape`` of a statically shaped tensor replaced by its value) and evaluated with
    ``onnx.reference.ReferenceEvaluator``. The one entry point, so that a shared folder can
    replace it.
    """
    if not name or not gi.is_const.get(name, False):
        return None
    if name in gi._consts:
        return gi._consts[name]
    gi._consts[name] = None  # a re-entrant call (cannot happen in a DAG) sees "not constant"
    what = f"{gi.label}: constant {name!r}"
    if name in gi.init:
        val = _tensor_value(gi, gi.init[name], what)
    else:
        node, k = gi.producers[name]
        if node.op_type == "Constant":
            val = _constant_attr(gi, node, what)
        elif node.op_type in ("Shape", "Size"):
            val = _shape_value(gi, node)[k] if node.op_type == "Shape" or k == 0 else None
        else:
            val = _fold(gi, name, what)
    gi._consts[name] = val
    return val


def _shape_value(gi: GraphIndex, node) -> List[np.ndarray]:
    shape = gi.static_shape(node.input[0])
    if node.op_type == "Size":
        return [np.asarray(int(np.prod(shape)), np.int64)]
    attrs = {a.name: a.i for a in node.attribute}
    r = len(shape)
    start, end = attrs.get("start", 0), attrs.get("end", r)
    start, end = (start + r if start < 0 else start), (end + r if end < 0 else end)
    return [np.asarray(shape[max(0, start):min(r, end)], np.int64)]


def _fold(gi: GraphIndex, name: str, what: str) -> Optional[np.ndarray]:
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    # Collect the constant subgraph (bounded), leaves: initializers, Constants, static Shapes.
    need, stack, leaves = {}, [name], set()
    while stack:
        t = stack.pop()
        if t in leaves or not t or t in gi.init:
            leaves.add(t)
            continue
        node, _ = gi.producers[t]
        if id(node) in need:
            continue
        if node.op_type in ("Constant", "Shape", "Size"):
            leaves.update(o for o in node.output if o)
            continue
        need[id(node)] = node
        if len(need) > MAX_CONST_NODES:
            return None
        stack.extend(i for i in node.input if i)
    inits = []
    for t in sorted(x for x in leaves if x):
        v = _const_value(gi, t)
        if v is None:
            return None
        inits.append(numpy_helper.from_array(np.asarray(v), t))
    nodes = sorted(need.values(), key=lambda n: gi.order[id(n)])
    graph = helper.make_graph(nodes, "fold", [], [helper.make_tensor_value_info(name, 0, None)],
                              initializer=inits)
    m = helper.make_model(graph, opset_imports=list(gi.model.opset_import))
    m.ir_version = gi.model.ir_version or m.ir_version
    try:
        out = ReferenceEvaluator(m).run([name], {})[0]
    except Exception:
        return None
    out = np.asarray(out)
    from .onnx_lstm import MAX_TENSOR_ELEMENTS

    if out.size > MAX_TENSOR_ELEMENTS:
        raise FormatError(f"{what}: folding it gives {out.size} elements, more than {MAX_TENSOR_ELEMENTS}")
    return out


def _ints(gi: GraphIndex, name: str) -> Optional[List[int]]:
    v = _const_value(gi, name) if name else None
    if v is None or v.dtype.kind not in "iu":
        return None
    return [int(x) for x in np.asarray(v).reshape(-1)]


def attrs_of(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


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

    # A value is a numpy array (constant), an Aff, or None (cannot be a source: unknown shape).
    def value(self, name: str, depth: int = 0):
        if name in self.memo:
            return self.memo[name]
        c = _const_value(self.gi, name)
        if c is not None:
            v = c
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
        if shape is None or len(shape) not in (1, 2) or shape[-1] is None or shape[-1] <= 0:
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


__all__ = ["GraphIndex", "AffineWalk", "Aff", "Term", "affine", "attrs_of", "_const_value",
           "MAX_NODES", "MAX_CONST_NODES"]
