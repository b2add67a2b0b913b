"""Reading an ONNX file safely, and walking its graphs with their scopes.

* :func:`read_model`: a path, bytes or ``onnx.ModelProto`` -> ``(ModelProto, folder, label)``. The
  protobuf is parsed without external data (see :mod:`.onnx_tensors` for how external data is
  read, only from inside the model's folder); a file protobuf cannot parse is refused before it is
  read.
* :class:`Graph`: one graph or subgraph (``If``/``Loop``/``Scan`` bodies) with its initializers,
  producers, consumers and inputs, and its enclosing graph: a name not defined in a branch is
  looked up in the enclosing scopes, as ONNX scoping says.
* :func:`all_graphs`: the main graph and every nested subgraph, depth first, depth-bounded.
* :func:`default_opset` / :func:`op_version`: which version of an operator a node is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from lstm_cpu.errors import FormatError, InputTypeError

# ---------------------------------------------------------------------------------------------
# Reading the file
# ---------------------------------------------------------------------------------------------
_PROTOBUF_LIMIT = 2 << 30  # protobuf refuses messages of 2 GiB and more


def read_model(src):
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


def default_opset(model, label) -> int:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise FormatError(f"{label}: the model declares no opset for the default ONNX domain")
    return int(versions[0])


def op_version(op_type: str, opset: int, label) -> int:
    """The version of default-domain operator ``op_type`` that a model of ``opset`` uses: the
    newest one not newer than the opset (0 when the installed onnx does not know the opset)."""
    import onnx

    if opset < 1:
        raise FormatError(f"{label}: default-domain opset {opset} is not a valid opset")
    try:
        return int(onnx.defs.get_schema(op_type, opset).since_version)
    except Exception:  # an opset newer than the installed onnx knows
        return 0


# ---------------------------------------------------------------------------------------------
# Graphs and scopes
# ---------------------------------------------------------------------------------------------
@dataclass
class Graph:
    """One (sub)graph: its constants, producers and inputs, and the enclosing scope."""

    proto: object
    path: str  # "main", "main/If 'cond':then_branch", ...
    parent: Optional["Graph"]
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


def subgraphs(node):
    """(attribute name, GraphProto) of every graph attribute of ``node`` (If, Loop, Scan, ...)."""
    from onnx import AttributeProto

    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == AttributeProto.GRAPHS:
            for k, g in enumerate(a.graphs):
                yield f"{a.name}[{k}]", g


def all_graphs(model) -> List[Graph]:
    """The main graph and every nested subgraph, depth first (bounded depth)."""
    out = []

    def walk(proto, path, parent, depth):
        if depth > 64:
            raise FormatError(f"subgraphs nested more than 64 deep at {path}")
        g = Graph.build(proto, path, parent)
        out.append(g)
        for node in proto.node:
            for aname, sub in subgraphs(node):
                walk(sub, f"{path}/{node.op_type} {node_label(node)}:{aname}", g, depth + 1)

    walk(model.graph, "main", None, 0)
    return out


def node_label(node) -> str:
    return repr(node.name) if node.name else f"<unnamed {node.op_type} -> {list(node.output)[:1]}>"




def aborts_shape_inference(node) -> bool:
    """True for a node on which onnx's C++ shape inference asserts and aborts the whole process
    (not an exception: SIGABRT). Seen with onnx 1.23: a ``Split`` with more outputs than its
    ``num_outputs`` attribute. Callers skip inference (or refuse the node) when this is True."""
    if node.op_type == "Split" and node.domain in ("", "ai.onnx"):
        for a in node.attribute:
            if a.name == "num_outputs" and a.i != len(node.output):
                return True
    return False


def graph_aborts_shape_inference(proto) -> bool:
    """``aborts_shape_inference`` over every node of a graph and its subgraphs."""
    from onnx import AttributeProto

    stack = [proto]
    while stack:
        g = stack.pop()
        for node in g.node:
            if aborts_shape_inference(node):
                return True
            for a in node.attribute:
                if a.type == AttributeProto.GRAPH:
                    stack.append(a.g)
                elif a.type == AttributeProto.GRAPHS:
                    stack.extend(a.graphs)
    return False


__all__ = ["read_model", "default_opset", "op_version", "Graph", "subgraphs", "all_graphs", "node_label",
           "aborts_shape_inference", "graph_aborts_shape_inference"]
