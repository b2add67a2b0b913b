"""ONNX ``LSTM`` nodes -> the canonical :class:`lstm_cpu.model.LSTMModel`.

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

Gate blocks are permuted with :func:`lstm_cpu.spec.reorder_gates` (``"iofc"``), the only place the
ONNX order is mapped; peepholes (i, o, f) are permuted to the canonical (i, f, o).

Where the weights may live: initializers, ``Constant`` nodes (``value``), either behind chains of
``Identity`` / ``Cast`` (to a float type), and external data files. Weights computed at run time
(a graph input, or any other node's output) raise :class:`UnsupportedModelError` naming the node
and the input. float16 / bfloat16 / float64 weights are converted; integer / bool weights are
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

Chains (multi-layer stacks)
---------------------------
``torch.onnx.export`` writes an L-layer ``nn.LSTM`` as L LSTM nodes linked by layout ops
(``Squeeze`` for one direction, ``Transpose`` + ``Reshape`` for two; the dynamo exporter computes
the ``Reshape`` target with ``Shape``/``Slice``/``Mul``/``Concat``). The importer evaluates those
ops symbolically and links node A to node B when B's ``X`` is exactly A's ``Y`` rearranged to
(T, N, D*H) with the directions outer; such a chain becomes one multi-layer model. Every node of a
chain must share H, D, ``clip``, ``input_forget`` and ``sequence_lens``.

Choosing: one chain (or lone node) in the model (main graph and, recursively, ``If``/``Loop``/
``Scan`` bodies) is used automatically. With several, ``node="name"`` picks the chain containing
that node (the whole chain, never a part of it); without it :class:`InputError` lists the
candidates with their sizes.

Initial state
-------------
A constant ``initial_h`` / ``initial_c`` (initializer or ``Constant``) becomes
``LSTMModel(initial_state=...)``. ONNX states carry a batch axis, our model's does not: a constant
state is accepted when its batch size is 1 or when every batch row is identical (it is broadcast,
e.g. the zeros the dynamo exporter bakes in), else :class:`UnsupportedModelError`. All-zero
constants give ``initial_state=None``. A state computed at run time (a graph input, a ``Slice`` of
one as torch writes for ``lstm(x, (h0, c0))``, or any other node) is left to the caller
(``model.run(x, state)``) and recorded in ``model.info()["source"]["inputs"]``.

A lone ``direction="reverse"`` node (one backwards direction) has no LSTMModel equivalent (a
one-direction model runs forwards): :func:`onnx_to_params` reads it (``options["reverse"]``) and
:func:`load_onnx` raises :class:`UnsupportedModelError`.

Safety
------
The protobuf is parsed without external data. External tensors are read only from files inside
the model file's folder: absolute locations, ``..`` components, and paths (or symlinks) whose real
path leaves the folder are refused, and ``offset``/``length`` are checked against the file size and
the tensor's declared shape before anything is read. Every tensor's dims are checked (each at most
:data:`MAX_DIM`, product at most :data:`MAX_TENSOR_ELEMENTS`, and equal to the stored data) before
an array is allocated. Errors: :class:`FormatError` for corrupt / hostile / inconsistent files
(naming the file, node and tensor, and what was expected vs found), :class:`UnsupportedModelError`
for valid models using something lstm-cpu cannot run; nothing else escapes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from lstm_cpu.errors import FormatError, InputError, InputTypeError, LSTMError, UnsupportedModelError
from lstm_cpu.spec import ACTIVATIONS, Activation, LayerParams, reorder_gates

#: ONNX stores the gate blocks of W, R and B as (input, output, forget, cell candidate).
ONNX_GATE_ORDER = "iofc"

#: Refuse any single tensor with more elements than this before reading it (4 GiB of float32).
MAX_TENSOR_ELEMENTS = 1 << 30
#: Refuse any dimension (and hidden_size) larger than this.
MAX_DIM = 1 << 24
#: Inlining model-local functions may not grow the model beyond this many nodes (a hostile model
#: can nest calls so that the expansion is exponential in the file size).
MAX_INLINED_NODES = 1 << 20
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


# ---------------------------------------------------------------------------------------------
# Reading the file
# ---------------------------------------------------------------------------------------------
_PROTOBUF_LIMIT = 2 << 30  # protobuf refuses messages of 2 GiB and more


def _read_model(src):
    """src (path, bytes, or ModelProto) -> (ModelProto, folder for external data or None, label)."""
    import onnx

    if isinstance(src, onnx.ModelProto):
        return src, None, "<ModelProto>"
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, folder, label = bytes(src), None, "<bytes>"
    elif isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        label = repr(path)
        with open(path, "rb") as f:  # a missing / unreadable path is not a bad file: OSError
            size = os.fstat(f.fileno()).st_size
            if size >= _PROTOBUF_LIMIT:  # protobuf cannot parse it: refuse before reading it
                raise FormatError(f"{label} is {size} bytes; a serialized ONNX model must be under "
                                  f"2 GiB (larger models keep their weights in external data)")
            data = f.read(_PROTOBUF_LIMIT)
        folder = os.path.dirname(os.path.abspath(path))
    else:
        raise InputTypeError(f"load_onnx expects a path, bytes or onnx.ModelProto, got {type(src).__name__}")
    if not data:
        raise FormatError(f"{label} is empty: expected an ONNX model (a serialized ModelProto)")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # google.protobuf DecodeError, RuntimeWarning-as-error, ...
        raise FormatError(
            f"{label} is not a readable ONNX model ({len(data)} bytes): {type(exc).__name__}: {exc}"
        ) from None
    if not model.HasField("graph") or model.ir_version <= 0:
        raise FormatError(
            f"{label} is not an ONNX model: it parsed as a protobuf but has "
            f"{'no graph' if not model.HasField('graph') else 'no ir_version'}"
        )
    return model, folder, label


def _default_opset(model, label) -> int:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise FormatError(f"{label}: the model declares no opset for the default ONNX domain")
    return int(versions[0])


def _lstm_version(opset: int, label) -> int:
    """The LSTM operator version a model of default-domain ``opset`` uses."""
    import onnx

    if opset < 1:
        raise FormatError(f"{label}: default-domain opset {opset} is not a valid opset")
    try:
        v = int(onnx.defs.get_schema("LSTM", opset).since_version)
    except Exception:  # an opset newer than the installed onnx knows
        v = max(v for v in SUPPORTED_VERSIONS if v <= opset)
    if v not in SUPPORTED_VERSIONS:
        raise UnsupportedModelError(
            f"{label}: opset {opset} uses LSTM-{v}; supported versions are {SUPPORTED_VERSIONS}")
    return v


# ---------------------------------------------------------------------------------------------
# Graphs and scopes
# ---------------------------------------------------------------------------------------------
@dataclass
class _Graph:
    """One (sub)graph: its constants, producers and inputs, and the enclosing scope."""

    proto: object
    path: str  # "main", "main/If 'cond':then_branch", ...
    parent: Optional["_Graph"]
    initializers: Dict[str, object] = field(default_factory=dict)
    producers: Dict[str, Tuple[object, int]] = field(default_factory=dict)  # name -> (node, output idx)
    consumers: Dict[str, List[object]] = field(default_factory=dict)
    inputs: set = field(default_factory=set)

    @classmethod
    def build(cls, proto, path, parent):
        g = cls(proto, path, parent)
        for t in proto.initializer:
            g.initializers[t.name] = t
        for st in proto.sparse_initializer:
            g.initializers[st.values.name] = st  # refused when used as a weight
        for vi in proto.input:
            g.inputs.add(vi.name)
        for node in proto.node:
            for k, o in enumerate(node.output):
                if o:
                    g.producers[o] = (node, k)
            for i in node.input:
                if i:
                    g.consumers.setdefault(i, []).append(node)
        return g

    def defines(self, name) -> bool:
        return name in self.initializers or name in self.producers or name in self.inputs


def _subgraphs(node):
    """(attribute name, GraphProto) of every graph attribute of ``node`` (If, Loop, Scan, ...)."""
    from onnx import AttributeProto

    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == AttributeProto.GRAPHS:
            for k, g in enumerate(a.graphs):
                yield f"{a.name}[{k}]", g


def _all_graphs(model) -> List[_Graph]:
    """The main graph and every nested subgraph, depth first (bounded depth)."""
    out = []

    def walk(proto, path, parent, depth):
        if depth > 64:
            raise FormatError(f"subgraphs nested more than 64 deep at {path}")
        g = _Graph.build(proto, path, parent)
        out.append(g)
        for node in proto.node:
            for aname, sub in _subgraphs(node):
                walk(sub, f"{path}/{node.op_type} {_node_label(node)}:{aname}", g, depth + 1)

    walk(model.graph, "main", None, 0)
    return out


def _inline_lstm_functions(model, label):
    """``model`` with its model-local functions inlined when one of them holds an LSTM node (torch's
    ``export_modules_as_functions`` puts nn.LSTM there), else None. onnx's own inliner does the
    work, after the expanded size has been counted and bounded."""
    funcs = {(f.domain, f.name): f for f in model.functions}
    if not funcs:
        return None
    memo: Dict[tuple, int] = {}

    def size(nodes, stack) -> int:
        """Nodes after inlining, counting subgraphs; raises on recursion or blow-up."""
        n = 0
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in funcs:
                if key in stack:
                    raise FormatError(f"{label}: model-local function {key[1]!r} calls itself")
                if key not in memo:
                    memo[key] = size(funcs[key].node, stack | {key})
                n += memo[key]
            else:
                n += 1
                for _, sub in _subgraphs(node):
                    n += size(sub.node, stack)
            if n > MAX_INLINED_NODES:
                raise FormatError(
                    f"{label}: inlining the model-local functions would create more than "
                    f"{MAX_INLINED_NODES} nodes")
        return n

    def holds_lstm(nodes) -> bool:
        return any(_is_lstm(nd) or any(holds_lstm(sub.node) for _, sub in _subgraphs(nd)) for nd in nodes)

    if not any(holds_lstm(f.node) for f in funcs.values()):
        return None
    size(model.graph.node, frozenset())
    try:
        from onnx import inliner
    except ImportError:
        raise UnsupportedModelError(
            f"{label}: the LSTM is inside a model-local function; inlining it needs onnx >= 1.15 "
            "(pip install -U onnx)") from None
    try:
        return inliner.inline_local_functions(model)
    except Exception as exc:  # the C++ inliner rejects malformed functions with various types
        raise FormatError(f"{label}: could not inline the model-local functions: {exc}") from None


def _node_label(node) -> str:
    return repr(node.name) if node.name else f"<unnamed {node.op_type} -> {list(node.output)[:1]}>"


def _is_lstm(node) -> bool:
    return node.op_type == "LSTM" and node.domain in ("", "ai.onnx")


# ---------------------------------------------------------------------------------------------
# Constant tensors: resolution (no data read) and safe conversion
# ---------------------------------------------------------------------------------------------
_FLOAT_TYPES = {}  # TensorProto data type -> (name, numpy little-endian dtype, itemsize)


def _float_types():
    if not _FLOAT_TYPES:
        from onnx import TensorProto as TP

        _FLOAT_TYPES.update({
            TP.FLOAT: ("float32", np.dtype("<f4")),
            TP.DOUBLE: ("float64", np.dtype("<f8")),
            TP.FLOAT16: ("float16", np.dtype("<f2")),
            TP.BFLOAT16: ("bfloat16", np.dtype("<u2")),  # bit pattern; widened to float32
        })
    return _FLOAT_TYPES


def _dtype_name(data_type: int) -> str:
    from onnx import TensorProto

    try:
        return TensorProto.DataType.Name(data_type)
    except ValueError:
        return f"data type {data_type}"


@dataclass
class _Const:
    """A constant tensor found for a node input, not read yet: dims can be checked first."""

    tensor: object  # TensorProto
    what: str  # "input 'W' ('onnx::LSTM_12') of node 'lstm'"
    casts: Tuple[int, ...] = ()  # Cast targets applied on the way (TensorProto data types)

    @property
    def dims(self) -> Tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.dims)


class _Runtime(Exception):
    """Internal: the value is computed at run time (graph input or a node output)."""

    def __init__(self, how: str, source: str, graph_input: Optional[str] = None):
        super().__init__(how)
        self.how, self.source, self.graph_input = how, source, graph_input


def _resolve_const(g: _Graph, name: str, what: str, depth: int = 0) -> _Const:
    """Find the constant tensor behind ``name`` (initializer, Constant, via Identity/Cast chains).

    Raises _Runtime when it is computed at run time, FormatError when nothing defines it.
    """
    from onnx import AttributeProto, TensorProto

    if depth > 256:
        raise FormatError(f"{what}: the chain of Identity/Cast nodes behind {name!r} is too long or cyclic")
    scope = g
    while scope is not None and not scope.defines(name):
        scope = scope.parent
    if scope is None:
        raise FormatError(f"{what}: tensor {name!r} is not defined by any initializer, node or graph input")
    if name in scope.initializers:
        t = scope.initializers[name]
        if not isinstance(t, TensorProto):
            raise UnsupportedModelError(f"{what}: tensor {name!r} is a sparse initializer; dense weights are needed")
        return _Const(t, what)
    if name in scope.producers:
        node, _ = scope.producers[name]
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        if op == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == AttributeProto.TENSOR:
                    return _Const(a.t, what)
                if a.name == "sparse_value":
                    raise UnsupportedModelError(
                        f"{what}: Constant node {_node_label(node)} holds a sparse tensor; dense weights are needed")
                if a.name in ("value_float", "value_floats"):
                    vals = [a.f] if a.name == "value_float" else list(a.floats)
                    t = TensorProto(data_type=TensorProto.FLOAT, float_data=vals)
                    if a.name == "value_floats":
                        t.dims.append(len(vals))
                    return _Const(t, what)
                if a.name.startswith("value_"):
                    raise UnsupportedModelError(
                        f"{what}: Constant node {_node_label(node)} holds {a.name}; "
                        "float weights are needed (integer, string and bool weights are not supported)")
            raise FormatError(f"{what}: Constant node {_node_label(node)} has no value attribute")
        if op == "Identity" and node.input and node.input[0]:
            return _resolve_const(scope, node.input[0], what, depth + 1)
        if op == "Cast" and node.input and node.input[0]:
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to not in _float_types():
                raise UnsupportedModelError(
                    f"{what}: Cast node {_node_label(node)} produces {_dtype_name(to or 0)}; "
                    "float weights are needed")
            c = _resolve_const(scope, node.input[0], what, depth + 1)
            return _Const(c.tensor, c.what, c.casts + (int(to),))
        raise _Runtime(f"computed at run time by {op} node {_node_label(node)}", f"{op} {_node_label(node)}")
    raise _Runtime(f"graph input {name!r}", name, graph_input=name)


def _check_dims(dims, what):
    for d in dims:
        if d < 0 or d > MAX_DIM:
            raise FormatError(f"{what}: dimension {d} of shape {list(dims)} is outside [0, {MAX_DIM}]")
    n = math.prod(dims)
    if n > MAX_TENSOR_ELEMENTS:
        raise FormatError(f"{what}: shape {list(dims)} has {n} elements, more than the limit {MAX_TENSOR_ELEMENTS}")
    return n


def _external_bytes(t, folder, what, nbytes: int) -> bytes:
    """The ``nbytes`` of external tensor ``t``, read only from inside ``folder``."""
    info = {e.key: e.value for e in t.external_data}
    if folder is None:
        raise FormatError(
            f"{what}: tensor {t.name!r} is stored in external data file {info.get('location')!r}, "
            "which can only be read when the model is loaded from a path")
    loc = info.get("location", "")
    if not loc or "\x00" in loc:
        raise FormatError(f"{what}: tensor {t.name!r} has external data without a valid location")
    parts = loc.replace("\\", "/").split("/")
    if os.path.isabs(loc) or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":") or ".." in parts:
        raise FormatError(
            f"{what}: external data location {loc!r} of tensor {t.name!r} must be a relative path "
            "inside the model's folder (no absolute path, no '..')")
    base = os.path.realpath(folder)
    full = os.path.realpath(os.path.join(base, *[p for p in parts if p not in ("", ".")]))
    if os.path.commonpath([base, full]) != base or full == base:
        raise FormatError(
            f"{what}: external data location {loc!r} of tensor {t.name!r} resolves to {full!r}, "
            f"outside the model's folder {base!r} (symlink?)")
    if not os.path.isfile(full):
        raise FormatError(f"{what}: external data file {loc!r} of tensor {t.name!r} does not exist in {base!r}")
    try:
        offset = int(info.get("offset", "0"))
        size = os.path.getsize(full)
        length = int(info["length"]) if "length" in info else size - offset
    except (ValueError, OSError) as exc:
        raise FormatError(f"{what}: bad external data fields {info} of tensor {t.name!r}: {exc}") from None
    if offset < 0 or length < 0 or offset + length > size:
        raise FormatError(
            f"{what}: external data of tensor {t.name!r} spans bytes [{offset}, {offset + length}) "
            f"but {loc!r} has {size} bytes")
    if length != nbytes:
        raise FormatError(
            f"{what}: tensor {t.name!r} of shape {list(t.dims)} needs {nbytes} bytes, "
            f"its external data is {length} bytes")
    with open(full, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise FormatError(f"{what}: short read of external data {loc!r} ({len(data)} of {length} bytes)")
    return data


def _read_const(c: _Const, folder) -> np.ndarray:
    """The float array of ``c`` (float32, or float64 for double tensors), after every check."""
    from onnx import TensorProto as TP

    t, what = c.tensor, c.what
    types = _float_types()
    if t.data_type not in types:
        raise UnsupportedModelError(
            f"{what}: tensor {t.name!r} has type {_dtype_name(t.data_type)}; "
            "float weights are needed (float32, float16, bfloat16 or float64)")
    dims = c.dims
    n = _check_dims(dims, what)
    tname, npdt = types[t.data_type]
    nbytes = n * npdt.itemsize
    if t.data_location == TP.EXTERNAL:
        arr = np.frombuffer(_external_bytes(t, folder, what, nbytes), dtype=npdt)
    elif t.HasField("raw_data"):
        if len(t.raw_data) != nbytes:
            raise FormatError(
                f"{what}: tensor {t.name!r} of shape {list(dims)} ({tname}) needs {nbytes} bytes, "
                f"its raw_data has {len(t.raw_data)}")
        arr = np.frombuffer(t.raw_data, dtype=npdt)
    else:
        if t.data_type == TP.FLOAT:
            src, field_name = t.float_data, "float_data"
        elif t.data_type == TP.DOUBLE:
            src, field_name = t.double_data, "double_data"
        else:  # float16 / bfloat16 bit patterns are stored in int32_data
            src, field_name = t.int32_data, "int32_data"
        if len(src) != n:
            raise FormatError(
                f"{what}: tensor {t.name!r} of shape {list(dims)} needs {n} values, its {field_name} has {len(src)}")
        if t.data_type in (TP.FLOAT16, TP.BFLOAT16):
            arr = np.asarray(src, dtype=np.int64).astype(np.uint16).view(npdt)
        else:
            arr = np.asarray(src, dtype=npdt)
    if t.data_type == TP.BFLOAT16:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    elif t.data_type == TP.FLOAT16:
        arr = arr.astype(np.float32)
    arr = arr.astype(np.float64 if t.data_type == TP.DOUBLE else np.float32).reshape(dims)
    for to in c.casts:  # Cast chains round exactly as the runtime would
        if to == TP.FLOAT16:
            arr = arr.astype(np.float16).astype(np.float32)
        elif to == TP.BFLOAT16:
            arr = ((arr.astype(np.float32).view(np.uint32) + 0x8000) >> 16 << 16).astype(np.uint32).view(np.float32)
        elif to == TP.FLOAT:
            arr = arr.astype(np.float32)
        else:
            arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise FormatError(f"{what}: tensor {t.name!r} contains NaN or Inf")
    return arr


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


def hidden_size(attrs, where, R: _Const) -> int:
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
class _NodeInfo:
    node: object
    graph: _Graph
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


def _weight(g, node, k, where) -> Optional[_Const]:
    """The constant behind input k (W, R, B or P) of ``node``, or None when the input is absent."""
    name = _input(node, k)
    if not name:
        return None
    what = f"{where}: input {_INPUT_NAMES[k]} ({name!r})"
    try:
        return _resolve_const(g, name, what)
    except _Runtime as rt:
        raise UnsupportedModelError(
            f"{what} is {rt.how}; lstm-cpu needs constant weights "
            "(an initializer, a Constant node, or external data)") from None


def _expect_dims(c: Optional[_Const], shape, where, tensor):
    if c is not None and c.dims != tuple(shape):
        raise FormatError(f"{where}: tensor {tensor} has shape {list(c.dims)}, expected {list(shape)}")


def _check_declared_x(g: _Graph, node, where, I):
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


def _peephole_canonical(p: np.ndarray) -> np.ndarray:
    """ONNX peepholes (3H,) ordered i, o, f -> canonical i, f, o."""
    pi, po, pf = np.split(p, 3)
    return np.concatenate([pi, pf, po])


def _state_source(g, name, what, D, H, lay, folder):
    """initial_h / initial_c input -> (constant (D, H) or None, provenance dict)."""
    if not name:
        return None, None
    try:
        c = _resolve_const(g, name, what)
    except _Runtime as rt:
        zero = _known_zero(g, name)
        if zero:
            return None, {"name": name, "zeros": zero}
        src = _graph_input_behind(g, name)
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
    arr = _read_const(c, folder)
    arr = arr if lay == 0 else np.transpose(arr, (1, 0, 2))  # (D, N, H)
    if N == 0:
        raise FormatError(f"{what}: constant state has batch size 0")
    if N > 1 and not np.all(arr == arr[:, :1, :]):
        raise UnsupportedModelError(
            f"{what}: constant initial state has batch size {N} with different rows; lstm-cpu models "
            "carry one initial state for every sequence (batch 1, or identical rows)")
    h = arr[:, 0, :]  # (D, H)
    return h, {"name": name, "constant": True, "batch": N, "zeros": not np.any(h)}


def _parse_node(g: _Graph, node, version: int, folder, label) -> _NodeInfo:
    where = f"{label}: LSTM node {_node_label(node)}"
    if len(node.input) < 3 or not node.input[0] or not node.input[1] or not node.input[2]:
        raise FormatError(f"{where}: needs inputs X, W and R, got {list(node.input)}")
    if len(node.input) > 8:
        raise FormatError(f"{where}: has {len(node.input)} inputs; the LSTM operator takes at most 8")
    attrs = _attributes(node, where)
    W, R = _weight(g, node, _W, where), _weight(g, node, _R, where)
    B, P = _weight(g, node, _B, where), _weight(g, node, _P, where)
    H = hidden_size(attrs, where, R)
    dirn, D = direction(attrs, where)
    if len(W.dims) != 3:
        raise FormatError(f"{where}: tensor W has shape {list(W.dims)}, expected (D, 4H, I) = [{D}, {4 * H}, I]")
    _check_dims(W.dims, f"{where}: tensor W")
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

    w, r = _read_const(W, folder), _read_const(R, folder)
    b = None if B is None else _read_const(B, folder)
    p = None if P is None else _read_const(P, folder)
    params = []
    for d in range(D):
        bias = None if b is None else reorder_gates(b[d, : 4 * H] + b[d, 4 * H :], ONNX_GATE_ORDER)
        params.append(LayerParams(
            w_ih=reorder_gates(w[d], ONNX_GATE_ORDER),  # (4H, I)
            w_hh=reorder_gates(r[d], ONNX_GATE_ORDER),  # (4H, H)
            bias=bias,  # (4H,) Wb + Rb
            peephole=None if p is None else _peephole_canonical(p[d]),  # (3H,) i, f, o
            activations=acts[d],
        ))
    h0, h_info = _state_source(g, _input(node, _H0), f"{where}: input initial_h", D, H, lay, folder)
    c0, c_info = _state_source(g, _input(node, _C0), f"{where}: input initial_c", D, H, lay, folder)
    seq = _input(node, _SEQ)
    inputs = {"X": _input(node, _X), "sequence_lens": seq or None,
              "initial_h": h_info, "initial_c": c_info}
    seq_const = None
    if seq:
        what = f"{where}: input sequence_lens ({seq!r})"
        try:
            seq_const = _constant_lengths(_resolve_const(g, seq, what), what)
        except _Runtime:
            pass  # the usual case: lengths given at run time, model.run(x, lengths=...)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"{what} is a constant lstm-cpu cannot use: {exc}") from None
        if seq_const is not None:
            inputs["sequence_lens"] = None  # accepted only as a no-op, see _check_constant_lengths
    name = node.name or f"<unnamed LSTM -> {node.output[0] if node.output else '?'}>"
    return _NodeInfo(node, g, name, version, H, I, dirn, D, lay, cl, coupled, params, h0, c0, inputs,
                     seq_const)


def _constant_lengths(c: _Const, what) -> np.ndarray:
    """The values (B,) int64 of a constant sequence_lens, after checking type and shape."""
    from onnx import TensorProto as TP
    from onnx import numpy_helper

    t = c.tensor
    if t.data_type not in (TP.INT32, TP.INT64) or c.casts:
        raise UnsupportedModelError(
            f"{what}: a constant of type {_dtype_name(t.data_type)}; ONNX sequence_lens is int32")
    dims = c.dims
    if len(dims) != 1:
        raise FormatError(f"{what}: a constant of shape {list(dims)}; sequence_lens is (batch_size,)")
    _check_dims(dims, what)
    if t.data_location == TP.EXTERNAL:
        raise UnsupportedModelError(f"{what}: a constant stored as external data")
    arr = numpy_helper.to_array(t)
    if arr.shape != tuple(dims):
        raise FormatError(f"{what}: holds {arr.size} values for shape {list(dims)}")
    return arr.astype(np.int64)


def _check_constant_lengths(model, chain: List[_NodeInfo], label) -> Optional[int]:
    """A constant sequence_lens is accepted when every entry equals X's static time length T:
    then it changes nothing (tf2onnx and constant folding produce such tensors from static
    shapes). Anything else would bake lengths into the model, which lstm-cpu takes at run time.
    Returns T when some node had such a constant, else None."""
    consts = [i for i in chain if i.seq_const is not None]
    if not consts:
        return None
    T = _static_sizes(model, chain[:1]).get("T")
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
# Run-time values that are known anyway: zeros, slices of graph inputs
# ---------------------------------------------------------------------------------------------
_LAYOUT_OPS = {"Identity", "Cast", "Slice", "Gather", "Squeeze", "Unsqueeze", "Reshape",
               "Transpose", "Expand", "Split", "Flatten", "Concat"}


def _known_zero(g: _Graph, name: str, depth: int = 0) -> Optional[str]:
    """A description if ``name`` is provably all zeros (ConstantOfShape 0 / zero constants through
    layout ops), else None. Only used to describe where an initial state comes from."""
    from onnx import AttributeProto

    if depth > 64 or not name:
        return None
    try:
        c = _resolve_const(g, name, "state")
        try:
            return "constant zeros" if not np.any(_read_const(c, None)) else None
        except LSTMError:
            return None
    except (_Runtime, LSTMError):
        pass
    if name not in g.producers:
        return None
    node, _ = g.producers[name]
    if node.op_type == "ConstantOfShape":
        v = next((a.t for a in node.attribute if a.name == "value" and a.type == AttributeProto.TENSOR), None)
        if v is None:
            return "ConstantOfShape zeros"
        try:
            return "ConstantOfShape zeros" if not np.any(_read_const(_Const(v, "value"), None)) else None
        except LSTMError:
            return None
    if node.op_type in _LAYOUT_OPS and node.input:
        data = node.input[0]
        if node.op_type == "Concat":
            ok = all(_known_zero(g, i, depth + 1) for i in node.input if i)
            return "zeros (Concat)" if ok else None
        z = _known_zero(g, data, depth + 1)
        return z and f"{z} via {node.op_type}"
    return None


def _graph_input_behind(g: _Graph, name: str, depth: int = 0) -> Optional[str]:
    """The graph input ``name`` is taken from through layout ops (torch: Slice of h0), or None."""
    scope = g
    while depth < 64 and name:
        if name in scope.inputs and name not in scope.initializers:
            return name
        if name not in scope.producers:
            return None
        node, _ = scope.producers[name]
        if node.op_type not in _LAYOUT_OPS or node.op_type == "Concat" or not node.input:
            return None
        name, depth = node.input[0], depth + 1
    return None


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

    def __init__(self, g: _Graph, infos: Dict[int, _NodeInfo], known: Dict[str, int], opset: int):
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
            c = _resolve_const(self.g, name, "shape")
        except (_Runtime, LSTMError):
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
                return x if to in _float_types() else None
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

    def link(self, info: _NodeInfo) -> Optional[int]:
        """id() of the LSTM node whose Y is exactly this node's X, laid out (T, N, D*H), or None."""
        v = self.value(info.node.input[0])
        if not isinstance(v, _Seq):
            return None
        want = (("T",), ("B",), ("D", "H")) if info.layout == 0 else (("B",), ("T",), ("D", "H"))
        return v.src if v == self.norm(v.src, want) else None


