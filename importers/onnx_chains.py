"""Chain detection: ``LSTM`` nodes stacked by ``torch.onnx.export`` become one multi-layer model.

Chains (multi-layer stacks)
---------------------------
``torch.onnx.export`` writes an L-layer ``nn.LSTM`` as L LSTM nodes linked by layout ops
(``Squeeze`` for one direction, ``Transpose`` + ``Reshape`` for two; the dynamo exporter computes
the ``Reshape`` target with ``Shape``/``Slice``/``Mul``/``Concat``). The importer evaluates those
ops symbolically and links node A to node B when B's ``X`` is exactly A's ``Y`` rearranged to
(T, N, D*H) with the directions outer; such a chain becomes one multi-layer model. Every node of a
chain must share H, D, ``clip``, ``input_forget`` and ``sequence_lens``.

The symbolic evaluation here is shape logic only (which axis of which node's Y ends up where); it
never computes weights. A constant ``sequence_lens`` is checked per chain against X's static time
length (:func:`check_constant_lengths`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from lstm_cpu.errors import FormatError, LSTMError, UnsupportedModelError

from .onnx_fold import Folder
from .onnx_graph import Graph, graph_aborts_shape_inference
from .onnx_lstm_op import NodeInfo, is_lstm, lstm_version, parse_node
from .onnx_tensors import RuntimeValue, float_types, read_const, resolve_const


def check_constant_lengths(model, chain: List[NodeInfo], label) -> Optional[int]:
    """A constant sequence_lens is accepted when every entry equals X's static time length T:
    then it changes nothing (tf2onnx and constant folding produce such tensors from static
    shapes). Anything else would bake lengths into the model, which lstm-cpu takes at run time.
    Returns T when some node had such a constant, else None."""
    consts = [i for i in chain if i.seq_const is not None]
    if not consts:
        return None
    T = static_sizes(model, chain[:1]).get("T")
    for info in consts:
        v = info.seq_const
        shown = np.array2string(v[:8], separator=", ") + (" ..." if v.size > 8 else "")
        if T is None or v.size == 0 or np.any(v != T):
            raise UnsupportedModelError(
                f"{label}: LSTM node {info.name!r}: input sequence_lens is a constant {shown}; "
                "lstm-cpu takes sequence lengths at run time (model.run(x, lengths=...)) and accepts "
                "a constant only when every entry equals X's static time length (a no-op); "
                + (f"X's time length is {T}" if T else "X's time length is not static in this model"))
    return T



# ---------------------------------------------------------------------------------------------
# Chains: symbolic evaluation of the layout ops between LSTM nodes
# ---------------------------------------------------------------------------------------------
# A dimension is a monomial coef * prod(symbols): (coef, ("B", "T")). Symbols are the sequence
# length T and batch N ("B"); every other size is a known integer.
_ONE = (1, ())


def _mul(a, b):
    return (a[0] * b[0], tuple(sorted(a[1] + b[1])))


def _divides(a, b) -> bool:
    """a | b for monomials (coefficient divides, symbols a sub-multiset)."""
    if a[0] == 0 or b[0] % a[0]:
        return False
    rest = list(b[1])
    for s in a[1]:
        if s not in rest:
            return False
        rest.remove(s)
    return True


@dataclass(frozen=True)
class _Seq:
    """A tensor that is an LSTM node's Y rearranged: per axis, its atoms (outer to inner).

    Atoms: "T", "B", "D", "H" of node ``src``. Atoms of size 1 are dropped (they do not order data).
    """

    src: int  # id() of the LSTM node proto
    axes: Tuple[Tuple[str, ...], ...]


@dataclass(frozen=True)
class _Vec:
    """A small int64 tensor (a shape) whose values are known symbolically."""

    dims: Tuple[tuple, ...]
    scalar: bool = False


class _Chains:
    """Symbolic evaluator for one graph: which LSTM Y feeds which LSTM X."""

    def __init__(self, g: Graph, infos: Dict[int, NodeInfo], known: Dict[str, int], opset: int):
        self.g, self.infos, self.known, self.opset = g, infos, known, opset
        self.memo: Dict[str, object] = {}
        self.depth = 0  # recursion depth of value(): long op chains are simply not links

    def size(self, src, atom):
        info = self.infos[src]
        if atom == "D":
            return (info.D, ())
        if atom == "H":
            return (info.H, ())
        k = self.known.get(atom)
        return (k, ()) if k else (1, (atom,))

    def axis_size(self, src, atoms):
        s = _ONE
        for a in atoms:
            s = _mul(s, self.size(src, a))
        return s

    def norm(self, src, axes):
        return _Seq(src, tuple(tuple(a for a in ax if self.size(src, a) != _ONE) for ax in axes))

    # -- constants as shape vectors -----------------------------------------------------------
    def const_ints(self, name):
        try:
            c = resolve_const(self.g, name, "shape")
        except (RuntimeValue, LSTMError):
            return None
        t = c.tensor
        from onnx import numpy_helper

        if c.casts or len(t.dims) > 1 or math.prod(c.dims) > 64 or t.data_location == 1:
            return None
        try:
            a = numpy_helper.to_array(t)
        except Exception:
            return None
        if a.dtype.kind not in "iu":
            return None
        return _Vec(tuple((int(v), ()) for v in a.reshape(-1)), scalar=a.ndim == 0)

    def ints_attr_or_input(self, node, attr, k):
        """Axes/perm-like ints from attribute ``attr`` or (newer opsets) constant input k."""
        for a in node.attribute:
            if a.name == attr:
                return list(a.ints)
        if len(node.input) > k and node.input[k]:
            v = self.value(node.input[k])
            if isinstance(v, _Vec) and all(not d[1] for d in v.dims):
                return [d[0] for d in v.dims]
            return "unknown"
        return None

    # -- evaluation ---------------------------------------------------------------------------
    def value(self, name):
        """The symbolic value of tensor ``name``: a _Seq, a _Vec, or None (unknown)."""
        if name in self.memo:
            return self.memo[name]
        self.memo[name] = None  # cycle guard
        v = None
        if self.depth < 150:
            self.depth += 1
            try:
                v = self._eval(name)
            except (ValueError, IndexError, KeyError, TypeError, ZeroDivisionError):
                v = None  # a malformed shape op is simply not a link
            finally:
                self.depth -= 1
        self.memo[name] = v
        return v

    def _eval(self, name):
        g = self.g
        if name not in g.producers:
            return self.const_ints(name) if name in g.initializers else None
        node, k = g.producers[name]
        if node.domain not in ("", "ai.onnx"):
            return None
        op = node.op_type
        if op == "LSTM":
            if k != 0 or id(node) not in self.infos:
                return None
            info = self.infos[id(node)]
            axes = (("T",), ("D",), ("B",), ("H",)) if info.layout == 0 else (("B",), ("T",), ("D",), ("H",))
            return self.norm(id(node), axes)
        if op == "Constant":
            return self.const_ints(name)
        if op == "Shape":  # of a rearranged Y: its sizes, symbolically (dynamo's Reshape targets)
            x = self.value(node.input[0]) if node.input else None
            if not isinstance(x, _Seq):
                return None
            dims = tuple(self.axis_size(x.src, ax) for ax in x.axes)
            start = next((a.i for a in node.attribute if a.name == "start"), 0)
            end = next((a.i for a in node.attribute if a.name == "end"), len(dims))
            return _Vec(dims[slice(start, end)])
        ins = [self.value(i) if i else None for i in node.input]
        x = ins[0] if ins else None
        if op in ("Identity", "Cast") or (op == "Dropout" and k == 0):
            if op == "Cast" and isinstance(x, _Seq):
                to = next((a.i for a in node.attribute if a.name == "to"), None)
                return x if to in float_types() else None
            return x
        if isinstance(x, _Seq):
            return self._seq_op(node, op, x)
        if isinstance(x, _Vec) or op == "Concat":
            return self._vec_op(node, op, ins)
        return None

    def _seq_op(self, node, op, x: _Seq):
        axes = list(x.axes)
        n = len(axes)
        if op == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(n))[::-1])
            if sorted(perm) != list(range(n)):
                return None
            return _Seq(x.src, tuple(axes[p] for p in perm))
        if op in ("Squeeze", "Unsqueeze"):
            ax = self.ints_attr_or_input(node, "axes", 1)
            if ax == "unknown" or (ax is None and op == "Unsqueeze"):
                return None
            if op == "Squeeze":
                if ax is None:  # squeeze every size-1 axis: only safe if none has unknown size
                    return None
                ax = sorted({a % n for a in ax})
                if any(axes[a] for a in ax):
                    return None  # not provably size 1
                return _Seq(x.src, tuple(a for i, a in enumerate(axes) if i not in ax))
            out_n = n + len(ax)
            ax = sorted({a % out_n for a in ax})
            it = iter(axes)
            return _Seq(x.src, tuple(() if i in ax else next(it) for i in range(out_n)))
        if op == "Flatten":
            a = next((at.i for at in node.attribute if at.name == "axis"), 1) % (n + 1)
            return _Seq(x.src, (sum(axes[:a], ()), sum(axes[a:], ())))
        if op == "Reshape":
            shape = self.value(node.input[1]) if len(node.input) > 1 else None
            if not isinstance(shape, _Vec) or shape.scalar:
                return None
            allowzero = next((at.i for at in node.attribute if at.name == "allowzero"), 0)
            return self._reshape(x, list(shape.dims), allowzero)
        return None

    def _reshape(self, x: _Seq, target, allowzero):
        src, axes = x.src, x.axes
        sizes = []
        for k, t in enumerate(target):
            if t == (0, ()) and not allowzero:
                if k >= len(axes):
                    return None
                sizes.append(self.axis_size(src, axes[k]))
            elif t == (-1, ()):
                sizes.append(None)
            elif t[0] <= 0:
                return None
            else:
                sizes.append(t)
        if sizes.count(None) > 1:
            return None
        atoms = [a for ax in axes for a in ax]

        def take(atoms, want):
            """Greedy: the shortest prefix of atoms whose product is ``want``."""
            group, prod = [], _ONE
            while prod != want:
                if not atoms:
                    return None
                nxt = _mul(prod, self.size(src, atoms[0]))
                if not _divides(nxt, want):
                    return None
                prod = nxt
                group.append(atoms.pop(0))
            return group

        left = sizes.index(None) if None in sizes else len(sizes)
        rest = list(atoms)
        groups = []
        for s in sizes[:left]:
            grp = take(rest, s)
            if grp is None:
                return None
            groups.append(tuple(grp))
        if left == len(sizes):
            return None if rest else _Seq(src, tuple(groups))
        tail = []
        rest.reverse()
        for s in reversed(sizes[left + 1 :]):
            grp = take(rest, s)
            if grp is None:
                return None
            tail.append(tuple(reversed(grp)))
        rest.reverse()
        return _Seq(src, tuple(groups) + (tuple(rest),) + tuple(reversed(tail)))

    def _vec_op(self, node, op, ins):
        x = ins[0] if ins else None
        if op == "Concat":
            if not ins or not all(isinstance(v, _Vec) for v in ins):
                return None
            return _Vec(tuple(d for v in ins for d in v.dims))
        if op in ("Squeeze", "Unsqueeze", "Reshape"):
            if op == "Squeeze" and len(x.dims) == 1:
                return _Vec(x.dims, scalar=True)
            if op == "Unsqueeze" and x.scalar:
                return _Vec(x.dims)
            if op == "Reshape":
                return _Vec(x.dims)  # a shape vector reshaped to 1-D ([-1] or [n])
            return None
        if op == "Gather":
            idx = ins[1] if len(ins) > 1 else None
            if not isinstance(idx, _Vec) or any(d[1] for d in idx.dims):
                return None
            n = len(x.dims)
            picked = tuple(x.dims[d[0] % n] for d in idx.dims if -n <= d[0] < n)
            if len(picked) != len(idx.dims):
                return None
            return _Vec(picked, scalar=idx.scalar)
        if op == "Slice":
            def ints(k):
                v = ins[k] if len(ins) > k and node.input[k] else None
                if v is None:
                    return None
                return [d[0] for d in v.dims] if isinstance(v, _Vec) and all(not d[1] for d in v.dims) else "bad"

            if self.opset < 10:
                st = next((list(a.ints) for a in node.attribute if a.name == "starts"), None)
                en = next((list(a.ints) for a in node.attribute if a.name == "ends"), None)
                steps = None
            else:
                st, en, steps = ints(1), ints(2), ints(4)
                if ints(3) not in (None, [0], [-1]):
                    return None
            if st in (None, "bad") or en in (None, "bad") or steps == "bad":
                return None
            step = (steps or [1])[0]
            if step == 0:
                return None
            return _Vec(x.dims[slice(st[0], en[0], step)])
        if op == "Mul":
            y = ins[1] if len(ins) > 1 else None
            if not isinstance(y, _Vec):
                return None
            a, b = x.dims, y.dims
            if len(a) == 1 and len(b) > 1:
                a = a * len(b)
            if len(b) == 1 and len(a) > 1:
                b = b * len(a)
            if len(a) != len(b):
                return None
            return _Vec(tuple(_mul(p, q) for p, q in zip(a, b)), scalar=x.scalar and y.scalar)
        return None

    def link(self, info: NodeInfo) -> Optional[int]:
        """id() of the LSTM node whose Y is exactly this node's X, laid out (T, N, D*H), or None."""
        v = self.value(info.node.input[0])
        if not isinstance(v, _Seq):
            return None
        want = (("T",), ("B",), ("D", "H")) if info.layout == 0 else (("B",), ("T",), ("D", "H"))
        return v.src if v == self.norm(v.src, want) else None


