"""The ONNX ``LSTM`` operator: one node's attributes and inputs -> canonical :class:`LayerParams`.

What is read
------------
The ONNX ``LSTM`` operator, versions 1, 7, 14 and 22 (the node's version is the newest one not
newer than the model's default-domain opset), with every attribute under its spec name:
``hidden_size``, ``direction``, ``activations``, ``activation_alpha``, ``activation_beta``,
``clip``, ``input_forget``, ``layout``. Inputs (ONNX shapes, D = num_directions)::

    X              (T, N, I)       layout 0; (N, T, I) with layout 1
    W              (D, 4H, I)      gate blocks i, o, f, c
    R              (D, 4H, H)      gate blocks i, o, f, c
    B              (D, 8H)         [Wb | Rb], each i, o, f, c; folded into one (4H,) bias
    sequence_lens  (N,)            graph input -> the caller passes ``lengths`` to ``model.run``;
                                   a constant only if every entry is X's static T (a no-op)
    initial_h/_c   (D, N, H)       layout 0; (N, D, H) with layout 1
    P              (D, 3H)         peepholes i, o, f

Gate blocks are permuted with :func:`lstm_cpu.spec.reorder_gates` (``"iofc"``) and peepholes
(i, o, f) with :func:`lstm_cpu.spec.reorder_peepholes` (``"iof"``): the only place the ONNX order
is mapped.

Where the weights may live: initializers, ``Constant`` nodes and external data, in this graph or
an enclosing one (:mod:`.onnx_tensors`), or any operators computing only from those, evaluated at
load time (:mod:`.onnx_fold`). Weights computed at run time (from a graph input) raise
:class:`UnsupportedModelError` naming the node and the input. float16 / bfloat16 / float64 weights are converted; integer / bool weights are
refused.

Semantics: onnxruntime's (checked against onnxruntime 1.32, see ``tests/test_onnx_import.py``)
------------------------------------------------------------------------------------------------
* ``activation_alpha`` / ``activation_beta`` are consumed in order, each list by the activations
  that take that parameter (alpha: Affine, LeakyRelu, ThresholdedRelu, ScaledTanh, HardSigmoid,
  Elu; beta: Affine, ScaledTanh, HardSigmoid), across both directions (f, g, h forward, then
  f, g, h reverse). When a list runs out, onnxruntime's default applies: LeakyRelu alpha 0.01,
  HardSigmoid 0.2 / 0.5, Elu 1.0, and **0.0** for Affine, ThresholdedRelu and ScaledTanh (not the
  ONNX operators' defaults); :data:`ORT_ACTIVATION_DEFAULTS`. Extra values are ignored.
* ``clip`` bounds the pre-activations of i, f, c and o (after the peephole terms are added); the
  cell state itself is not clipped. This matches :mod:`lstm_cpu.spec`.
* ``input_forget=1``: onnxruntime computes ``i`` normally and sets ``f = 1 - i``; so does
  :mod:`lstm_cpu.spec`. The importer passes ``input_forget`` through unchanged.

Initial state
-------------
A constant ``initial_h`` / ``initial_c`` (initializer, ``Constant``, or computed from those) becomes
``LSTMModel(initial_state=...)``. ONNX states carry a batch axis, our model's does not: a constant
state is accepted when its batch size is 1 or when every batch row is identical (it is broadcast,
e.g. the zeros the dynamo exporter bakes in), else :class:`UnsupportedModelError`. All-zero
constants give ``initial_state=None``. A state computed at run time (a graph input, a ``Slice`` of
one as torch writes for ``lstm(x, (h0, c0))``, or any other node) is left to the caller
(``model.run(x, state)``) and recorded in ``model.info()["source"]["inputs"]``.

A lone ``direction="reverse"`` node (one backwards direction) has no LSTMModel equivalent (a
one-direction model runs forwards): :func:`onnx_to_params` reads it (``options["reverse"]``) and
:func:`load_onnx` raises :class:`UnsupportedModelError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from lstm_cpu.errors import FormatError, UnsupportedModelError
from lstm_cpu.spec import ACTIVATIONS, Activation, LayerParams, reorder_gates, reorder_peepholes

from .limits import MAX_DIM, check_dims
from .onnx_graph import Graph, node_label, op_version
from .onnx_tensors import (Const, RuntimeValue, dtype_name, graph_input_behind, known_zero, read_const,
                           resolve_const)

#: ONNX stores the gate blocks of W, R and B as (input, output, forget, cell candidate).
ONNX_GATE_ORDER = "iofc"
#: ONNX stores the peepholes of P as (input, output, forget).
ONNX_PEEPHOLE_ORDER = "iof"
#: LSTM operator versions this importer understands.
SUPPORTED_VERSIONS = (1, 7, 14, 22)

#: onnxruntime's value for an activation parameter missing from activation_alpha/beta:
#: name -> (alpha, beta); None = the function takes no such parameter. Source: onnxruntime
#: core/providers/cpu/rnn/rnn_helpers.cc (NameToArgUsageMap / NameToArgDefaultsMap), confirmed
#: empirically by tests/test_onnx_import.py::test_missing_alpha_beta_follow_onnxruntime.
ORT_ACTIVATION_DEFAULTS = {
    "Sigmoid": (None, None),
    "Tanh": (None, None),
    "Relu": (None, None),
    "Softsign": (None, None),
    "Softplus": (None, None),
    "LeakyRelu": (0.01, None),
    "ThresholdedRelu": (0.0, None),
    "Elu": (1.0, None),
    "Affine": (0.0, 0.0),
    "ScaledTanh": (0.0, 0.0),
    "HardSigmoid": (0.2, 0.5),
}
_ACT_LOWER = {k.lower(): k for k in ACTIVATIONS}

# LSTM input positions (ONNX spec).
_X, _W, _R, _B, _SEQ, _H0, _C0, _P = range(8)
_INPUT_NAMES = ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P")

_ATTR_TYPES = {  # attribute -> AttributeProto type name expected
    "hidden_size": "INT",
    "direction": "STRING",
    "activations": "STRINGS",
    "activation_alpha": "FLOATS",
    "activation_beta": "FLOATS",
    "clip": "FLOAT",
    "input_forget": "INT",
    "layout": "INT",
    "output_sequence": "INT",  # LSTM-1 only; Y is always computed here
}


def is_lstm(node) -> bool:
    return node.op_type == "LSTM" and node.domain in ("", "ai.onnx")


def lstm_version(opset: int, label) -> int:
    """The LSTM operator version a model of default-domain ``opset`` uses."""
    v = op_version("LSTM", opset, label) or max(v for v in SUPPORTED_VERSIONS if v <= opset)
    if v not in SUPPORTED_VERSIONS:
        raise UnsupportedModelError(
            f"{label}: opset {opset} uses LSTM-{v}; supported versions are {SUPPORTED_VERSIONS}")
    return v


# ---------------------------------------------------------------------------------------------
# Attributes: one function per ONNX attribute, names verbatim
# ---------------------------------------------------------------------------------------------
def _attributes(node, where: str) -> dict:
    from onnx import AttributeProto, helper

    out = {}
    for a in node.attribute:
        if a.name not in _ATTR_TYPES:
            raise UnsupportedModelError(f"{where}: unknown LSTM attribute {a.name!r}")
        want = _ATTR_TYPES[a.name]
        if a.ref_attr_name:
            raise UnsupportedModelError(f"{where}: attribute {a.name!r} refers to a function attribute")
        if AttributeProto.AttributeType.Name(a.type) != want:
            raise FormatError(
                f"{where}: attribute {a.name!r} must be of type {want}, "
                f"got {AttributeProto.AttributeType.Name(a.type)}")
        v = helper.get_attribute_value(a)
        if want == "STRING":
            v = v.decode("utf-8", "replace")
        elif want == "STRINGS":
            v = [s.decode("utf-8", "replace") for s in v]
        elif want == "FLOATS":
            v = [float(x) for x in v]
        out[a.name] = v
    return out


def hidden_size(attrs, where, R: Const) -> int:
    """``hidden_size``; when absent, read from R's last dim (ONNX makes the attribute optional)."""
    H = attrs.get("hidden_size")
    if H is None:
        if len(R.dims) != 3:
            raise FormatError(f"{where}: R must have shape (D, 4H, H), got {list(R.dims)}")
        H = R.dims[2]
    if H <= 0 or H > MAX_DIM:
        raise FormatError(f"{where}: attribute hidden_size={H} is outside [1, {MAX_DIM}]")
    return int(H)