def _static_sizes(model, infos: List[_NodeInfo]) -> Dict[str, int]:
    """Known T and N of the first node's X from shape inference (static exports), when > 0."""
    import onnx

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
def _links(g, infos, known, opset, evaluator=None) -> Dict[int, int]:
    """id(LSTM node) -> id(the LSTM node whose Y is its X), for the nodes of graph g.
    ``evaluator``: a :class:`_Chains` subclass that knows other recurrent ops' outputs."""
    ev = (evaluator or _Chains)(g, infos, known, opset)
    pred = {}
    for k, info in infos.items():
        p = ev.link(info)
        if p is not None and p != k:
            pred[k] = p
    return pred


def _find_chains(model, graphs, opset, folder, label) -> List[List[_NodeInfo]]:
    version = None
    chains = []
    for g in graphs:
        nodes = [n for n in g.proto.node if _is_lstm(n)]
        if not nodes:
            continue
        version = version or _lstm_version(opset, label)
        infos = {id(n): _parse_node(g, n, version, folder, label) for n in nodes}
        pred = _links(g, infos, {}, opset)
        # A static export (dynamo) reshapes to constant sizes: retry with T and N from shape
        # inference when some node's X is computed but did not link symbolically.
        if g.parent is None and len(nodes) > 1 and any(
                id(n) not in pred and n.input[0] in g.producers for n in nodes):
            known = _static_sizes(model, list(infos.values()))
            if known:
                pred = _links(g, infos, known, opset)
        chains.extend(_walk_chains(nodes, infos, pred))
    return chains