def trailing_head(last: NodeInfo, opset: int, fold, label):
    """A linear layer applied to the chain's output and nothing after it, or None.

    Recognised: ``MatMul(Y', W)`` with Y' the last node's Y laid out (T, N, D*H) (what
    ``to_onnx`` and ``torch.onnx.export`` write for ``nn.Linear`` on an LSTM's output), W a
    constant (D*H, O), optionally ``Add`` of a constant (O,), whose result is a graph output
    (directly or through Identity) while Y itself is not. Returns ``(weight (O, D*H), bias (O,)
    or None, output name)``. Anything else after the chain is left to the caller, as before.
    """
    g = last.graph
    y = last.node.output[0] if last.node.output else ""
    outputs = {o.name for o in g.proto.output}
    if not y or y in outputs:
        return None
    ev = _Chains(g, {id(last.node): last}, {}, opset)
    want = ev.norm(id(last.node), (("T",), ("B",), ("D", "H")))
    DH = last.D * last.H
    for node in g.proto.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        if ev.value(node.input[0]) != want:
            continue
        w = _head_const(g, node.input[1], fold, label, node)
        if w is None or w.ndim != 2 or w.shape[0] != DH:
            return None
        out, bias = node.output[0], None
        users = g.consumers.get(out, [])
        if len(users) == 1 and users[0].op_type == "Add" and out not in outputs:
            add = users[0]
            other = add.input[1] if add.input[0] == out else add.input[0]
            b = _head_const(g, other, fold, label, add)
            if b is not None and b.shape == (w.shape[1],):
                out, bias = add.output[0], b
        while out not in outputs:
            users = g.consumers.get(out, [])
            if len(users) != 1 or users[0].op_type != "Identity":
                return None
            out = users[0].output[0]
        return w.T.copy(), bias, out
    return None