def direction(attrs, where) -> Tuple[str, int]:
    """``direction`` -> (value, num_directions)."""
    d = attrs.get("direction", "forward")
    n = {"forward": 1, "reverse": 1, "bidirectional": 2}.get(d)
    if n is None:
        raise FormatError(
            f"{where}: attribute direction={d!r}; expected 'forward', 'reverse' or 'bidirectional'")
    return d, n


def activations(attrs, where, D: int):
    """``activations`` + ``activation_alpha`` / ``activation_beta`` -> per direction (f, g, h).

    onnxruntime's rule: each list is consumed in order by the activations that take that
    parameter; a missing value takes :data:`ORT_ACTIVATION_DEFAULTS`.
    """
    names = attrs.get("activations")
    if names is None:
        names = ["Sigmoid", "Tanh", "Tanh"] * D
    if len(names) != 3 * D:
        raise FormatError(
            f"{where}: attribute activations lists {len(names)} functions; expected {3 * D} "
            f"(f, g, h for each of {D} direction{'s' if D > 1 else ''})")
    alphas = list(attrs.get("activation_alpha", []))
    betas = list(attrs.get("activation_beta", []))
    out = []
    for name in names:
        canon = _ACT_LOWER.get(name.lower())
        if canon is None:
            raise UnsupportedModelError(
                f"{where}: attribute activations has value {name!r}; supported: {sorted(ACTIVATIONS)}")
        da, db = ORT_ACTIVATION_DEFAULTS[canon]
        alpha = beta = float("nan")  # NaN: the function takes no such parameter
        if da is not None:
            alpha = alphas.pop(0) if alphas else da
        if db is not None:
            beta = betas.pop(0) if betas else db
        out.append(Activation(canon, alpha, beta))
    return [tuple(out[3 * d : 3 * d + 3]) for d in range(D)]


