"""Graph index and constant folding for the decomposed-cell finder (:mod:`importers.onnx_cells`).

* :class:`GraphIndex`: who produces and who consumes each tensor, which tensors are graph inputs
  and outputs, which are computed from constants only, and the static shapes derived from the
  graph inputs by :func:`_out_shapes` (onnx's C++ shape inference is avoided: a malformed node can
  abort the process inside it);
* :func:`_const_value`: the value of a tensor computed from constants only, read by the ONNX
  importer's checked tensor reader (size limits, external data only inside the model's folder)
  or folded by onnx's own ``ReferenceEvaluator`` on the extracted constant subgraph.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from lstm_cpu.errors import FormatError, UnsupportedModelError

from .limits import MAX_DIM, MAX_TENSOR_ELEMENTS, check_dims
from .onnx_tensors import Const, float_types, read_const

#: The cell finder refuses graphs with more nodes than this (its work is linear in the graph
#: size, but a bound keeps a hostile file from taking minutes).
MAX_NODES = 100_000
#: A constant subgraph folded in one go may have at most this many nodes.
MAX_CONST_NODES = 4096

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
        self._prepared = False

    def prepare(self):
        """Compute constant-ness and shapes (:meth:`_index`): only once a cell skeleton has been
        found, so that a file without one (most files) pays for the producer index only, and a
        large graph without cells is not refused."""
        if len(self.nodes) > MAX_NODES:  # checked here: a big graph without cells is not refused
            raise UnsupportedModelError(
                f"{self.label}: the graph has {len(self.nodes)} nodes and LSTM cells; the cell "
                f"finder examines at most {MAX_NODES}")
        if not self._prepared:
            self._prepared = True
            self._index()
        return self

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
    if op == "ConstantOfShape" and node.input:
        v = _const_value(gi, node.input[0])
        if v is not None:
            return [tuple(int(d) for d in np.asarray(v).reshape(-1))]
        z = known_zeros(gi, node.output[0])  # (rank, last dim): a run-time batch
        return None if z is None or z[0] < 1 else [(None,) * (z[0] - 1) + (z[1],)]
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

    if t.data_type in float_types():
        return read_const(Const(t, what), gi.folder)
    check_dims([int(d) for d in t.dims], what)
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
    if out.size > MAX_TENSOR_ELEMENTS:
        raise FormatError(f"{what}: folding it gives {out.size} elements, more than {MAX_TENSOR_ELEMENTS}")
    return out


def known_zeros(gi: GraphIndex, name: str) -> Optional[Tuple[int, int]]:
    """(rank, last dim) when ``name`` is all zeros whatever its run-time shape, else None.

    A dynamic-batch export starts from ``ConstantOfShape(Concat([batch from Shape(x), [H]]))``:
    not a constant (its shape is read from x at run time), but known to be zeros of H features.
    """
    from onnx import numpy_helper

    for _ in range(8):
        p = gi.producers.get(name)
        if p is None:
            return None
        node = p[0]
        if node.op_type in ("Identity", "Cast", "Expand") and node.input:
            if node.op_type == "Expand":
                v = _const_value(gi, node.input[0])
                if v is None or np.any(v):
                    return None
                shape_in = node.input[1] if len(node.input) > 1 else ""
                break
            name = node.input[0]
            continue
        if node.op_type != "ConstantOfShape" or not node.input:
            return None
        t = attrs_of(node).get("value")
        if t is not None and np.any(numpy_helper.to_array(t)):
            return None
        shape_in = node.input[0]
        break
    else:
        return None
    # The last dim: the last element of the shape vector, when that part of it is constant.
    rank = gi.static_shape(shape_in)
    p = gi.producers.get(shape_in)
    last = _const_value(gi, shape_in)
    if last is None and p is not None and p[0].op_type == "Concat" and p[0].input:
        last = _const_value(gi, p[0].input[-1])
    if last is None or rank is None or len(rank) != 1 or np.size(last) == 0:
        return None
    return int(rank[0]), int(np.asarray(last).reshape(-1)[-1])


def _ints(gi: GraphIndex, name: str) -> Optional[List[int]]:
    v = _const_value(gi, name) if name else None
    if v is None or v.dtype.kind not in "iu":
        return None
    return [int(x) for x in np.asarray(v).reshape(-1)]


def attrs_of(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


__all__ = ["GraphIndex", "attrs_of", "known_zeros", "_const_value", "_ints", "MAX_NODES", "MAX_CONST_NODES"]
