"""LSTM cells written in primitive ONNX operators -> the canonical LSTM (issue 10, items 4 and 5).

There is no ``LSTM`` node: ``torch.onnx.export`` writes ``nn.LSTMCell`` (and any hand-written
cell) as MatMul / Gemm, Add, Split / Slice, Sigmoid, Tanh, Mul and Add. A Python loop over such a
cell with a fixed length becomes the same cell repeated, step after step.

How a cell is recognised (structure only: names and the order of Split outputs are never used)
-------------------------------------------------------------------------------------------
The skeleton, anchored at the activation of the new cell state::

    c_new = Add( Mul(Sigmoid(a_f), c_old),  Mul(Sigmoid(a_i), Tanh(a_g)) )
    h_new = Mul( Sigmoid(a_o), Tanh(c_new) )

* the gate whose sigmoid multiplies the old ``c`` is **f**;
* the pre-activation that goes through ``tanh`` and multiplies a sigmoid gate is **g**, and that
  sigmoid gate is **i**;
* the sigmoid that multiplies ``tanh(c_new)`` is **o**.

The two tanh positions accept any unary activation while matching, so that a cell with, say,
Relu there is refused with a reason rather than silently not found.

Each pre-activation ``a_*`` is then read as an exact affine function of the tensors it is computed
from (:mod:`importers.onnx_cells_affine`): whatever MatMul / Gemm / Concat / Split / Slice / bias
Adds the exporter wrote, the result is ``a = sum_s s @ M_s + b``, and ``M_s`` are the weights.

* **cell** (kind ``"cell"``): a lone cell; its sources are ``x`` and ``h`` (``h`` has H features;
  if ``I == H`` too, the graph-input order x, h, c decides, as ``torch`` writes it). Its ``h`` and
  ``c`` must be graph inputs and its new ``h`` and ``c`` graph outputs (through shape-only ops at
  most): that is what makes the graph a step function to stream. The result is a one-layer
  model whose stream state is the cell's ``(h, c)``.
* **unrolled** (kind ``"unrolled"``): cells linked by their state (the ``c_old`` of one is the
  ``c_new`` of another, and the previous ``h_new`` is among its sources) form a *chain* of T
  steps, which must share their weights exactly. Chains consuming the same input sequence in
  opposite orders are the two directions of a layer; chains consuming the ``h`` of other chains
  (concatenated forward then backward) are the layers above. The first step may start from a
  constant state (folded into its bias by the exporter: recovered, and checked), from zeros
  shaped at run time (a dynamic batch: ``ConstantOfShape``), or from graph inputs (then the
  caller passes the state to ``model.run``; ``source["inputs"]`` says which rows, ``"h0[1]"``).

Every candidate is verified before it is returned (:mod:`importers.onnx_cells_check`): the
matched subgraph is evaluated (onnxruntime, else onnx's ``ReferenceEvaluator``) on random inputs
and states, and every step is compared with a float64 step of the recovered weights. A graph that has the
skeleton but is not an LSTM the engine can run (a state that passes through other operators, a
gate depending on anything but x and h, weights that change between steps, a mismatch in the
check) is refused with :class:`UnsupportedModelError` naming the node and the reason.

Not recovered (refused or not found): peepholes, clipped gates, activations other than sigmoid /
tanh, cells inside ``If`` / ``Loop`` / ``Scan`` bodies (only the main graph is searched). A
projection of ``h`` between unrolled steps is not recognised as one: being linear, it is folded
into the weights that read it, and the model's outputs are the unprojected ``h`` tensors that
``source["outputs"]`` names. Work is linear in the graph size and bounded: graphs larger than
:data:`~importers.onnx_cells_graph.MAX_NODES` nodes are refused, the weight walk is capped in
depth and in total visits. Modules: this one (skeleton, lone
cells, the finder), :mod:`~importers.onnx_cells_graph` (index, shapes, constants),
:mod:`~importers.onnx_cells_affine` (weights), :mod:`~importers.onnx_cells_unrolled` (chains ->
layers), :mod:`~importers.onnx_cells_check` (the self-check).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from lstm_cpu.candidates import Candidate
from lstm_cpu.errors import FormatError, LSTMError, UnsupportedModelError
from lstm_cpu.spec import GATE_ORDER, LayerParams

from .onnx_cells_affine import AffineWalk, affine
from .onnx_cells_check import self_check
from .onnx_cells_graph import GraphIndex, _const_value
from .onnx_cells_unrolled import _assemble, _chain_weights
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
    gi.prepare()
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
