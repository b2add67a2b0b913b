"""LSTM cells written in primitive ONNX operators -> the canonical LSTM (issue 10, items 4 and 5).

There is no ``LSTM`` node: ``torch.onnx.export`` writes ``nn.LSTMCell`` (and any hand-written
cell) as MatMul / Gemm, Add, Split / Slice, Sigmoid, Tanh, Mul and Add. A Python loop over such a
cell with a fixed length becomes the same cell repeated, step after step.

How a cell is recognised (structure only: names and the order of Split outputs are never used)
-------------------------------------------------------------------------------------------
The skeleton, anchored at the ``Tanh`` of the new cell state::

    c_new = Add( Mul(Sigmoid(a_f), c_old),  Mul(Sigmoid(a_i), Tanh(a_g)) )
    h_new = Mul( Sigmoid(a_o), Tanh(c_new) )

* the gate whose sigmoid multiplies the old ``c`` is **f**;
* the pre-activation that goes through ``tanh`` and multiplies a sigmoid gate is **g**, and that
  sigmoid gate is **i**;
* the sigmoid that multiplies ``tanh(c_new)`` is **o**.

Each pre-activation ``a_*`` is then read as an exact affine function of the tensors it is computed
from (:mod:`importers.onnx_cells_affine`): whatever MatMul / Gemm / Concat / Split / Slice / bias
Adds the exporter wrote, the result is ``a = sum_s s @ M_s + b``, and ``M_s`` are the weights.

* **cell** (kind ``"cell"``): a lone cell; its sources are ``x`` and ``h`` (``h`` has H features;
  if ``I == H`` too, the graph-input order x, h, c decides, as ``torch`` writes it). The result is
  a one-layer model whose stream state is the cell's ``(h, c)``.
* **unrolled** (kind ``"unrolled"``): cells linked by their state (the ``c_old`` of one is the
  ``c_new`` of another, and the previous ``h_new`` is among its sources) form a *chain* of T
  steps, which must share their weights exactly. Chains consuming the same input sequence in
  opposite orders are the two directions of a layer; chains consuming the ``h`` of other chains
  (concatenated forward then backward) are the layers above. The first step may start from a
  constant state (folded into its bias by the exporter: recovered, and checked) or from graph
  inputs (then the caller passes the state to ``model.run``).

Every candidate is verified before it is returned (:mod:`importers.onnx_cells_check`): the
matched subgraph is evaluated (onnxruntime, else onnx's ``ReferenceEvaluator``) on random inputs
and states and compared with a float64 LSTM of the recovered weights. A graph that has the
skeleton but is not an LSTM the engine can run (a state that passes through other operators, a
gate depending on anything but x and h, weights that change between steps, a mismatch in the
check) is refused with :class:`UnsupportedModelError` naming the node and the reason.

Only the main graph is searched. Work is linear in the graph size; graphs larger than
:data:`~importers.onnx_cells_affine.MAX_NODES` nodes are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from lstm_cpu.candidates import Candidate
from lstm_cpu.errors import FormatError, LSTMError, UnsupportedModelError
from lstm_cpu.spec import GATE_ORDER, LayerParams

from .onnx_cells_affine import AffineWalk, GraphIndex, _const_value, affine, attrs_of
from .onnx_cells_check import self_check
from .onnx_found import Found


# ---------------------------------------------------------------------------------------------
# One cell
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Cell:
    add: object  # the Add node c_new = f*c + i*g
    c_new: str
    h_new: str
    c_old: str
    pre: Dict[str, str]  # gate letter -> pre-activation tensor
    acts: tuple = ()  # (g activation node, h activation node)
    pred: Optional["_Cell"] = None
    H: int = 0
    W: Dict[str, np.ndarray] = field(default_factory=dict)  # source -> (4H, K_s), gates i, f, g, o
    b: Optional[np.ndarray] = None  # (4H,)

    @property
    def name(self) -> str:
        return self.add.name or self.c_new

    def sources(self) -> List[str]:
        return list(self.W)

    def k_src(self, s) -> int:
        return self.W[s].shape[1]

    def weights(self, s) -> np.ndarray:
        """(4H, K_s) float64: the weights applied to source ``s``, gate blocks i, f, g, o."""
        return self.W[s]

    def bias(self) -> np.ndarray:
        return self.b


class _Pool:
    """One copy of each distinct weight array: an unrolled graph repeats the same weights T
    times, and T dense copies of a large cell would not fit in memory."""

    def __init__(self):
        self.arrays: Dict[tuple, List[np.ndarray]] = {}

    def intern(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a)
        flat = a.reshape(-1)
        key = (a.shape, float(flat.sum()), float(flat[:: max(1, flat.size // 64)].sum()))  # cheap fingerprint
        same = self.arrays.setdefault(key, [])
        hit = next((b for b in same if np.array_equal(b, a)), None)
        if hit is not None:
            return hit
        same.append(a)
        return a


#: Unary operators accepted where a cell has its two tanh, so that a cell with another function
#: there is recognised, and refused with a reason, instead of silently not found.
_ACTS = frozenset({"Tanh", "Sigmoid", "Relu", "HardSigmoid", "Softsign", "Softplus", "Elu",
                   "LeakyRelu", "Selu", "ThresholdedRelu", "HardSwish", "Gelu", "Abs", "Sin", "Erf"})


def _producer(gi: GraphIndex, name: str, ops) -> Optional[object]:
    p = gi.producers.get(name)
    if p is None or p[0].op_type not in ops or p[0].domain not in ("", "ai.onnx") or not p[0].input:
        return None
    return p[0]


def _skeleton(gi: GraphIndex, act_c) -> Optional[_Cell]:
    """The cell whose ``h_act(c_new)`` is node ``act_c`` (a Tanh in an LSTM), or None when the
    skeleton does not match. The two tanh positions accept any unary activation here;
    :func:`_check_acts` refuses anything but Tanh."""
    c_new = act_c.input[0] if act_c.input else ""
    add = _producer(gi, c_new, ("Add",))
    if add is None or len(add.input) != 2:
        return None
    muls = [_producer(gi, i, ("Mul",)) for i in add.input]
    if any(m is None or len(m.input) != 2 for m in muls):
        return None
    sig = lambda t: _producer(gi, t, ("Sigmoid",))  # noqa: E731
    act = lambda t: _producer(gi, t, _ACTS)  # noqa: E731

    def as_ig(m):
        """(sigmoid node, activation node) when Mul ``m`` is sigmoid(a) * act(b), else None."""
        for j in (0, 1):
            s, a = sig(m.input[j]), act(m.input[1 - j])
            if s is not None and a is not None:
                return s, a
        return None

    def as_fc(m):
        """(sigmoid node, old c) when Mul ``m`` is sigmoid(a) * c with c no activation output."""
        for j in (0, 1):
            if sig(m.input[j]) is not None and act(m.input[1 - j]) is None:
                return sig(m.input[j]), m.input[1 - j]
        return None

    roles = [(as_ig(muls[0]), as_fc(muls[1])), (as_ig(muls[1]), as_fc(muls[0]))]
    roles = [r for r in roles if r[0] is not None and r[1] is not None]
    if len(roles) != 1:
        return None
    (s_i, a_g), (s_f, c_old) = roles[0]
    h_muls = []
    for m in gi.consumers.get(act_c.output[0], []):
        if m.op_type == "Mul" and len(m.input) == 2 and m.output and m.output[0]:
            other = m.input[1] if m.input[0] == act_c.output[0] else m.input[0]
            s = sig(other)
            if s is not None:
                h_muls.append((m, s))
    if len(h_muls) != 1:
        return None
    h_mul, s_o = h_muls[0]
    cell = _Cell(add, c_new, h_mul.output[0], c_old,
                 {"i": s_i.input[0], "f": s_f.input[0], "g": a_g.input[0], "o": s_o.input[0]})
    cell.acts = (a_g, act_c)
    return cell


def _check_acts(cell: _Cell, label: str):
    for node, what in zip(cell.acts, ("the cell candidate g", "the output activation of c")):
        if node.op_type != "Tanh":
            raise UnsupportedModelError(
                f"{label}: LSTM-like cell at node {cell.name!r}: {what} goes through "
                f"{node.op_type} node {node.name or node.output[0]!r}, expected Tanh; "
                "only sigmoid gates with tanh cells are recovered")


def _read_forms(gi: GraphIndex, walk: AffineWalk, pool: _Pool, cell: _Cell, label: str):
    """Read the weights of ``cell``: the affine forms of its four pre-activations."""
    where = f"{label}: LSTM cell at node {cell.name!r}"
    forms = {}
    for g in GATE_ORDER:
        a = affine(walk, cell.pre[g])
        if a is None or not a.terms:
            raise UnsupportedModelError(
                f"{where}: the pre-activation of gate {g} ({cell.pre[g]!r}) is not an affine "
                "function of non-constant tensors with a known feature size")
        forms[g] = a
    walk.memo.clear()  # forms are per cell; keeping every step's would hold T copies
    sizes = {g: forms[g].K for g in GATE_ORDER}
    if len(set(sizes.values())) != 1:
        raise UnsupportedModelError(f"{where}: the four gates have different sizes {sizes}")
    H = cell.H = sizes["i"]
    for g in GATE_ORDER:
        for s in forms[g].terms:
            if s not in cell.W:
                k = forms[g].terms[s].k_src
                cell.W[s] = np.concatenate(  # (4H, K_s)
                    [forms[q].terms[s].dense().T if s in forms[q].terms else np.zeros((H, k))
                     for q in GATE_ORDER], axis=0)
    cell.W = {s: pool.intern(w) for s, w in cell.W.items()}
    cell.b = pool.intern(np.concatenate([forms[g].bias for g in GATE_ORDER]))
    if cell.c_old in cell.W:
        raise UnsupportedModelError(
            f"{where}: a gate reads the old cell state {cell.c_old!r} (peepholes or a "
            "non-standard cell); only gates computed from x and h are supported")
    c_shape = gi.shapes.get(cell.c_old)
    if c_shape and c_shape[-1] is not None and c_shape[-1] != H:
        raise UnsupportedModelError(
            f"{where}: the old cell state {cell.c_old!r} has {c_shape[-1]} features, the gates {H}")


# ---------------------------------------------------------------------------------------------
# Chains of cells linked by their state
# ---------------------------------------------------------------------------------------------
def _chains(cells: List[_Cell], label: str) -> List[List[_Cell]]:
    by_cnew = {c.c_new: c for c in cells}
    succ: Dict[int, _Cell] = {}
    for c in cells:
        p = by_cnew.get(c.c_old)
        if p is None:
            continue
        if id(p) in succ:
            raise UnsupportedModelError(
                f"{label}: the cell state of node {p.name!r} feeds two cells ({succ[id(p)].name!r} "
                f"and {c.name!r}); one LSTM state cannot branch")
        succ[id(p)], c.pred = c, p
    chains, seen = [], set()
    for c in cells:
        if c.pred is not None:
            continue
        chain = [c]
        while id(chain[-1]) in succ:
            chain.append(succ[id(chain[-1])])
        seen.update(id(x) for x in chain)
        chains.append(chain)
    if len(seen) != len(cells):
        bad = next(c for c in cells if id(c) not in seen)
        raise FormatError(f"{label}: the cell states form a cycle through node {bad.name!r}")
    for chain in chains:
        for k in range(1, len(chain)):
            if chain[k - 1].h_new not in chain[k].sources():
                raise UnsupportedModelError(
                    f"{label}: LSTM cell at node {chain[k].name!r} continues the cell state of "
                    f"{chain[k - 1].name!r} but does not read its h ({chain[k - 1].h_new!r})")
    return chains


# ---------------------------------------------------------------------------------------------
# A lone cell
# ---------------------------------------------------------------------------------------------
#: Operators that only change a tensor's shape: a cell's state may pass through them on its way
#: from a graph input or to a graph output.
_SHAPE_ONLY = ("Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten")


def _graph_input_behind(gi: GraphIndex, name: str) -> Optional[str]:
    for _ in range(16):
        if name in gi.inputs:
            return name
        p = _producer(gi, name, _SHAPE_ONLY)
        if p is None:
            return None
        name = p.input[0]
    return None


def _graph_output_of(gi: GraphIndex, name: str) -> Optional[str]:
    outputs, frontier = set(gi.outputs), [name]
    for _ in range(16):
        hit = next((t for t in frontier if t in outputs), None)
        if hit is not None or not frontier:
            return hit
        frontier = [n.output[0] for t in frontier for n in gi.consumers.get(t, [])
                    if n.op_type in _SHAPE_ONLY and n.output and n.input[0] == t][:16]
    return None


def _how_made(gi: GraphIndex, name: str) -> str:
    p = gi.producers.get(name)
    return "undefined" if p is None else f"computed by {p[0].op_type} node {p[0].name or p[0].output[0]!r}"


def _lone_cell(gi: GraphIndex, cell: _Cell, label: str) -> Found:
    """A cell that is not repeated: a one-layer model whose stream state is its (h, c).

    Its state must come from graph inputs and go to graph outputs (through shape-only ops at
    most): that is what makes the graph a step function whose outputs are fed back."""
    where = f"{label}: LSTM cell at node {cell.name!r}"
    srcs, H = cell.sources(), cell.H
    if _const_value(gi, cell.c_old) is not None:
        raise UnsupportedModelError(
            f"{where}: it starts from a constant cell state and is not repeated; a single step "
            "from a fixed state is not a recurrent LSTM (its recurrent weights are unobservable)")
    if len(srcs) != 2:
        raise UnsupportedModelError(
            f"{where}: its gates read {len(srcs)} tensor(s) {srcs}; a cell reads exactly two, x and h")
    cands = [s for s in srcs if cell.k_src(s) == H and _graph_input_behind(gi, s) is not None]
    how = "h has H features"
    if not cands:
        raise UnsupportedModelError(
            f"{where}: neither of its inputs {srcs} is a graph input with H = {H} features, as its "
            f"h must be ({', '.join(_how_made(gi, s) for s in srcs)})")
    if len(cands) == 2:  # I == H and both graph inputs: the graph-input order x, h, c decides
        pos = {n: i for i, n in enumerate(gi.inputs)}
        cands = sorted(cands, key=lambda s: pos[_graph_input_behind(gi, s)])[1:]
        how = "I == H: x and h told apart by the graph-input order x, h, c"
    h = cands[0]
    x = next(s for s in srcs if s != h)
    h_in, c_in = _graph_input_behind(gi, h), _graph_input_behind(gi, cell.c_old)
    if c_in is None:
        raise UnsupportedModelError(
            f"{where}: its old cell state {cell.c_old!r} is {_how_made(gi, cell.c_old)}, not a graph "
            "input: the state of a cell must be read unchanged from the graph's inputs")
    h_out, c_out = _graph_output_of(gi, cell.h_new), _graph_output_of(gi, cell.c_new)
    for t, out, what in ((cell.h_new, h_out, "h"), (cell.c_new, c_out, "cell state")):
        if out is None:
            raise UnsupportedModelError(
                f"{where}: its new {what} {t!r} does not reach a graph output unchanged (used by "
                f"{sorted({n.op_type for n in gi.consumers.get(t, [])})}): the graph's outputs are "
                "not the state of an LSTM")
    I = cell.k_src(x)
    layer = LayerParams(w_ih=cell.weights(x).astype(np.float32), w_hh=cell.weights(h).astype(np.float32),
                        bias=cell.bias().astype(np.float32))
    self_check(gi, label, cell.name, [[layer]], steps=[[{"h_new": h_out, "c_new": c_out}]],
               x_groups=[[x]], state_inputs=[(h_in, c_in)], const_state=[(None, None)])
    loc = (f"main: x {x!r}, h {h_in!r}, c {c_in!r} -> h {h_out!r}, c {c_out!r}"
           + ("" if how.startswith("h has") else f" ({how})"))
    source = {"format": "onnx", "kind": "cell", "graph": "main", "nodes": [cell.name],
              "inputs": {"x": x, "h": h_in, "c": c_in}, "outputs": {"h": h_out, "c": c_out},
              "x_h_rule": how}
    cand = Candidate(cell.name, "cell", I, H, 1, 1, loc)

    def build(layer=layer, source=source):
        return [[LayerParams(layer.w_ih.copy(), layer.w_hh.copy(), layer.bias.copy())]], dict(
            clip=None, input_forget=False, initial_state=None, reverse=False, source=dict(source))

    return Found(cand, build)


# ---------------------------------------------------------------------------------------------
# Unrolled chains -> layers and directions
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Chain:
    cells: List[_Cell]
    Wh: np.ndarray  # (4H, H)
    bias: np.ndarray  # (4H,)
    roles: List[List[str]]  # roles[r][k]: the tensor playing input role r at step k
    Wr: List[np.ndarray]  # (4H, K_r) per role
    h0: object = None  # None (zeros) | (H,) constant | str (a tensor the caller provides)
    c0: object = None
    direction: Optional[str] = None  # "fwd" | "bwd"
    layer: Optional[int] = None
    feeds: List[Tuple[int, bool]] = field(default_factory=list)  # per role: (chain idx, same order)

    @property
    def T(self) -> int:
        return len(self.cells)

    @property
    def H(self) -> int:
        return self.cells[0].H

    @property
    def name(self) -> str:
        return self.cells[0].name


def _same(a, b) -> bool:
    return a is b or (a.shape == b.shape and np.array_equal(a, b))  # interned: equal is usually identical


def _chain_weights(gi: GraphIndex, chain: List[_Cell], label: str) -> _Chain:
    ref, T, H = chain[1], len(chain), chain[0].H
    Wh, bias = ref.weights(chain[0].h_new), ref.bias()
    role_src = [s for s in ref.sources() if s != chain[0].h_new]
    Wr = [ref.weights(s) for s in role_src]
    roles = [[None] * T for _ in role_src]
    h0 = c0 = None
    for k, cell in enumerate(chain):
        where = f"{label}: step {k} (node {cell.name!r}) of the unrolled LSTM starting at {chain[0].name!r}"
        if cell.H != H:
            raise UnsupportedModelError(f"{where}: hidden size {cell.H}, step 0 has {H}")
        left = [s for s in cell.sources() if k == 0 or s != chain[k - 1].h_new]
        if k > 0 and not _same(cell.weights(chain[k - 1].h_new), Wh):
            raise UnsupportedModelError(f"{where}: its recurrent weights differ from step 1's")
        for r, W in enumerate(Wr):
            s = next((s for s in left if _same(cell.weights(s), W)), None)
            if s is None:
                raise UnsupportedModelError(
                    f"{where}: no input has the input weights of step 1 (the weights are not shared)")
            roles[r][k] = s
            left.remove(s)
        if k == 0:
            if len(left) == 1 and _same(cell.weights(left[0]), Wh):
                h0 = left[0]  # the initial h is an input the caller provides
            elif left:
                raise UnsupportedModelError(f"{where}: it reads {left} beyond its inputs and h")
            delta = cell.bias() - bias  # (4H,): a constant initial h folded into the bias
            if isinstance(h0, str) and np.any(delta):
                raise UnsupportedModelError(f"{where}: its bias differs from step 1's")
            if h0 is None and np.any(delta):
                sol, *_ = np.linalg.lstsq(Wh, delta, rcond=None)  # delta = Wh @ h0
                if not np.allclose(Wh @ sol, delta, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(delta).max())):
                    raise UnsupportedModelError(
                        f"{where}: its bias differs from step 1's by more than a constant initial h explains")
                h0 = sol
            cv = _const_value(gi, cell.c_old)
            if cv is None:
                c0 = cell.c_old
            else:
                cv = np.asarray(cv, np.float64)
                rows = cv.reshape(-1, cv.shape[-1]) if cv.ndim else cv.reshape(1, 1)
                if rows.shape[-1] not in (1, H) or not np.all(rows == rows[:1]):
                    raise UnsupportedModelError(
                        f"{where}: its constant initial cell state {cell.c_old!r} differs between "
                        "batch rows; the model has one initial state")
                c0 = np.broadcast_to(rows[0], (H,)).copy() if np.any(rows) else None
        else:
            if left:
                raise UnsupportedModelError(f"{where}: it reads {left} beyond its inputs and h")
            if not _same(cell.bias(), bias):
                raise UnsupportedModelError(f"{where}: its bias differs from step 1's")
    return _Chain(chain, Wh, bias, roles, Wr, h0, c0)


def _time_index(gi: GraphIndex, name: str) -> Optional[Tuple[str, int]]:
    """(sequence tensor, t) when ``name`` is step t of a sequence taken along axis 0."""
    for _ in range(8):
        p = gi.producers.get(name)
        if p is None:
            return None
        node, k = p
        op = node.op_type
        if op in ("Identity", "Squeeze", "Reshape", "Flatten", "Unsqueeze"):
            name = node.input[0]
            continue
        shape = gi.shapes.get(node.input[0]) if node.input else None
        T = shape[0] if shape else None
        if op == "Gather" and int(attrs_of(node).get("axis", 0)) == 0 and len(node.input) == 2:
            idx = _const_value(gi, node.input[1])
            if idx is None or idx.size != 1 or T is None:
                return None
            t = int(idx.reshape(-1)[0])
            return (node.input[0], t + T if t < 0 else t)
        if op == "Split" and int(attrs_of(node).get("axis", 0)) == 0 and T == len(node.output):
            return (node.input[0], k)
        if op == "Slice" and len(node.input) >= 4 and T is not None:
            s, e, ax = (_const_value(gi, node.input[j]) for j in (1, 2, 3))
            st = _const_value(gi, node.input[4]) if len(node.input) > 4 and node.input[4] else None
            if s is None or e is None or ax is None or s.size != 1 or ax.reshape(-1)[0] != 0 \
                    or (st is not None and int(st.reshape(-1)[0]) != 1):
                return None
            t = int(s.reshape(-1)[0])
            t = t + T if t < 0 else t
            if min(int(e.reshape(-1)[0]), T) - t != 1:
                return None
            return (node.input[0], t)
        return None
    return None


def _assemble(gi: GraphIndex, chains: List[_Chain], label: str) -> List[Found]:
    """Group chains into (bi)directional stacks, one Found per stack."""
    h_pos = {}  # h_new tensor -> (chain idx, step)
    for ci, ch in enumerate(chains):
        for k, cell in enumerate(ch.cells):
            h_pos[cell.h_new] = (ci, k)
    # Roles fed by other chains, and the order relation of their steps.
    for ci, ch in enumerate(chains):
        where = f"{label}: unrolled LSTM starting at node {ch.name!r}"
        for r, srcs in enumerate(ch.roles):
            pos = [h_pos.get(s) for s in srcs]
            if all(p is None for p in pos):
                ch.feeds.append((-1, True))
                continue
            if any(p is None for p in pos) or len({p[0] for p in pos}) != 1:
                raise UnsupportedModelError(
                    f"{where}: its input {r} mixes outputs of another LSTM with other tensors")
            src = chains[pos[0][0]]
            ks = [p[1] for p in pos]
            if src.T != ch.T or ks not in (list(range(ch.T)), list(range(ch.T))[::-1]):
                raise UnsupportedModelError(
                    f"{where}: it consumes the outputs of {src.name!r} out of time order")
            ch.feeds.append((pos[0][0], ks == list(range(ch.T))))
    # Layer 0: chains reading external tensors only; their direction from the time indices.
    base_of = {}
    for ci, ch in enumerate(chains):
        if any(f[0] >= 0 for f in ch.feeds):
            continue
        where = f"{label}: unrolled LSTM starting at node {ch.name!r}"
        if len(ch.roles) != 1:
            raise UnsupportedModelError(f"{where}: its first layer reads {len(ch.roles)} input tensors per step; one is supported")
        ti = [_time_index(gi, s) for s in ch.roles[0]]
        ch.layer = 0
        if all(t is not None for t in ti) and len({t[0] for t in ti}) == 1:
            ts = [t[1] for t in ti]
            if ts == list(range(ch.T)):
                ch.direction = "fwd"
            elif ts == list(range(ch.T))[::-1] and ch.T > 1:
                ch.direction = "bwd"
            else:
                raise UnsupportedModelError(f"{where}: its steps read the sequence {ti[0][0]!r} at times {ts}")
            base_of[ci] = ti[0][0]
        else:
            ch.direction = "fwd"  # the step inputs in step order are the sequence
            base_of[ci] = None
    # Upper layers, in dependency order (bounded: each pass assigns at least one chain).
    pending = [ci for ci, ch in enumerate(chains) if ch.layer is None]
    while pending:
        progress = False
        for ci in list(pending):
            ch = chains[ci]
            srcs = [chains[f[0]] for f in ch.feeds]
            if any(s.layer is None for s in srcs):
                continue
            # time of step k of ch: each role's source step time must agree
            times = set()
            for (fi, same), s in zip(ch.feeds, srcs):
                times.add((s.direction == "fwd") == same)
            if len(times) != 1:
                raise UnsupportedModelError(
                    f"{label}: unrolled LSTM starting at node {ch.name!r} reads its inputs at different times")
            ch.direction = "fwd" if times.pop() else "bwd"
            ch.layer = 1 + max(s.layer for s in srcs)
            pending.remove(ci)
            progress = True
        if not progress:
            raise UnsupportedModelError(
                f"{label}: unrolled LSTM starting at node {chains[pending[0]].name!r} consumes "
                "outputs that form no layer order")
    # Stacks: connected components through feeds.
    parent = list(range(len(chains)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_layer = {}  # first-layer chains reading one sequence are the directions of one layer
    for ci, ch in enumerate(chains):
        for fi, _ in ch.feeds:
            if fi >= 0:
                parent[root(ci)] = root(fi)
        if ch.layer == 0:
            key = base_of[ci] if base_of[ci] is not None else frozenset(ch.roles[0])
            parent[root(ci)] = root(first_layer.setdefault(key, ci))
    comps: Dict[int, List[int]] = {}
    for ci in range(len(chains)):
        comps.setdefault(root(ci), []).append(ci)
    return [_stack(gi, [chains[i] for i in comp], chains, base_of, label) for comp in comps.values()]


def _stack(gi, members: List[_Chain], chains: List[_Chain], base_of, label) -> Found:
    first = min(members, key=lambda c: (c.layer, c.direction != "fwd"))
    where = f"{label}: unrolled LSTM starting at node {first.name!r}"
    L = 1 + max(c.layer for c in members)
    grid = [[c for c in members if c.layer == l] for l in range(L)]
    D = len(grid[0])
    if D == 2 and any(base_of.get(chains.index(c)) is None for c in grid[0]):
        # Without time indices (Gather / Slice / Split of one sequence) nothing says which of
        # two chains reading the same step tensors runs forward in time.
        raise UnsupportedModelError(
            f"{where}: cannot tell which of its two directions runs forward in time (the step "
            "inputs are not indexed slices of one sequence)")
    T, H = first.T, first.H
    for l, row in enumerate(grid):
        dirs = sorted(c.direction for c in row)
        if len(row) != D or dirs != sorted(c.direction for c in grid[0]) or dirs not in (["fwd"], ["bwd", "fwd"], ["bwd"]):
            raise UnsupportedModelError(
                f"{where}: layer {l} has directions {dirs}; expected the same one or two directions in every layer")
        row.sort(key=lambda c: c.direction != "fwd")
        for c in row:
            if c.T != T or c.H != H:
                raise UnsupportedModelError(f"{where}: its chains differ in length or hidden size")
            if l > 0:
                feeders = [chains[fi] for fi, _ in c.feeds]
                if sorted(map(id, feeders)) != sorted(map(id, grid[l - 1])) or len(feeders) != D:
                    raise UnsupportedModelError(
                        f"{where}: layer {l} does not read exactly the outputs of layer {l - 1}")
    reverse = D == 1 and first.direction == "bwd"
    layers = []
    for l, row in enumerate(grid):
        lrow = []
        for c in row:
            if l == 0:
                w_ih = c.Wr[0]
            else:  # roles ordered as the layer below: forward's h first, then backward's
                order = sorted(range(len(c.roles)), key=lambda r: chains[c.feeds[r][0]].direction != "fwd")
                w_ih = np.concatenate([c.Wr[r] for r in order], axis=1)
            lrow.append(LayerParams(w_ih=w_ih.astype(np.float32), w_hh=c.Wh.astype(np.float32),
                                    bias=c.bias.astype(np.float32)))
        layers.append(lrow)
    flat = [c for row in grid for c in row]
    fwd0 = grid[0][0]
    # Step inputs in time order (time t of the sequence): the forward chain's step t.
    x_seq = fwd0.roles[0] if fwd0.direction == "fwd" else fwd0.roles[0][::-1]
    x_groups = [[x_seq[t]] for t in range(T)]
    if D == 2:
        other = grid[0][1].roles[0][::-1]
        for t in range(T):
            if other[t] != x_seq[t]:
                x_groups[t].append(other[t])
    const_state, state_inputs = [], []
    for c in flat:
        h0 = c.h0 if not isinstance(c.h0, str) else None
        c0 = c.c0 if not isinstance(c.c0, str) else None
        const_state.append((h0, c0))
        state_inputs.append((c.h0 if isinstance(c.h0, str) else None, c.c0 if isinstance(c.c0, str) else None))
    steps = [[{"h_new": cell.h_new, "c_new": cell.c_new} for cell in c.cells] for c in flat]
    self_check(gi, label, first.name, layers, steps=steps, x_groups=x_groups,
               state_inputs=state_inputs, const_state=const_state, reverse=reverse,
               directions=[c.direction for c in flat])
    initial_state = None
    if any(h is not None or cc is not None for h, cc in const_state):
        h0 = np.zeros((L * D, H))
        c0 = np.zeros((L * D, H))
        for j, (h, cc) in enumerate(const_state):
            if h is not None:
                h0[j] = h
            if cc is not None:
                c0[j] = cc
        initial_state = (h0, c0)
    base = base_of.get(chains.index(fwd0))
    top = grid[-1]
    outputs = {"h_per_step": [[cell.h_new for cell in (c.cells if c.direction == "fwd" else c.cells[::-1])]
                              for c in top],
               "final_h": [c.cells[-1].h_new for c in flat], "final_c": [c.cells[-1].c_new for c in flat]}
    inputs = {"X": base if base is not None else list(x_seq),
              "initial_h": [c.h0 if isinstance(c.h0, str) else None for c in flat],
              "initial_c": [c.c0 if isinstance(c.c0, str) else None for c in flat]}
    x_desc = (f"X {base!r} along axis 0" if base is not None
              else f"X = the step tensors {x_seq[0]!r} .. {x_seq[-1]!r}")
    loc = (f"main: {T} steps, {x_desc}; {L} layer(s) x {D} direction(s)"
           + (" (reverse)" if reverse else "") + f"; final h {outputs['final_h'][-1]!r}, "
           f"final c {outputs['final_c'][-1]!r}")
    source = {"format": "onnx", "kind": "unrolled", "graph": "main", "steps": T,
              "nodes": [cell.name for c in flat for cell in c.cells], "inputs": inputs, "outputs": outputs}
    I = layers[0][0].input_size
    cand = Candidate(first.name, "unrolled", I, H, L, D, loc)

    def build(layers=layers, initial_state=initial_state, source=source, reverse=reverse):
        out = [[LayerParams(p.w_ih.copy(), p.w_hh.copy(), p.bias.copy()) for p in row] for row in layers]
        init = None if initial_state is None else (initial_state[0].copy(), initial_state[1].copy())
        return out, dict(clip=None, input_forget=False, initial_state=init, reverse=reverse,
                         source=dict(source))

    return Found(cand, build)


# ---------------------------------------------------------------------------------------------
# The finder
# ---------------------------------------------------------------------------------------------
def find_cells(model, folder, label) -> List[Found]:
    """Every decomposed LSTM cell (kind ``"cell"``) and unrolled LSTM (kind ``"unrolled"``) in
    the main graph of ``model``, each verified against a float64 LSTM of its recovered weights.

    ``folder``: where external data may be read from (None: nowhere); ``label``: how errors
    name the file. Raises :class:`UnsupportedModelError` for a graph that has the skeleton of an
    LSTM cell but cannot be proven to compute one, :class:`FormatError` for a malformed graph.
    """
    try:
        return _find_cells(model, folder, label)
    except LSTMError:
        raise
    except RecursionError:
        raise FormatError(f"{label}: the graph nests too deeply to be searched for LSTM cells") from None
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, UnicodeError, OverflowError,
            ZeroDivisionError) as exc:  # a malformed proto field: the file's fault
        raise FormatError(f"{label}: malformed ONNX graph: {type(exc).__name__}: {exc}") from exc


def _find_cells(model, folder, label) -> List[Found]:
    if not any(n.op_type == "Sigmoid" for n in model.graph.node):
        return []
    gi = GraphIndex(model, folder, label)
    cells = []
    for node in gi.nodes:
        if node.op_type in _ACTS and node.domain in ("", "ai.onnx"):
            cell = _skeleton(gi, node)
            if cell is not None:
                _check_acts(cell, label)
                cells.append(cell)
    if not cells:
        return []
    walk, pool = AffineWalk(gi), _Pool()
    for cell in cells:
        _read_forms(gi, walk, pool, cell, label)
    chains = _chains(cells, label)
    found = [_lone_cell(gi, ch[0], label) for ch in chains if len(ch) == 1]
    long = [_chain_weights(gi, ch, label) for ch in chains if len(ch) > 1]
    if long:
        found.extend(_assemble(gi, long, label))
    return found


__all__ = ["find_cells"]