def _walk_chains(nodes, infos, pred) -> list:
    """The chains (lists of infos, bottom layer first) of ``nodes`` given the links ``pred``
    (id(node) -> id(the node below)); a Y feeding two nodes is a branch, not a stack."""
    succ: Dict[int, List[int]] = {}
    for b, a in pred.items():
        succ.setdefault(a, []).append(b)
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


def _stacked_state(chain, D, H):
    """The chain's constant initial states stacked as (h0 (L*D, H), c0 (L*D, H)), or None when
    there are none or all are zero."""
    if not any(i.h0 is not None or i.c0 is not None for i in chain):
        return None
    L = len(chain)
    h0 = np.zeros((L * D, H), np.float64)
    c0 = np.zeros((L * D, H), np.float64)
    for l, info in enumerate(chain):
        if info.h0 is not None:
            h0[l * D : (l + 1) * D] = info.h0
        if info.c0 is not None:
            c0[l * D : (l + 1) * D] = info.c0
    return (h0, c0) if np.any(h0) or np.any(c0) else None


def _pick(chains, node, label) -> List[_NodeInfo]:
    def listing():
        return "; ".join(
            "[" + " -> ".join(i.describe() for i in ch) + "]" for ch in chains)

    if not chains:
        raise UnsupportedModelError(f"{label}: no LSTM node found (main graph, subgraphs and model-local functions searched)")
    if node is None:
        if len(chains) == 1:
            return chains[0]
        raise InputError(
            f"{label}: {len(chains)} independent LSTM nodes/stacks found; pass node='name' to choose "
            f"one: {listing()}")
    if not isinstance(node, str):
        raise InputTypeError(f"node must be a node name (str), got {type(node).__name__}")
    for ch in chains:
        if any(i.node.name == node or i.name == node for i in ch):
            return ch
    raise InputError(f"{label}: no LSTM node named {node!r}; candidates: {listing()}")


