"""ONNX models -> the canonical :class:`lstm_cpu.model.LSTMModel`: the entry points.

:func:`load_onnx` and :func:`onnx_to_params` read a file and pick the LSTM to import. The work is
split by job, one module each:

* :mod:`.onnx_graph`: reading the protobuf safely; graphs, subgraphs and their scopes; opsets;
* :mod:`.onnx_tensors`: constants (initializers, ``Constant`` nodes, external data inside the
  model's folder only), size checks and dtype widening;
* :mod:`.onnx_fold`: weights computed from constants, evaluated with onnx's ReferenceEvaluator;
* :mod:`.onnx_functions`: inlining model-local functions (size-capped);
* :mod:`.onnx_lstm_op`: the ``LSTM`` operator's attributes and inputs -> ``LayerParams``;
* :mod:`.onnx_chains`: multi-layer stacks written by ``torch.onnx.export``.

Choosing: one chain (or lone node) in the model (main graph and, recursively, ``If``/``Loop``/
``Scan`` bodies) is used automatically. With several, ``node="name"`` picks the chain containing
that node (the whole chain, never a part of it); without it :class:`InputError` lists the
candidates with their sizes.

Errors: :class:`FormatError` for corrupt / hostile / inconsistent files (naming the file, node and
tensor, and what was expected vs found), :class:`UnsupportedModelError` for valid models using
something lstm-cpu cannot run; nothing else escapes.
"""

from __future__ import annotations

import os
from typing import List, Optional

import numpy as np

from lstm_cpu.errors import FormatError, InputError, InputTypeError, LSTMError, UnsupportedModelError

from .limits import MAX_DIM, MAX_TENSOR_ELEMENTS
from .onnx_chains import check_chain, check_constant_lengths, find_chains
from .onnx_functions import inline_local_functions
from .onnx_graph import all_graphs, default_opset, read_model
from .onnx_lstm_op import (ONNX_GATE_ORDER, ORT_ACTIVATION_DEFAULTS, SUPPORTED_VERSIONS, NodeInfo,
                           is_batch_first_transpose, is_lstm)
from .onnx_tensors import graph_input_behind


def _pick(chains, node, label) -> List[NodeInfo]:
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



def onnx_to_params(src, node: Optional[str] = None):
    """Read an ONNX model -> ``(layers, options)`` without building the runtime model.

    ``layers[l][d]`` are canonical :class:`~lstm_cpu.spec.LayerParams`; ``options`` has ``clip``,
    ``input_forget``, ``initial_state`` ((h0 (L*D, H), c0 (L*D, H)) or None), ``reverse`` (a lone
    reverse-direction layer) and ``source`` (provenance for ``model.info()``).
    """
    try:
        return _onnx_to_params(src, node)
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
    model, folder, label = read_model(src)
    opset = default_opset(model, label)
    graphs = all_graphs(model)
    chains = find_chains(model, graphs, opset, folder, label)
    inlined = False
    if not chains:
        flat = inline_local_functions(model, label, is_lstm)
        if flat is not None:
            model, inlined = flat, True
            chains = find_chains(model, all_graphs(model), opset, folder, label)
    chain = _pick(chains, node, label)
    check_chain(chain, label)
    const_T = check_constant_lengths(model, chain, label)
    first = chain[0]
    layers = [info.params for info in chain]
    L, D, H = len(chain), first.D, first.H
    initial_state = None
    if any(i.h0 is not None or i.c0 is not None for i in chain):
        h0 = np.zeros((L * D, H), np.float64)
        c0 = np.zeros((L * D, H), np.float64)
        for l, info in enumerate(chain):
            if info.h0 is not None:
                h0[l * D : (l + 1) * D] = info.h0
            if info.c0 is not None:
                c0[l * D : (l + 1) * D] = info.c0
        if np.any(h0) or np.any(c0):
            initial_state = (h0, c0)
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
            "X_graph_input": graph_input_behind(first.graph, x_name),
            "batch_first": first.layout == 1 or is_batch_first_transpose(first.graph, x_name),
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
