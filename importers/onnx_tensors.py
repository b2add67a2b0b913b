"""Constant tensors of an ONNX graph: where they come from, and reading them safely.

* :func:`resolve_const` finds the constant behind a node input without reading any data: an
  initializer or ``Constant`` node of the graph or of an enclosing graph, through chains of
  ``Identity`` / ``Cast``. Its dims can then be checked before anything is allocated. A value
  computed at run time raises :class:`RuntimeValue` (internal), which the caller turns into an
  error or a note ("initial_h comes from graph input 'h0'").
* :func:`read_const` reads one as float32 (float64 for double tensors): every dims check of
  :mod:`.limits` first, float16 / bfloat16 widened exactly, Cast rounding applied as the runtime
  would, NaN/Inf refused.
* :func:`external_bytes`: external data is read only from files inside the model file's folder:
  absolute locations, ``..`` components, and paths (or symlinks) whose real path leaves the folder
  are refused, and ``offset``/``length`` are checked against the file size and the tensor's
  declared shape before anything is read.
* :func:`known_zero` / :func:`graph_input_behind`: run-time values that are known anyway (zeros,
  a slice of a graph input), used only to describe where an initial state comes from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from lstm_cpu.errors import FormatError, LSTMError, UnsupportedModelError

from .limits import check_dims, widen_bfloat16
from .onnx_graph import Graph, node_label


# ---------------------------------------------------------------------------------------------
# Constant tensors: resolution (no data read) and safe conversion
# ---------------------------------------------------------------------------------------------
_FLOAT_TYPES = {}  # TensorProto data type -> (name, numpy little-endian dtype, itemsize)


def float_types():
    if not _FLOAT_TYPES:
        from onnx import TensorProto as TP

        _FLOAT_TYPES.update({
            TP.FLOAT: ("float32", np.dtype("<f4")),
            TP.DOUBLE: ("float64", np.dtype("<f8")),
            TP.FLOAT16: ("float16", np.dtype("<f2")),
            TP.BFLOAT16: ("bfloat16", np.dtype("<u2")),  # bit pattern; widened to float32
        })
    return _FLOAT_TYPES


def dtype_name(data_type: int) -> str:
    from onnx import TensorProto

    try:
        return TensorProto.DataType.Name(data_type)
    except ValueError:
        return f"data type {data_type}"


@dataclass
class Const:
    """A constant tensor found for a node input: a TensorProto not read yet (its dims can be
    checked first), or the value a constant-only subgraph evaluated to (:mod:`.onnx_fold`)."""

    tensor: object  # TensorProto, or None for an evaluated value
    what: str  # "input 'W' ('onnx::LSTM_12') of node 'lstm'"
    casts: Tuple[int, ...] = ()  # Cast targets applied on the way (TensorProto data types)
    array: Optional[np.ndarray] = None  # the evaluated value (any shape, its own dtype)
    computed_by: str = ""  # "Concat node 'w_cat' (12 constant node(s))" for an evaluated value

    @property
    def dims(self) -> Tuple[int, ...]:
        if self.array is not None:
            return tuple(self.array.shape)
        return tuple(int(d) for d in self.tensor.dims)


class RuntimeValue(Exception):
    """Internal: the value is computed at run time (graph input or a node output)."""

    def __init__(self, how: str, source: str, graph_input: Optional[str] = None):
        super().__init__(how)
        self.how, self.source, self.graph_input = how, source, graph_input


def resolve_const(g: Graph, name: str, what: str, depth: int = 0, fold=None) -> Const:
    """Find the constant tensor behind ``name`` (initializer, Constant, via Identity/Cast chains).

    Any other node: with ``fold`` (an :class:`.onnx_fold.Folder`), its constant-only subgraph is
    evaluated; without, or when a graph input feeds it, RuntimeValue is raised (the value is
    computed at run time). FormatError when nothing defines ``name``.
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
        return Const(t, what)
    if name in scope.producers:
        node, _ = scope.producers[name]
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        if op == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == AttributeProto.TENSOR:
                    return Const(a.t, what)
                if a.name == "sparse_value":
                    raise UnsupportedModelError(
                        f"{what}: Constant node {node_label(node)} holds a sparse tensor; dense weights are needed")
                if a.name in ("value_float", "value_floats"):
                    vals = [a.f] if a.name == "value_float" else list(a.floats)
                    t = TensorProto(data_type=TensorProto.FLOAT, float_data=vals)
                    if a.name == "value_floats":
                        t.dims.append(len(vals))
                    return Const(t, what)
                if a.name.startswith("value_"):
                    raise UnsupportedModelError(
                        f"{what}: Constant node {node_label(node)} holds {a.name}; "
                        "float weights are needed (integer, string and bool weights are not supported)")
            raise FormatError(f"{what}: Constant node {node_label(node)} has no value attribute")
        if op == "Identity" and node.input and node.input[0]:
            return resolve_const(scope, node.input[0], what, depth + 1, fold)
        if op == "Cast" and node.input and node.input[0]:
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to not in float_types():
                raise UnsupportedModelError(
                    f"{what}: Cast node {node_label(node)} produces {dtype_name(to or 0)}; "
                    "float weights are needed")
            c = resolve_const(scope, node.input[0], what, depth + 1, fold)
            return Const(c.tensor, c.what, c.casts + (int(to),), c.array, c.computed_by)
        if fold is not None:
            return fold.evaluate(scope, name, what)
        raise RuntimeValue(f"computed at run time by {op} node {node_label(node)}", f"{op} {node_label(node)}")
    raise RuntimeValue(f"graph input {name!r}", name, graph_input=name)