def _check_chain(chain: List[_NodeInfo], label):
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


def onnx_to_params(src, node: Optional[str] = None):
    """Read an ONNX model -> ``(layers, options)`` without building the runtime model.

    ``layers[l][d]`` are canonical :class:`~lstm_cpu.spec.LayerParams`; ``options`` has ``clip``,
    ``input_forget``, ``initial_state`` ((h0 (L*D, H), c0 (L*D, H)) or None), ``reverse`` (a lone
    reverse-direction layer) and ``source`` (provenance for ``model.info()``).
    """
    return _file_errors(_onnx_to_params, src, node)


def _file_errors(read, src, *args):
    """``read(src, *args)``, with whatever a malformed proto makes escape turned into FormatError."""
    try:
        return read(src, *args)
    except (LSTMError, OSError):
        raise
    except RecursionError:
        raise FormatError(f"{_label_of(src)}: the model's graph nests too deeply to be read") from None
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, UnicodeError, OverflowError) as exc:
        # A malformed proto field this importer did not anticipate: still the file's fault.
        raise FormatError(f"{_label_of(src)}: malformed ONNX model: {type(exc).__name__}: {exc}") from exc


def _label_of(src):
    return repr(os.fspath(src)) if isinstance(src, (str, os.PathLike)) else f"<{type(src).__name__}>"


