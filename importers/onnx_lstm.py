"""ONNX models -> the canonical :class:`lstm_cpu.model.LSTMModel`: the entry points.

:func:`load_onnx` and :func:`onnx_to_params` read a file and pick the LSTM to import. The work is
split by job, one module each:

* :mod:`.onnx_graph`: reading the protobuf safely; graphs, subgraphs and their scopes; opsets;
* :mod:`.onnx_tensors`: constants (initializers, ``Constant`` nodes, external data inside the
  model's folder only), size checks and dtype widening;
* :mod:`.onnx_fold`: weights computed from constants, evaluated with onnx's ReferenceEvaluator;
* :mod:`.onnx_functions`: inlining model-local functions (size-capped);
* :mod:`.onnx_lstm_op`: the ``LSTM`` operator's attributes and inputs -> ``LayerParams``;
* :mod:`.onnx_chains`: multi-layer stacks written by ``torch.onnx.export``;
* :mod:`.onnx_operators`: the finder of ``LSTM`` operators (one candidate per chain), and
  :mod:`.onnx_found`: what a finder returns. :data:`FINDERS` lists the finders run on every file.

Choosing: one chain (or lone node) in the model (main graph and, recursively, ``If``/``Loop``/
``Scan`` bodies) is used automatically. With several, ``node="name"`` picks the chain containing
that node (the whole chain, never a part of it); without it :class:`InputError` lists the
candidates as :func:`onnx_candidates` (``lstm_cpu.inspect``) returns them, in
:func:`lstm_cpu.candidates.format_table`'s table.

Errors: :class:`FormatError` for corrupt / hostile / inconsistent files (naming the file, node and
tensor, and what was expected vs found), :class:`UnsupportedModelError` for valid models using
something lstm-cpu cannot run; nothing else escapes.
"""

from __future__ import annotations

import os
import warnings
from typing import List, Optional

import numpy as np

from lstm_cpu.candidates import Candidate, format_table
from lstm_cpu.errors import FormatError, InputError, InputTypeError, LSTMError, UnsupportedModelError

from .limits import MAX_DIM, MAX_TENSOR_ELEMENTS
from .onnx_found import Found
from .onnx_functions import inline_local_functions
from .onnx_graph import read_model
from .onnx_lstm_op import ONNX_GATE_ORDER, ORT_ACTIVATION_DEFAULTS, SUPPORTED_VERSIONS, is_lstm
from .onnx_cells import find_cells
from .onnx_operators import find_operators
from .onnx_quant import find_quantized


#: The finders run on every ONNX file, in order (see :mod:`.onnx_found` for the contract).
FINDERS = (find_operators, find_cells, find_quantized)


def _run_finders(model, folder, label) -> List[Found]:
    """Every finder's candidates. A finder that refuses what it matched (a cell that fails its
    self-check, say) does not hide another finder's good candidates: its error is raised only when
    nothing was found, and otherwise reported as a warning naming what was left out."""
    found, refused = [], []
    for finder in FINDERS:
        try:
            found += finder(model, folder, label)
        except (FormatError, UnsupportedModelError) as exc:
            refused.append(exc)
    if refused and not found:
        raise refused[0]
    for exc in refused:
        warnings.warn(f"lstm-cpu: left out of the candidates: {exc}", stacklevel=4)
    return found


def _find_all(model, folder, label):
    """(every Found of every finder, whether model-local functions had to be inlined)."""
    found = _run_finders(model, folder, label)
    if found:
        return found, False
    flat = inline_local_functions(model, label, is_lstm)
    if flat is None:
        return found, False
    return _run_finders(flat, folder, label), True