def external_bytes(t, folder, what, nbytes: int) -> bytes:
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


def read_const(c: Const, folder) -> np.ndarray:
    """The float array of ``c`` (float32, or float64 for double tensors), after every check."""
    from onnx import TensorProto as TP

    arr = _evaluated(c) if c.array is not None else _tensor_array(c, folder)
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
        name = c.tensor.name if c.tensor is not None else c.computed_by
        raise FormatError(f"{c.what}: tensor {name!r} contains NaN or Inf")
    return arr


def _evaluated(c: Const) -> np.ndarray:
    """An evaluated value -> float32 (float64 if it is float64); float16 / bfloat16 widen exactly."""
    arr = c.array
    if arr.dtype == np.float64:
        return arr
    if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
        return arr.astype(np.float32)
    raise UnsupportedModelError(
        f"{c.what}: computed by {c.computed_by} as {arr.dtype.name}; float weights are needed "
        "(float32, float16, bfloat16 or float64)")


def _tensor_array(c: Const, folder) -> np.ndarray:
    """A TensorProto's data -> float32 (float64 for double tensors), dims and sizes checked first."""
    from onnx import TensorProto as TP

    t, what = c.tensor, c.what
    types = float_types()
    if t.data_type not in types:
        raise UnsupportedModelError(
            f"{what}: tensor {t.name!r} has type {dtype_name(t.data_type)}; "
            "float weights are needed (float32, float16, bfloat16 or float64)")
    dims = c.dims
    n = check_dims(dims, what)
    tname, npdt = types[t.data_type]
    nbytes = n * npdt.itemsize
    if t.data_location == TP.EXTERNAL:
        arr = np.frombuffer(external_bytes(t, folder, what, nbytes), dtype=npdt)
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
        arr = widen_bfloat16(arr)
    elif t.data_type == TP.FLOAT16:
        arr = arr.astype(np.float32)
    return arr.astype(np.float64 if t.data_type == TP.DOUBLE else np.float32).reshape(dims)


# ---------------------------------------------------------------------------------------------
# Run-time values that are known anyway: zeros, slices of graph inputs
# ---------------------------------------------------------------------------------------------
LAYOUT_OPS = {"Identity", "Cast", "Slice", "Gather", "Squeeze", "Unsqueeze", "Reshape",
               "Transpose", "Expand", "Split", "Flatten", "Concat"}


def known_zero(g: Graph, name: str, depth: int = 0) -> Optional[str]:
    """A description if ``name`` is provably all zeros (ConstantOfShape 0 / zero constants through
    layout ops), else None. Only used to describe where an initial state comes from."""
    from onnx import AttributeProto

    if depth > 64 or not name:
        return None
    try:
        c = resolve_const(g, name, "state")
        try:
            return "constant zeros" if not np.any(read_const(c, None)) else None
        except LSTMError:
            return None
    except (RuntimeValue, LSTMError):
        pass
    if name not in g.producers:
        return None
    node, _ = g.producers[name]
    if node.op_type == "ConstantOfShape":
        v = next((a.t for a in node.attribute if a.name == "value" and a.type == AttributeProto.TENSOR), None)
        if v is None:
            return "ConstantOfShape zeros"
        try:
            return "ConstantOfShape zeros" if not np.any(read_const(Const(v, "value"), None)) else None
        except LSTMError:
            return None
    if node.op_type in LAYOUT_OPS and node.input:
        data = node.input[0]
        if node.op_type == "Concat":
            ok = all(known_zero(g, i, depth + 1) for i in node.input if i)
            return "zeros (Concat)" if ok else None
        z = known_zero(g, data, depth + 1)
        return z and f"{z} via {node.op_type}"
    return None


def graph_input_behind(g: Graph, name: str, depth: int = 0) -> Optional[str]:
    """The graph input ``name`` is taken from through layout ops (torch: Slice of h0), or None."""
    scope = g
    while depth < 64 and name:
        if name in scope.inputs and name not in scope.initializers:
            return name
        if name not in scope.producers:
            return None
        node, _ = scope.producers[name]
        if node.op_type not in LAYOUT_OPS or node.op_type == "Concat" or not node.input:
            return None
        name, depth = node.input[0], depth + 1
    return None


__all__ = ["Const", "RuntimeValue", "resolve_const", "read_const", "external_bytes", "float_types",
           "dtype_name", "known_zero", "graph_input_behind", "LAYOUT_OPS"]
