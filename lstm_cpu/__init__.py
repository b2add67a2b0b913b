"""lstm-cpu: Numba-accelerated CPU inference for LSTM networks.

    import lstm_cpu
    model = lstm_cpu.load("model.onnx")        # or .pt/.pth, .safetensors, or our packed file
    s = model.stream()                         # persistent state
    y = s.step(x)                              # x (I,) -> y (out,)

Importing this package loads numpy and numba only; the ONNX and PyTorch importers are imported
when a file of theirs is loaded.
"""

from __future__ import annotations

from .errors import FormatError, InputError, InputTypeError, LSTMError, UnsupportedModelError
from .model import LSTMModel, Stream
from .spec import GATE_ORDER, Activation, LayerParams

__version__ = "0.1.0"

__all__ = [
    "LSTMModel", "Stream", "LayerParams", "Activation", "GATE_ORDER", "load", "inspect", "from_torch",
    "warmup", "threading_layer", "LSTMError", "FormatError", "UnsupportedModelError",
    "InputError", "InputTypeError", "__version__",
]


def from_torch(obj, prefix=None, head=None, dtype=None, weights=None):
    """Convert ``nn.LSTM``, ``nn.LSTMCell``, a module holding exactly one of them, or a state dict.
    ``weights``: "float32" (default), "int8" or "bfloat16" gate matrices (see LSTMModel)."""
    import numpy as np

    from lstm_cpu.importers.torch_lstm import from_torch as _from_torch

    model = _from_torch(obj, prefix=prefix, head=head, dtype=np.float32 if dtype is None else dtype)
    return model if weights is None else model.with_weights(weights)


def load(path, **options) -> LSTMModel:
    """Load a model file, recognising its format from its content (then its extension).

    Formats: ONNX (``node=``), PyTorch ``.pt``/``.pth`` (weights-only; ``prefix=``, ``head=``),
    TorchScript archives (weights read without running anything; ``prefix=``, ``head=``),
    ``.safetensors`` state dicts (``prefix=``, ``head=``), and lstm-cpu's packed format.
    ``weights=`` "float32", "int8" or "bfloat16" converts the gate matrices; without it a file
    keeps its own format (a packed int8 file, or onnxruntime's DynamicQuantizeLSTM, stays int8).
    """
    from .loader import load as _load

    return _load(path, **options)


def inspect(path) -> list:
    """Every LSTM found in a model file of any format: a list of
    :class:`lstm_cpu.candidates.Candidate` (``name``, ``kind``, ``input_size``, ``hidden_size``,
    ``num_layers``, ``num_directions``, ``location``). ``load(path, node=c.name)`` (ONNX) or
    ``load(path, prefix=c.name)`` (PyTorch) loads one; ``candidates.format_table`` prints them.
    """
    from .loader import inspect as _inspect

    return _inspect(path)


def warmup(verbose: bool = False) -> list:
    """Compile every kernel into Numba's cache (for container builds); returns what it compiled."""
    from .loader import warmup as _warmup

    return _warmup(verbose)


def threading_layer() -> str:
    """The Numba threading layer in use ("omp", "tbb" or "workqueue")."""
    from .kernels import threading_layer as _tl

    return _tl()