def clip(attrs, where) -> Optional[float]:
    c = attrs.get("clip")
    if c is None:
        return None
    if not (math.isfinite(c) and c > 0):
        raise FormatError(f"{where}: attribute clip={c}; expected a finite number > 0")
    return float(c)


def input_forget(attrs, where) -> bool:
    v = attrs.get("input_forget", 0)
    if v not in (0, 1):
        raise FormatError(f"{where}: attribute input_forget={v}; expected 0 or 1")
    return bool(v)


def layout(attrs, where, version: int) -> int:
    v = attrs.get("layout", 0)
    if "layout" in attrs and version < 14:
        raise FormatError(f"{where}: attribute layout exists from LSTM-14 on, this node is LSTM-{version}")
    if v not in (0, 1):
        raise FormatError(f"{where}: attribute layout={v}; expected 0 (time-major) or 1 (batch-major)")
    return int(v)


# ---------------------------------------------------------------------------------------------
# One node -> canonical parameters
# ---------------------------------------------------------------------------------------------
@dataclass
class NodeInfo:
    node: object
    graph: Graph
    name: str  # display name
    version: int
    H: int
    I: int
    direction: str
    D: int
    layout: int
    clip: Optional[float]
    input_forget: bool
    params: List[LayerParams]  # per direction, canonical
    h0: Optional[np.ndarray]  # (D, H) constant initial state or None
    c0: Optional[np.ndarray]
    inputs: dict  # provenance of X / sequence_lens / initial_h / initial_c
    seq_const: Optional[np.ndarray] = None  # (B,) a constant sequence_lens, checked against T later

    def describe(self) -> str:
        return (f"{self.name!r} (hidden_size={self.H}, direction={self.direction}, "
                f"input_size={self.I}, graph {self.graph.path})")


def _input(node, k) -> str:
    return node.input[k] if len(node.input) > k else ""


def _weight(g, node, k, where, fold) -> Optional[Const]:
    """The constant behind input k (W, R, B or P) of ``node``, or None when the input is absent."""
    name = _input(node, k)
    if not name:
        return None
    what = f"{where}: input {_INPUT_NAMES[k]} ({name!r})"
    try:
        return resolve_const(g, name, what, fold=fold)
    except RuntimeValue as rt:
        raise UnsupportedModelError(
            f"{what} is {rt.how}; lstm-cpu needs constant weights (initializers, Constant nodes or "
            "external data, or any operators computing only from those)") from None


