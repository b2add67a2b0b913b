"""onnxruntime's ``com.microsoft`` ``DynamicQuantizeLSTM`` nodes -> canonical int8 weights + scales.

What ``onnxruntime.quantization.quantize_dynamic`` writes for an ONNX ``LSTM`` (contrib op
schema, onnxruntime 1.32, read from ``get_all_operator_schema()``)::

    X              (T, N, I)       float
    W              (D, I, 4H)      int8 | uint8   transposed (rows = inputs), gate columns i, o, f, c
    R              (D, H, 4H)      int8 | uint8   same for the recurrent weights
    B              (D, 8H)         float          [Wb | Rb], each i, o, f, c; folded into one bias
    sequence_lens, initial_h, initial_c, P        as for ONNX LSTM
    W_scale        (D,) | (D, 4H)  float          per tensor, or per output channel (per column)
    W_zero_point   same shape      same type as W
    R_scale, R_zero_point          same for R

and ``real = scale * (stored - zero_point)``. Attributes are the LSTM ones except ``layout``
(always time-major). The weights are turned into the canonical form exactly (no re-rounding):
``w_ih = stored - zero_point`` as int8 in the canonical gate order (i, f, g, o), and one scale
per gate row for the input rows and one for the recurrent rows (a per-tensor scale is
broadcast). A zero point that leaves ``stored - zero_point`` outside int8 (possible only with
uint8 weights and a zero point other than 128 or so) is refused: re-rounding would silently
change the model.

How precisely we reproduce onnxruntime
--------------------------------------
onnxruntime quantizes the activations per step (uint8, asymmetric, per tensor) and we do not
reproduce its rounding bit for bit: against the float reference with the *same dequantized
weights*, onnxruntime's outputs differ by its activation rounding alone, about 1e-3 after a few
steps at H = 16..64 (``tests/test_quant_onnx.py`` bounds it at 5e-3 for those sizes). Our int8
kernels with 16-bit activations stay within ~1e-4 of that float reference.

Safety: the tensors are found and read through the ONNX importer's checked paths (initializers,
``Constant`` nodes, external data inside the model's folder, every dim checked before anything is
allocated, raw byte counts checked). A zero, negative, NaN or infinite scale, a scale or zero
point whose shape is neither (D,) nor (D, 4H), mismatched scale / zero point shapes, a zero point
of another type than its weights, and a truncated blob are :class:`FormatError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional, Tuple

import numpy as np

from lstm_cpu.errors import FormatError, InputError, UnsupportedModelError
from lstm_cpu.spec import LayerParams, reorder_gates, reorder_peepholes

from lstm_cpu.candidates import Candidate

from .limits import check_dims as _check_dims
from .onnx_chains import _Chains, links, stacked_state, walk_chains
from .onnx_fold import Folder
from .onnx_found import Found
from .onnx_graph import all_graphs as _all_graphs, default_opset, node_label as _node_label
from .onnx_graph import Graph as _Graph
from .onnx_graph import read_model as _read_model
from .onnx_lstm_op import (
    ONNX_GATE_ORDER,
    ONNX_PEEPHOLE_ORDER,
    _attributes,
    _state_source,
    activations,
    clip,
    direction,
    hidden_size,
    input_forget,
)
from .onnx_tensors import Const as _Const
from .onnx_tensors import RuntimeValue as _Runtime
from .onnx_tensors import dtype_name as _dtype_name
from .onnx_tensors import external_bytes as _external_bytes
from .onnx_tensors import read_const, resolve_const

OP_TYPE = "DynamicQuantizeLSTM"
DOMAIN = "com.microsoft"

# input positions (contrib op schema)
_X, _W, _R, _B, _SEQ, _H0, _C0, _P, _WS, _WZ, _RS, _RZ = range(12)
_INPUT_NAMES = ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P",
                "W_scale", "W_zero_point", "R_scale", "R_zero_point")


@dataclass
class QuantLayer:
    """One layer, one direction, canonical gate order (i, f, g, o); H units, ``in`` inputs.

    The real weights are ``s_ih[:, None] * w_ih`` and ``s_hh[:, None] * w_hh``."""

    w_ih: np.ndarray  # (4H, in) int8, zero point removed
    w_hh: np.ndarray  # (4H, H) int8
    s_ih: np.ndarray  # (4H,) float32 scale of each input-weight row (gate output)
    s_hh: np.ndarray  # (4H,) float32 scale of each recurrent-weight row
    bias: Optional[np.ndarray]  # (4H,) float32, Wb + Rb, or None
    peephole: Optional[np.ndarray]  # (3H,) i, f, o, or None
    activations: tuple  # (f, g, h) spec.Activation

    def dequantized(self) -> LayerParams:
        """The float weights this layer stands for (float64, exact products scale * int)."""
        return LayerParams(
            w_ih=self.s_ih.astype(np.float64)[:, None] * self.w_ih,
            w_hh=self.s_hh.astype(np.float64)[:, None] * self.w_hh,
            bias=self.bias, peephole=self.peephole, activations=self.activations)


@dataclass
class QuantNode:
    node: object
    graph: _Graph
    name: str
    H: int
    I: int
    direction: str
    D: int
    clip: Optional[float]
    input_forget: bool
    layers: List[QuantLayer]  # per direction
    h0: Optional[np.ndarray]  # (D, H) constant initial state or None
    c0: Optional[np.ndarray]
    per_channel: bool
    weight_type: str  # "int8" | "uint8"
    layout: int = 0  # for the chain linker: DynamicQuantizeLSTM is always time-major


@dataclass
class QuantModel:
    """A chain of DynamicQuantizeLSTM nodes as one stack: ``layers[l][d]``."""

    layers: List[List[QuantLayer]]
    clip: Optional[float]
    input_forget: bool
    direction: str
    initial_state: Optional[Tuple[np.ndarray, np.ndarray]]  # (h0 (L*D, H), c0 (L*D, H)) or None
    source: Dict = field(default_factory=dict)

    def dequantized(self) -> List[List[LayerParams]]:
        return [[p.dequantized() for p in row] for row in self.layers]


def is_quantized_lstm(node) -> bool:
    return node.op_type == OP_TYPE and node.domain == DOMAIN


# ---------------------------------------------------------------------------------------------
# Integer tensors
# ---------------------------------------------------------------------------------------------
def _int_types():
    from onnx import TensorProto as TP

    return {TP.INT8: ("int8", np.dtype("i1")), TP.UINT8: ("uint8", np.dtype("u1"))}


def _read_int8(c: _Const, folder) -> np.ndarray:
    """An int8 / uint8 constant, after the same checks as the float reader: dims before
    allocation, raw_data and external lengths, int32_data count and value range."""
    from onnx import TensorProto as TP

    t, what = c.tensor, c.what
    types = _int_types()
    if t.data_type not in types:
        raise FormatError(f"{what}: tensor {t.name!r} has type {_dtype_name(t.data_type)}; "
                          "DynamicQuantizeLSTM weights and zero points are int8 or uint8")
    if c.casts:
        raise UnsupportedModelError(f"{what}: tensor {t.name!r} reaches the node through a Cast")
    dims = c.dims
    n = _check_dims(dims, what)
    tname, npdt = types[t.data_type]
    if t.data_location == TP.EXTERNAL:
        arr = np.frombuffer(_external_bytes(t, folder, what, n), dtype=npdt)
    elif t.HasField("raw_data"):
        if len(t.raw_data) != n:
            raise FormatError(f"{what}: tensor {t.name!r} of shape {list(dims)} ({tname}) needs {n} bytes, "
                              f"its raw_data has {len(t.raw_data)}")
        arr = np.frombuffer(t.raw_data, dtype=npdt)
    else:
        src = np.asarray(t.int32_data, dtype=np.int64)
        if src.size != n:
            raise FormatError(f"{what}: tensor {t.name!r} of shape {list(dims)} needs {n} values, "
                              f"its int32_data has {src.size}")
        info = np.iinfo(npdt)
        if src.size and (src.min() < info.min or src.max() > info.max):
            raise FormatError(f"{what}: tensor {t.name!r} holds values outside {tname}")
        arr = src.astype(npdt)
    return arr.reshape(dims)


def _const(g, node, k, where, required=True) -> Optional[_Const]:
    name = node.input[k] if len(node.input) > k else ""
    if not name:
        if required:
            raise FormatError(f"{where}: input {_INPUT_NAMES[k]} is missing; DynamicQuantizeLSTM needs it")
        return None
    what = f"{where}: input {_INPUT_NAMES[k]} ({name!r})"
    try:
        return resolve_const(g, name, what)
    except _Runtime as rt:
        raise UnsupportedModelError(f"{what} is {rt.how}; lstm-cpu needs constant quantized weights") from None


def _scales(S: _Const, Z: _Const, D: int, H: int, folder, wdtype, where, which):
    """(scale, zero point) of W or R -> both as (D, 4H) (a per-tensor value is broadcast)."""
    if S.dims not in ((D,), (D, 4 * H)):
        raise FormatError(f"{where}: tensor {which}_scale has shape {list(S.dims)}, expected "
                          f"[{D}] (per tensor) or [{D}, {4 * H}] (per channel)")
    if Z.dims != S.dims:
        raise FormatError(f"{where}: tensor {which}_zero_point has shape {list(Z.dims)}; it must match "
                          f"{which}_scale's {list(S.dims)}")
    s = read_const(S, folder).astype(np.float32)  # NaN / Inf refused there
    if not np.all(s > 0):
        bad = float(s[~(s > 0)].ravel()[0])
        raise FormatError(f"{where}: tensor {which}_scale holds {bad}; scales must be > 0")
    z = _read_int8(Z, folder)
    if z.dtype != wdtype:
        raise FormatError(f"{where}: tensor {which}_zero_point is {z.dtype}, its weights are {wdtype}")
    if s.ndim == 1:
        s = np.repeat(s[:, None], 4 * H, axis=1)
        z = np.repeat(z[:, None], 4 * H, axis=1)
    return s, z.astype(np.int64)


def _centered(w: np.ndarray, zp: np.ndarray, where, which) -> np.ndarray:
    """stored (D, rows, 4H) - zero point (D, 4H) -> int8, or refused if it does not fit."""
    q = w.astype(np.int64) - zp[:, None, :]
    if q.size and (q.min() < -128 or q.max() > 127):
        raise UnsupportedModelError(
            f"{where}: {which} minus its zero point spans [{q.min()}, {q.max()}], outside int8; "
            "lstm-cpu keeps imported int8 weights exact and does not re-round them")
    return q.astype(np.int8)


def _parse_node(g: _Graph, node, fold, label) -> QuantNode:
    folder = fold.folder
    where = f"{label}: {OP_TYPE} node {_node_label(node)}"
    if len(node.input) != 12:
        raise FormatError(f"{where}: has {len(node.input)} inputs; {OP_TYPE} takes 12 "
                          f"({', '.join(_INPUT_NAMES)})")
    if not node.input[_X]:
        raise FormatError(f"{where}: input X is missing")
    attrs = _attributes(node, where)
    for a in ("layout", "output_sequence"):
        if a in attrs:
            raise FormatError(f"{where}: attribute {a!r} does not exist on {OP_TYPE}")
    W, R = _const(g, node, _W, where), _const(g, node, _R, where)
    B, P = _const(g, node, _B, where, False), _const(g, node, _P, where, False)
    WS, WZ = _const(g, node, _WS, where), _const(g, node, _WZ, where)
    RS, RZ = _const(g, node, _RS, where), _const(g, node, _RZ, where)
    dirn, D = direction(attrs, where)
    if len(R.dims) != 3:
        raise FormatError(f"{where}: tensor R has shape {list(R.dims)}, expected (D, H, 4H)")
    if "hidden_size" in attrs:
        H = hidden_size(attrs, where, R)
    else:
        H = int(R.dims[1])
        if H <= 0:
            raise FormatError(f"{where}: tensor R has shape {list(R.dims)}, expected (D, H, 4H)")
    if len(W.dims) != 3 or W.dims[0] != D or W.dims[2] != 4 * H or W.dims[1] <= 0:
        raise FormatError(f"{where}: tensor W has shape {list(W.dims)}, expected [{D}, I, {4 * H}] "
                          f"(num_directions, input_size, 4*hidden_size)")
    if R.dims != (D, H, 4 * H):
        raise FormatError(f"{where}: tensor R has shape {list(R.dims)}, expected [{D}, {H}, {4 * H}]")
    for c, shape, nm in ((B, (D, 8 * H), "B"), (P, (D, 3 * H), "P")):
        if c is not None and c.dims != shape:
            raise FormatError(f"{where}: tensor {nm} has shape {list(c.dims)}, expected {list(shape)}")
    I = int(W.dims[1])
    acts = activations(attrs, where, D)
    cl = clip(attrs, where)
    coupled = input_forget(attrs, where)

    w, r = _read_int8(W, folder), _read_int8(R, folder)  # (D, I, 4H), (D, H, 4H)
    if w.dtype != r.dtype:
        raise FormatError(f"{where}: W is {w.dtype} and R is {r.dtype}; the schema needs one type")
    ws, wz = _scales(WS, WZ, D, H, folder, w.dtype, where, "W")
    rs, rz = _scales(RS, RZ, D, H, folder, r.dtype, where, "R")
    wq, rq = _centered(w, wz, where, "W"), _centered(r, rz, where, "R")
    b = None if B is None else read_const(B, folder).astype(np.float32)
    p = None if P is None else read_const(P, folder).astype(np.float32)
    layers = []
    for d in range(D):
        layers.append(QuantLayer(
            w_ih=np.ascontiguousarray(reorder_gates(wq[d].T, ONNX_GATE_ORDER)),  # (4H, I)
            w_hh=np.ascontiguousarray(reorder_gates(rq[d].T, ONNX_GATE_ORDER)),  # (4H, H)
            s_ih=reorder_gates(ws[d], ONNX_GATE_ORDER),  # (4H,)
            s_hh=reorder_gates(rs[d], ONNX_GATE_ORDER),
            bias=None if b is None else reorder_gates(b[d, : 4 * H] + b[d, 4 * H:], ONNX_GATE_ORDER),
            peephole=None if p is None else reorder_peepholes(p[d], ONNX_PEEPHOLE_ORDER),
            activations=acts[d]))
    inp = lambda k: node.input[k] if len(node.input) > k else ""  # noqa: E731
    h0, _ = _state_source(g, inp(_H0), f"{where}: input initial_h", D, H, 0, fold)
    c0, _ = _state_source(g, inp(_C0), f"{where}: input initial_c", D, H, 0, fold)
    if inp(_SEQ):
        raise UnsupportedModelError(f"{where}: input sequence_lens is not supported on quantized nodes yet")
    name = node.name or f"<unnamed {OP_TYPE} -> {node.output[0] if node.output else '?'}>"
    return QuantNode(node, g, name, H, I, dirn, D, cl, coupled, layers, h0, c0,
                     per_channel=WS.dims == (D, 4 * H), weight_type=str(w.dtype))


# ---------------------------------------------------------------------------------------------
# Nodes -> one stack
# ---------------------------------------------------------------------------------------------
class _QuantChains(_Chains):
    """The LSTM chain evaluator, with DynamicQuantizeLSTM's Y (T, D, N, H) as a source."""

    def _eval(self, name):
        prod = self.g.producers.get(name)
        if prod is not None and is_quantized_lstm(prod[0]):
            node, k = prod
            if k != 0 or id(node) not in self.infos:
                return None
            return self.norm(id(node), (("T",), ("D",), ("B",), ("H",)))
        return super()._eval(name)


