"""Weights computed from constants: evaluated at load time with onnx's reference evaluator.

``torch.onnx.export(..., do_constant_folding=False)`` and several converters write the ``W``,
``R``, ``B`` (and ``P``, constant ``initial_h``/``initial_c``) of an LSTM node as the output of
``Slice``, ``Concat``, ``Unsqueeze``, ``Reshape``, ``Transpose``, ``Cast``, ``Gather``, ``Split``,
... applied to initializers. Whatever the operators, such a value is a constant: this module
extracts its constant-only ancestors and evaluates them, instead of a hand-written folder per
operator.

Which evaluator: ``onnx.reference.ReferenceEvaluator``, one node at a time. It ships with the
``onnx`` package the importer needs anyway (onnxruntime stays optional, and the lstm-cpu runtime
never needs either), it runs the operators as the ONNX spec defines them, and going node by node
lets every output be bounded *before* it is computed and every failure name its node.

Safety, in order:

* the ancestors are collected without reading data; a graph input (or a ``Loop``/``Scan`` body
  input) among them means the value is computed at run time (:class:`RuntimeValue`), as do
  random operators, operators of other domains and operators holding subgraphs;
  at most :data:`MAX_FOLDED_NODES` nodes;
* every initializer and ``Constant`` tensor is checked against :mod:`.limits` before it is read,
  and external data is read only through :func:`.onnx_tensors.external_bytes` (inside the model's
  folder): the evaluator never sees a file path;
* before each node runs, onnx's shape inference (fed the values of its small inputs) must give
  every output a static shape within the limits, else the node is not evaluated
  (:class:`UnsupportedModelError`); after it runs, the outputs are checked again;
* any exception of the evaluator becomes :class:`FormatError` naming the node and the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from lstm_cpu.errors import FormatError, LSTMError, UnsupportedModelError

from .limits import MAX_TENSOR_ELEMENTS, check_dims
from .onnx_graph import Graph, aborts_shape_inference, node_label, subgraphs
from .onnx_tensors import Const, RuntimeValue, external_bytes

#: The constant-only subgraph behind one tensor may have at most this many nodes.
MAX_FOLDED_NODES = 4096
#: Inputs with at most this many elements are given to shape inference as data (shapes, axes,
#: indices), so that Reshape / Expand / Slice / ... outputs get static shapes before they run.
_DATA_FOR_INFERENCE = 4096
#: Not functions of their inputs: never evaluated at load time.
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial", "Bernoulli"}


def _op(node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


@dataclass
class Folder:
    """Evaluates constant-only subgraphs of one model: its folder (external data) and opsets."""

    folder: object  # str or None (a model given as bytes cannot have external data)
    opsets: Dict[str, int]

    @classmethod
    def of(cls, model, folder) -> "Folder":
        return cls(folder, {("" if o.domain == "ai.onnx" else o.domain): int(o.version)
                            for o in model.opset_import})

    # -- the subgraph -----------------------------------------------------------------------------
    def _ancestors(self, scope: Graph, name: str, what: str):
        """(nodes in evaluation order, leaves {name: TensorProto}) behind ``name`` (a node output
        of ``scope``); raises RuntimeValue when something in it is only known at run time."""
        from onnx import TensorProto

        order: List[object] = []
        leaves: Dict[str, object] = {}
        seen_nodes, seen_names = set(), set()
        root_node, _ = scope.producers[name]
        root = f"{_op(root_node)} node {node_label(root_node)}"
        source = f"{_op(root_node)} {node_label(root_node)}"  # as RuntimeValue.source always reads
        stack: List[Tuple[Graph, str, bool]] = [(scope, name, False)]
        while stack:
            g, n, expanded = stack.pop()
            if expanded:  # post-order: every input of this node is placed already
                node = g.producers[n][0]
                if id(node) not in seen_nodes:
                    seen_nodes.add(id(node))
                    order.append(node)
                    if len(order) > MAX_FOLDED_NODES:
                        raise UnsupportedModelError(
                            f"{what}: the constant subgraph behind {name!r} has more than "
                            f"{MAX_FOLDED_NODES} nodes")
                continue
            if n in seen_names:
                continue
            seen_names.add(n)
            s = g
            while s is not None and not s.defines(n):
                s = s.parent
            if s is None:
                raise FormatError(f"{what}: tensor {n!r} (behind {name!r}) is not defined by any "
                                  "initializer, node or graph input")
            if n in s.initializers:
                t = s.initializers[n]
                if not isinstance(t, TensorProto):
                    raise UnsupportedModelError(f"{what}: tensor {n!r} (behind {name!r}) is a sparse initializer")
                leaves[n] = t
                continue
            if n not in s.producers:
                raise RuntimeValue(f"computed at run time by {root} from graph input {n!r}", source,
                                   graph_input=n)
            node, _ = s.producers[n]
            op = _op(node)
            if node.domain not in ("", "ai.onnx") or op in _NONDETERMINISTIC or any(True for _ in subgraphs(node)):
                raise RuntimeValue(f"computed at run time by {root} (through {op} node {node_label(node)})",
                                   source)
            if op == "Constant":
                leaves[n] = self._constant_tensor(node, what)
                if leaves[n] is not None:
                    continue
                del leaves[n]  # value_float(s) / value_int(s) / value_string(s): tiny, evaluated
            stack.append((s, n, True))
            for i in node.input:
                if i:
                    stack.append((s, i, False))
        return order, leaves

    @staticmethod
    def _constant_tensor(node, what):
        """The TensorProto of a Constant node's ``value`` (read by us, never by the evaluator:
        it may be external data), or None for the small ``value_*`` forms."""
        from onnx import AttributeProto

        for a in node.attribute:
            if a.name == "value" and a.type == AttributeProto.TENSOR:
                return a.t
            if a.name == "sparse_value":
                raise UnsupportedModelError(
                    f"{what}: Constant node {node_label(node)} holds a sparse tensor")
        return None

    # -- reading and running ----------------------------------------------------------------------
    def _leaf(self, t, what: str) -> np.ndarray:
        """An initializer / Constant tensor as a numpy array of its own type, after the checks."""
        from onnx import TensorProto, helper, numpy_helper

        where = f"{what}: tensor {t.name!r}"
        dims = tuple(int(d) for d in t.dims)
        n = check_dims(dims, where)
        try:
            npdt = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        except Exception:
            raise UnsupportedModelError(f"{where} has an unsupported data type {t.data_type}") from None
        if t.data_location == TensorProto.EXTERNAL:
            if npdt.kind not in "fiub" and npdt.name != "bfloat16":
                raise UnsupportedModelError(f"{where}: external data of type {npdt.name} is not supported")
            raw = external_bytes(t, self.folder, what, n * npdt.itemsize)
            return np.frombuffer(raw, dtype=npdt.newbyteorder("<")).reshape(dims)
        try:
            arr = numpy_helper.to_array(t)
        except Exception as exc:  # raw_data of the wrong length, unknown type, ...
            raise FormatError(f"{where} of shape {list(dims)} cannot be read: {exc}") from None
        if arr.shape != dims:
            raise FormatError(f"{where}: holds {arr.size} values for shape {list(dims)}")
        return arr

    def _bound(self, node, values, what: str):
        """Refuse to run ``node`` unless shape inference gives each output a static, bounded shape."""
        import onnx
        from onnx import helper, numpy_helper, shape_inference

        label = f"{what}: {_op(node)} node {node_label(node)}"
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opsets.get("", 1), node.domain)
        except Exception:
            raise UnsupportedModelError(f"{label}: operator unknown to onnx at opset "
                                        f"{self.opsets.get('', 1)}; cannot evaluate it") from None
        if aborts_shape_inference(node):
            raise FormatError(f"{label} is malformed ({len(node.output)} outputs for its "
                              f"num_outputs attribute)")
        types, data = {}, {}
        for i in node.input:
            if i and i not in types:
                v = values[i]
                try:
                    types[i] = helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                    if v.size <= _DATA_FOR_INFERENCE:
                        data[i] = numpy_helper.from_array(v, i)
                except Exception:  # a string / object tensor, a type onnx cannot describe
                    raise UnsupportedModelError(
                        f"{label}: input {i!r} of type {v.dtype} cannot be evaluated at load time") from None
        try:
            out = shape_inference.infer_node_outputs(
                schema, node, types, input_data=data,
                opset_imports=[helper.make_opsetid(d, v) for d, v in self.opsets.items()])
        except Exception as exc:
            raise FormatError(f"{label} is invalid for its constant inputs: {exc}") from None
        for o in node.output:
            if not o:
                continue
            tt = out.get(o)
            dims = None
            if tt is not None and tt.tensor_type.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.tensor_type.shape.dim]
            if dims is None or None in dims:
                raise UnsupportedModelError(
                    f"{label}: the size of its output {o!r} is not known before evaluating it, so it is "
                    "not evaluated (a weight must come from constants of static shapes)")
            check_dims(dims, f"{label}: output {o!r}")

    def _run(self, node, values, what: str):
        from onnx.reference import ReferenceEvaluator

        label = f"{what}: {_op(node)} node {node_label(node)}"
        self._bound(node, values, what)
        feeds = {i: values[i] for i in node.input if i}
        try:
            outs = ReferenceEvaluator(node, opsets=self.opsets).run(None, feeds)
        except LSTMError:
            raise
        except Exception as exc:  # the evaluator raises many types for bad attributes / inputs
            raise FormatError(f"{label} failed on its constant inputs (computing "
                              f"{[o for o in node.output if o]}): {type(exc).__name__}: {exc}") from None
        for o, v in zip(node.output, outs):
            if o:
                v = np.asarray(v)
                if v.size > MAX_TENSOR_ELEMENTS:
                    raise FormatError(f"{label}: output {o!r} has {v.size} elements, more than the "
                                      f"limit {MAX_TENSOR_ELEMENTS}")
                values[o] = v

    def evaluate(self, scope: Graph, name: str, what: str) -> Const:
        """The value of node output ``name`` of ``scope``, when only constants feed it."""
        order, leaves = self._ancestors(scope, name, what)
        values = {n: self._leaf(t, what) for n, t in leaves.items()}
        for node in order:
            self._run(node, values, what)
        node, _ = scope.producers[name]
        return Const(None, what, array=values[name],
                     computed_by=f"{_op(node)} node {node_label(node)} ({len(order)} constant node(s))")


__all__ = ["Folder", "MAX_FOLDED_NODES"]