def _expect_dims(c: Optional[Const], shape, where, tensor):
    if c is not None and c.dims != tuple(shape):
        raise FormatError(f"{where}: tensor {tensor} has shape {list(c.dims)}, expected {list(shape)}")


def _check_declared_x(g: Graph, node, where, I):
    """X declared by the graph with a static input size (its last dim, whatever the layout) that W
    contradicts -> FormatError."""
    x = node.input[0]
    for vi in list(g.proto.input) + list(g.proto.value_info):
        if vi.name != x or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 3 and dims[2].HasField("dim_value") and dims[2].dim_value not in (0, I):
            raise FormatError(
                f"{where}: X ({x!r}) is declared with input size {dims[2].dim_value}, "
                f"tensor W expects {I} (W shape (D, 4H, I))")
        return


def _state_source(g, name, what, D, H, lay, fold):
    """initial_h / initial_c input -> (constant (D, H) or None, provenance dict)."""
    if not name:
        return None, None
    try:
        c = resolve_const(g, name, what, fold=fold)
    except RuntimeValue as rt:
        zero = known_zero(g, name)
        if zero:
            return None, {"name": name, "zeros": zero}
        src = graph_input_behind(g, name)
        info = {"name": name, "from": rt.source}
        if src:
            info["graph_input"] = src
        return None, info
    dims = c.dims
    if len(dims) != 3:
        raise FormatError(f"{what}: expected a 3-D state, got shape {list(dims)}")
    Dd, N, Hh = (dims[0], dims[1], dims[2]) if lay == 0 else (dims[1], dims[0], dims[2])
    shape_txt = "(D, N, H)" if lay == 0 else "(N, D, H)"
    if Dd != D or Hh != H:
        raise FormatError(f"{what}: shape {list(dims)} does not match {shape_txt} with D={D}, H={H}")
    arr = read_const(c, fold.folder)
    arr = arr if lay == 0 else np.transpose(arr, (1, 0, 2))  # (D, N, H)
    if N == 0:
        raise FormatError(f"{what}: constant state has batch size 0")
    if N > 1 and not np.all(arr == arr[:, :1, :]):
        raise UnsupportedModelError(
            f"{what}: constant initial state has batch size {N} with different rows; lstm-cpu models "
            "carry one initial state for every sequence (batch 1, or identical rows)")
    h = arr[:, 0, :]  # (D, H)
    return h, {"name": name, "constant": True, "batch": N, "zeros": not np.any(h)}