def _chains(model, folder, label) -> List[List[QuantNode]]:
    """Every chain of DynamicQuantizeLSTM nodes (linked like LSTM chains: Y rearranged into X)."""
    opset = default_opset(model, label)
    fold = Folder.of(model, folder)
    out = []
    for g in _all_graphs(model):
        nodes = [n for n in g.proto.node if is_quantized_lstm(n)]
        if not nodes:
            continue
        infos = {id(n): _parse_node(g, n, fold, label) for n in nodes}
        pred = links(g, infos, {}, opset, evaluator=_QuantChains)
        out.extend(walk_chains(nodes, infos, pred))
    return out


def _quant_model(chain: List[QuantNode], label) -> QuantModel:
    """One chain -> QuantModel, checked as a uniform stack."""
    first = chain[0]
    for l, info in enumerate(chain[1:], 1):
        if (info.H, info.D, info.clip, info.input_forget, info.direction) != (
                first.H, first.D, first.clip, first.input_forget, first.direction):
            raise UnsupportedModelError(f"{label}: node {info.name!r} (layer {l}) differs from "
                                        f"{first.name!r} in hidden_size, direction, clip or input_forget")
        if info.I != first.D * first.H:
            raise FormatError(f"{label}: node {info.name!r} (layer {l}) takes {info.I} inputs, "
                              f"the layer below gives {first.D * first.H}")
    initial_state = stacked_state(chain, first.D, first.H)
    source = {"format": "onnx", "op": f"{DOMAIN}.{OP_TYPE}", "nodes": [i.name for i in chain],
              "per_channel": [i.per_channel for i in chain], "weight_type": [i.weight_type for i in chain]}
    return QuantModel([i.layers for i in chain], first.clip, first.input_forget, first.direction,
                      initial_state, source)