def _head_const(g, name, fold, label, node) -> Optional[np.ndarray]:
    try:
        c = resolve_const(g, name, f"{label}: {node.op_type} node {node.name!r} input {name!r}", fold=fold)
    except RuntimeValue:
        return None
    return np.asarray(read_const(c, fold.folder), np.float64)


def static_sizes(model, infos: List[NodeInfo]) -> Dict[str, int]:
    """Known T and N of the first node's X from shape inference (static exports), when > 0."""
    import onnx

    if graph_aborts_shape_inference(model.graph) or any(
            graph_aborts_shape_inference(f) for f in model.functions):
        return {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is an optimisation here, never a requirement
        return {}
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim]
    known: Dict[str, int] = {}
    for info in infos:
        s = shapes.get(info.node.input[0])
        if s and len(s) == 3:
            t, b = (s[0], s[1]) if info.layout == 0 else (s[1], s[0])
            if t > 0 and known.setdefault("T", t) != t:
                return {}
            if b > 0 and known.setdefault("B", b) != b:
                return {}
    return known


# ---------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------
def links(g, infos, known, opset, evaluator=None) -> Dict[int, int]:
    """id(LSTM node) -> id(the LSTM node whose Y is its X), for the nodes of graph g.
    ``evaluator``: a :class:`_Chains` subclass for other recurrent ops (DynamicQuantizeLSTM)."""
    ev = (evaluator or _Chains)(g, infos, known, opset)
    pred = {}
    for k, info in infos.items():
        p = ev.link(info)
        if p is not None and p != k:
            pred[k] = p
    return pred