def parse_node(g: Graph, node, version: int, fold, label) -> NodeInfo:
    """One LSTM node of graph ``g`` -> NodeInfo; ``fold`` (an :class:`.onnx_fold.Folder`) evaluates
    weights computed from constants and reads external data from the model's folder only."""
    folder = fold.folder
    where = f"{label}: LSTM node {node_label(node)}"
    if len(node.input) < 3 or not node.input[0] or not node.input[1] or not node.input[2]:
        raise FormatError(f"{where}: needs inputs X, W and R, got {list(node.input)}")
    if len(node.input) > 8:
        raise FormatError(f"{where}: has {len(node.input)} inputs; the LSTM operator takes at most 8")
    attrs = _attributes(node, where)
    W, R = _weight(g, node, _W, where, fold), _weight(g, node, _R, where, fold)
    B, P = _weight(g, node, _B, where, fold), _weight(g, node, _P, where, fold)
    H = hidden_size(attrs, where, R)
    dirn, D = direction(attrs, where)
    if len(W.dims) != 3:
        raise FormatError(f"{where}: tensor W has shape {list(W.dims)}, expected (D, 4H, I) = [{D}, {4 * H}, I]")
    check_dims(W.dims, f"{where}: tensor W")
    I = W.dims[2]
    if W.dims[:2] != (D, 4 * H) or I <= 0:
        raise FormatError(
            f"{where}: tensor W has shape {list(W.dims)}, expected [{D}, {4 * H}, I] "
            f"(num_directions={D}, 4*hidden_size={4 * H}, I > 0)")
    _expect_dims(R, (D, 4 * H, H), where, "R")
    _expect_dims(B, (D, 8 * H), where, "B")
    _expect_dims(P, (D, 3 * H), where, "P")
    _check_declared_x(g, node, where, I)
    acts = activations(attrs, where, D)
    cl = clip(attrs, where)
    coupled = input_forget(attrs, where)
    lay = layout(attrs, where, version)

    w, r = read_const(W, folder), read_const(R, folder)
    b = None if B is None else read_const(B, folder)
    p = None if P is None else read_const(P, folder)
    params = []
    for d in range(D):
        bias = None if b is None else reorder_gates(b[d, : 4 * H] + b[d, 4 * H :], ONNX_GATE_ORDER)
        params.append(LayerParams(
            w_ih=reorder_gates(w[d], ONNX_GATE_ORDER),  # (4H, I)
            w_hh=reorder_gates(r[d], ONNX_GATE_ORDER),  # (4H, H)
            bias=bias,  # (4H,) Wb + Rb
            peephole=None if p is None else reorder_peepholes(p[d], ONNX_PEEPHOLE_ORDER),  # (3H,) i, f, o
            activations=acts[d],
        ))
    h0, h_info = _state_source(g, _input(node, _H0), f"{where}: input initial_h", D, H, lay, fold)
    c0, c_info = _state_source(g, _input(node, _C0), f"{where}: input initial_c", D, H, lay, fold)
    seq = _input(node, _SEQ)
    inputs = {"X": _input(node, _X), "sequence_lens": seq or None,
              "initial_h": h_info, "initial_c": c_info}
    seq_const = None
    if seq:
        what = f"{where}: input sequence_lens ({seq!r})"
        try:
            seq_const = constant_lengths(resolve_const(g, seq, what, fold=fold), what)
        except RuntimeValue:
            pass  # the usual case: lengths given at run time, model.run(x, lengths=...)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"{what} is a constant lstm-cpu cannot use: {exc}") from None
        if seq_const is not None:
            inputs["sequence_lens"] = None  # accepted only as a no-op, see check_constant_lengths
    name = node.name or f"<unnamed LSTM -> {node.output[0] if node.output else '?'}>"
    return NodeInfo(node, g, name, version, H, I, dirn, D, lay, cl, coupled, params, h0, c0, inputs,
                     seq_const)


def constant_lengths(c: Const, what) -> np.ndarray:
    """The values (B,) int64 of a constant sequence_lens, after checking type and shape."""
    from onnx import TensorProto as TP
    from onnx import numpy_helper

    t = c.tensor
    dims = c.dims
    if c.array is not None:  # evaluated from constants
        if c.array.dtype.kind not in "iu" or c.casts:
            raise UnsupportedModelError(
                f"{what}: a constant of type {c.array.dtype.name}; ONNX sequence_lens is int32")
        if len(dims) != 1:
            raise FormatError(f"{what}: a constant of shape {list(dims)}; sequence_lens is (batch_size,)")
        return c.array.astype(np.int64)
    if t.data_type not in (TP.INT32, TP.INT64) or c.casts:
        raise UnsupportedModelError(
            f"{what}: a constant of type {dtype_name(t.data_type)}; ONNX sequence_lens is int32")
    if len(dims) != 1:
        raise FormatError(f"{what}: a constant of shape {list(dims)}; sequence_lens is (batch_size,)")
    check_dims(dims, what)
    if t.data_location == TP.EXTERNAL:
        raise UnsupportedModelError(f"{what}: a constant stored as external data")
    arr = numpy_helper.to_array(t)
    if arr.shape != tuple(dims):
        raise FormatError(f"{what}: holds {arr.size} values for shape {list(dims)}")
    return arr.astype(np.int64)


def is_batch_first_transpose(g: Graph, name: str) -> bool:
    """True when X is ``Transpose(perm=[1, 0, 2])`` of something (torch's batch_first=True)."""
    if name not in g.producers:
        return False
    node, _ = g.producers[name]
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return node.op_type == "Transpose" and perm == [1, 0, 2]


__all__ = ["ONNX_GATE_ORDER", "ONNX_PEEPHOLE_ORDER", "SUPPORTED_VERSIONS", "ORT_ACTIVATION_DEFAULTS", "NodeInfo",
           "parse_node", "constant_lengths", "is_lstm", "lstm_version", "is_batch_first_transpose",
           "hidden_size", "direction", "activations", "clip", "input_forget", "layout"]