def find_quantized(model, folder, label) -> List[Found]:
    """The finder for onnxruntime's quantized LSTMs (kind "quantized"): one candidate per chain,
    built as the dequantized canonical weights plus the int8 weights and scales, kept exactly."""
    found = []
    for chain in _chains(model, folder, label):
        first = chain[0]
        cand = Candidate(name=first.name, kind="quantized", input_size=first.I, hidden_size=first.H,
                         num_layers=len(chain), num_directions=first.D,
                         location=f"{first.graph.path}: {DOMAIN}.{OP_TYPE} "
                                  f"{' -> '.join(repr(i.name) for i in chain)}, {first.direction}")
        found.append(Found(cand, partial(_build, chain, label), tuple(i.name for i in chain[1:])))
    return found


def _build(chain, label):
    from lstm_cpu.quant import ReducedLayer

    qm = _quant_model(chain, label)
    reduced = [[ReducedLayer("int8", q.w_ih, q.w_hh, np.asarray(q.s_ih, np.float32), np.asarray(q.s_hh, np.float32))
                for q in row] for row in qm.layers]
    return qm.dequantized(), {"clip": qm.clip, "input_forget": qm.input_forget,
                              "initial_state": qm.initial_state, "source": qm.source,
                              "reverse": qm.direction == "reverse", "weights": "int8", "reduced": reduced}


def read_quantized(src, node: Optional[str] = None) -> QuantModel:
    """An ONNX model with DynamicQuantizeLSTM nodes (path, bytes or ModelProto) -> QuantModel.

    ``node``: the name of a node whose chain to read, when the model holds several."""
    from .onnx_lstm import _guarded

    def run():
        model, folder, label = _read_model(src)
        chains = _chains(model, folder, label)
        if not chains:
            raise UnsupportedModelError(f"{label}: no {DOMAIN} {OP_TYPE} node found")
        if node is not None:
            chains = [c for c in chains if any(i.name == node for i in c)]
            if not chains:
                raise InputError(f"{label}: no {OP_TYPE} node named {node!r}")
        if len(chains) > 1:
            listing = "; ".join(" -> ".join(f"{i.name!r} (H={i.H}, D={i.D}, I={i.I})" for i in c) for c in chains)
            raise InputError(f"{label}: {len(chains)} independent {OP_TYPE} stacks: {listing}; pick one with node=")
        return _quant_model(chains[0], label)

    return _guarded(src, run)


__all__ = ["read_quantized", "find_quantized", "QuantModel", "QuantLayer", "is_quantized_lstm", "OP_TYPE", "DOMAIN"]