def walk_chains(nodes, infos, pred) -> List[list]:
    """Follow the links from every node that nothing feeds: the chains, bottom layer first. A Y
    feeding two nodes is a branch, not a stack: those links are dropped."""
    succ: Dict[int, List[int]] = {}
    for b, a in pred.items():
        succ.setdefault(a, []).append(b)
    pred = dict(pred)
    for a, bs in succ.items():
        if len(bs) > 1:
            for b in bs:
                pred.pop(b, None)
    nxt = {a: b for b, a in pred.items()}
    chains = []
    for n in nodes:
        if id(n) in pred:
            continue
        chain, k, seen = [], id(n), set()
        while k is not None and k not in seen:
            seen.add(k)
            chain.append(infos[k])
            k = nxt.get(k)
        chains.append(chain)
    return chains


def stacked_state(chain, D: int, H: int):
    """The chain's constant initial states stacked (h0 (L*D, H), c0 (L*D, H)), or None when
    every node starts from zeros."""
    if all(i.h0 is None and i.c0 is None for i in chain):
        return None
    L = len(chain)
    h0 = np.zeros((L * D, H), np.float64)
    c0 = np.zeros((L * D, H), np.float64)
    for l, info in enumerate(chain):
        if info.h0 is not None:
            h0[l * D : (l + 1) * D] = info.h0
        if info.c0 is not None:
            c0[l * D : (l + 1) * D] = info.c0
    return (h0, c0) if (np.any(h0) or np.any(c0)) else None