def _onnx_to_params(src, node):
    model, folder, label = _read_model(src)
    opset = _default_opset(model, label)
    graphs = _all_graphs(model)
    chains = _find_chains(model, graphs, opset, folder, label)
    inlined = False
    if not chains:
        flat = _inline_lstm_functions(model, label)
        if flat is not None:
            model, inlined = flat, True
            chains = _find_chains(model, _all_graphs(model), opset, folder, label)
    chain = _pick(chains, node, label)
    _check_chain(chain, label)
    const_T = _check_constant_lengths(model, chain, label)
    first = chain[0]
    layers = [info.params for info in chain]
    initial_state = _stacked_state(chain, first.D, first.H)
    x_name = first.inputs["X"]
    source = {
        "format": "onnx",
        "path": os.fspath(src) if isinstance(src, (str, os.PathLike)) else None,
        "nodes": [i.name for i in chain],
        "graph": first.graph.path,
        "opset": opset,
        "lstm_version": first.version,
        "layout": first.layout,
        "inlined_functions": inlined,
        "inputs": {
            "X": x_name,
            "X_graph_input": _graph_input_behind(first.graph, x_name),
            "batch_first": first.layout == 1 or _is_batch_first_transpose(first.graph, x_name),
            "sequence_lens": (first.inputs["sequence_lens"] if const_T is None
                              else f"constant {const_T} = T for every sequence (a no-op)"),
            "initial_h": [i.inputs["initial_h"] for i in chain],
            "initial_c": [i.inputs["initial_c"] for i in chain],
        },
    }
    options = {
        "clip": first.clip,
        "input_forget": first.input_forget,
        "initial_state": initial_state,
        "reverse": first.direction == "reverse",
        "source": source,
    }
    return layers, options


