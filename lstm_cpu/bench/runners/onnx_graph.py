"""The ONNX graph the onnxruntime and OpenVINO peers run, and how to feed it.

The peers always run ``lstm_cpu.importers.onnx_export.to_onnx(model)`` of the model being
benchmarked, also when that model was loaded from a user's ONNX file: the export carries exactly
the weights lstm-cpu runs, and its tensor names are known (``onnx_export.io_names``), so nothing
is guessed from names. A model the export refuses (a projection, say) is a skipped peer with the
exporter's reason.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from ...errors import LSTMError
from .base import PeerUnavailable, initial_state


class ExportedGraph:
    """``to_onnx(model)`` serialised, with the names of its data and state tensors.

    Inputs ``x (T, B, I)``, ``initial_h[l] (D, B, out)``, ``initial_c[l] (D, B, H)`` per layer l;
    outputs ``y (T, B, D*out|O)``, ``y_h[l]``, ``y_c[l]`` (the final state, fed back as the next
    call's initial state).
    """

    def __init__(self, model):
        try:
            from lstm_cpu.importers import onnx_export  # noqa: PLC0415 - needs onnx
        except ImportError as e:
            raise PeerUnavailable(f"cannot export to ONNX ({e}); pip install onnx") from None
        try:
            proto = onnx_export.to_onnx(model, state_defaults=False)  # the state is fed every call
        except LSTMError as e:  # e.g. a projection: ONNX's LSTM has none
            raise PeerUnavailable(f"the model cannot be exported to ONNX: {e}") from None
        self.onnx_bytes = proto.SerializeToString()
        io = onnx_export.io_names(model.num_layers)
        self.x_name, self.y_name = io["x"], io["y"]
        self.h_names, self.c_names = io["initial_h"], io["initial_c"]
        self.output_names: List[str] = [io["y"]] + [n for hc in zip(io["y_h"], io["y_c"]) for n in hc]
        #: (state input, the output that carries its next value)
        self.state_pairs: List[Tuple[str, str]] = list(zip(self.h_names + self.c_names,
                                                           io["y_h"] + io["y_c"]))
        self.model = model

    def feeds(self, x: np.ndarray) -> Dict[str, np.ndarray]:
        """x (T, B, I) -> the input dict, starting from the model's initial state split per layer
        (``h0 (L*D, B, out)`` -> ``(D, B, out)`` per layer, and ``c0`` alike)."""
        D = self.model.num_directions
        h0, c0 = initial_state(self.model, x.shape[1])
        f = {self.x_name: np.ascontiguousarray(x, np.float32)}
        for l, (hn, cn) in enumerate(zip(self.h_names, self.c_names)):
            f[hn] = np.ascontiguousarray(h0[l * D : (l + 1) * D])  # (D, B, out)
            f[cn] = np.ascontiguousarray(c0[l * D : (l + 1) * D])  # (D, B, H)
        return f