def find_chains(model, graphs, opset, folder, label) -> List[List[NodeInfo]]:
    version = None
    chains = []
    fold = Folder.of(model, folder)
    for g in graphs:
        nodes = [n for n in g.proto.node if is_lstm(n)]
        if not nodes:
            continue
        version = version or lstm_version(opset, label)
        infos = {id(n): parse_node(g, n, version, fold, label) for n in nodes}
        pred = links(g, infos, {}, opset)
        # A static export (dynamo) reshapes to constant sizes: retry with T and N from shape
        # inference when some node's X is computed but did not link symbolically.
        if g.parent is None and len(nodes) > 1 and any(
                id(n) not in pred and n.input[0] in g.producers for n in nodes):
            known = static_sizes(model, list(infos.values()))
            if known:
                pred = links(g, infos, known, opset)
        # An encoder feeding a decoder of another size (or other attributes) is two LSTMs, not
        # one stack: each stays a candidate of its own.
        pred = {b: a for b, a in pred.items() if _stackable(infos[a], infos[b])}
        chains.extend(walk_chains(nodes, infos, pred))
    return chains



def _stackable(a: NodeInfo, b: NodeInfo) -> bool:
    """Whether node b can be the layer after node a of one lstm-cpu model (a uniform stack)."""
    def key(i):
        return i.H, i.D, i.direction, i.clip, i.input_forget, i.inputs["sequence_lens"]

    return key(a) == key(b)


def check_chain(chain: List[NodeInfo], label):
    first = chain[0]
    for prev, info in zip(chain, chain[1:]):
        where = f"{label}: LSTM node {info.name!r} (fed by {prev.name!r})"
        if info.I != prev.D * prev.H:
            raise FormatError(
                f"{where}: tensor W has input size {info.I}, expected {prev.D * prev.H} "
                f"(= num_directions {prev.D} x hidden_size {prev.H} of the previous node)")
        for attr, a, b in (("hidden_size", first.H, info.H), ("num_directions", first.D, info.D),
                           ("direction", first.direction, info.direction), ("clip", first.clip, info.clip),
                           ("input_forget", first.input_forget, info.input_forget),
                           ("sequence_lens", first.inputs["sequence_lens"], info.inputs["sequence_lens"])):
            if a != b:
                raise UnsupportedModelError(
                    f"{where}: {attr}={b!r} differs from {first.name!r} ({attr}={a!r}); an lstm-cpu "
                    "model is a uniform stack (pass node= to pick one node's chain elsewhere)")


__all__ = ["find_chains", "check_chain", "check_constant_lengths", "static_sizes"]