def _is_batch_first_transpose(g: _Graph, name: str) -> bool:
    """True when X is ``Transpose(perm=[1, 0, 2])`` of something (torch's batch_first=True)."""
    if name not in g.producers:
        return False
    node, _ = g.producers[name]
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return node.op_type == "Transpose" and perm == [1, 0, 2]


def load_onnx(src, node: Optional[str] = None, dtype=np.float32):
    """An ONNX model (path, bytes or ``onnx.ModelProto``) -> :class:`~lstm_cpu.model.LSTMModel`.

    ``node``: name of an LSTM node; its whole chain is imported (needed when the model holds
    several independent LSTMs). ``dtype``: float32 or float64 compute. The model is time-major
    whatever the node's ``layout``; ``model.info()["source"]`` records layout, the graph inputs
    behind X / sequence_lens / initial states, and the nodes used.
    """
    from lstm_cpu.model import LSTMModel  # the runtime: numpy + numba only

    layers, options = onnx_to_params(src, node)
    return LSTMModel(layers, clip=options["clip"], input_forget=options["input_forget"], dtype=dtype,
                     initial_state=options["initial_state"], source=options["source"],
                     reverse=options["reverse"])


__all__ = ["load_onnx", "onnx_to_params", "ONNX_GATE_ORDER", "ORT_ACTIVATION_DEFAULTS",
           "MAX_TENSOR_ELEMENTS", "MAX_DIM", "SUPPORTED_VERSIONS"]