def _pick(found: List[Found], node, label) -> Found:
    def table():
        return format_table(f.candidate for f in found)

    if not found:
        raise UnsupportedModelError(f"{label}: no LSTM node found (main graph, subgraphs and model-local functions searched)")
    if node is None:
        if len(found) == 1:
            return found[0]
        raise InputError(
            f"{label}: {len(found)} independent LSTMs found; pass node='name' to choose one:\n{table()}")
    if not isinstance(node, str):
        raise InputTypeError(f"node must be a node name (str), got {type(node).__name__}")
    for f in found:
        if node == f.candidate.name or node in f.aliases:
            return f
    raise InputError(f"{label}: no LSTM node named {node!r}; candidates:\n{table()}")


def _guarded(src, fn):
    """Run ``fn()``; anything a malformed file makes the onnx package or this importer raise
    becomes FormatError naming the file. LSTMError and OSError pass unchanged."""
    try:
        return fn()
    except (LSTMError, OSError):
        raise
    except RecursionError:
        raise FormatError(f"{_label_of(src)}: the model's graph nests too deeply to be read") from None
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, UnicodeError, OverflowError) as exc:
        # A malformed proto field this importer did not anticipate: still the file's fault.
        raise FormatError(f"{_label_of(src)}: malformed ONNX model: {type(exc).__name__}: {exc}") from exc


def _label_of(src):
    return repr(os.fspath(src)) if isinstance(src, (str, os.PathLike)) else f"<{type(src).__name__}>"


def onnx_candidates(src) -> List[Candidate]:
    """Every LSTM the finders see in an ONNX model (path, bytes or ModelProto), for
    ``lstm_cpu.inspect``: records only, nothing is built."""
    def run():
        model, folder, label = read_model(src)
        return [f.candidate for f in _find_all(model, folder, label)[0]]

    return _guarded(src, run)


def onnx_to_params(src, node: Optional[str] = None):
    """Read an ONNX model -> ``(layers, options)`` without building the runtime model.

    ``layers[l][d]`` are canonical :class:`~lstm_cpu.spec.LayerParams`; ``options`` has ``clip``,
    ``input_forget``, ``initial_state`` ((h0 (L*D, H), c0 (L*D, H)) or None), ``reverse`` (a lone
    reverse-direction layer), ``head`` (a linear layer ending the graph right after the LSTM:
    (weight (O, D*H), bias (O,) or None), or None) and ``source`` (provenance for ``model.info()``):
    the keywords of :class:`~lstm_cpu.model.LSTMModel`.
    """
    def run():
        model, folder, label = read_model(src)
        found, inlined = _find_all(model, folder, label)
        layers, options = _pick(found, node, label).build()
        options["source"].update(path=os.fspath(src) if isinstance(src, (str, os.PathLike)) else None,
                                 inlined_functions=inlined)
        return layers, options

    return _guarded(src, run)


def load_onnx(src, node: Optional[str] = None, dtype=np.float32):
    """An ONNX model (path, bytes or ``onnx.ModelProto``) -> :class:`~lstm_cpu.model.LSTMModel`.

    ``node``: name of an LSTM node; its whole chain is imported (needed when the model holds
    several independent LSTMs). ``dtype``: float32 or float64 compute. The model is time-major
    whatever the node's ``layout``; ``model.info()["source"]`` records layout, the graph inputs
    behind X / sequence_lens / initial states, and the nodes used.
    """
    from lstm_cpu.model import LSTMModel  # the runtime: numpy + numba only

    layers, options = onnx_to_params(src, node)
    if options.get("weights") == "int8" and np.dtype(dtype) != np.float32:
        raise InputError("a quantized ONNX model (DynamicQuantizeLSTM) runs in float32; dtype does not apply")
    return LSTMModel(layers, dtype=dtype, **options)  # a finder's options are LSTMModel keywords


__all__ = ["load_onnx", "onnx_to_params", "onnx_candidates", "FINDERS", "ONNX_GATE_ORDER", "ORT_ACTIVATION_DEFAULTS",
           "MAX_TENSOR_ELEMENTS", "MAX_DIM", "SUPPORTED_VERSIONS"]
